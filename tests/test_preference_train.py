"""Reward-model and DPO-family trainers, end to end on the synthetic preference task
(chosen = the correct reversal, rejected = a random string of the same length), in
process with a small model: metrics move the right way, workdir contract, resume."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import override, read_metrics
from rlhf_jax.launch import load_config
from rlhf_jax.losses.dpo import LOSS_TYPES
from rlhf_jax.data import pairs
from rlhf_jax.trainers import dpo, reward_model

pytestmark = pytest.mark.slow


def small(config, data_dir, **over):
  """The tiny preset, made faster for tests; a shared TFDS data_dir avoids rebuilding."""
  config.model.update(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128)
  config.data.update(data_dir=str(data_dir), synthetic_train_examples=1024,
                     synthetic_eval_examples=128)
  config.update(num_steps=60, log_every=10, eval_every=60)
  config.optimizer.warmup_steps = 5
  config.checkpoint.async_save = False
  if "sample" in config:
    config.sample.every = 0
  return override(config, **over)


rows = read_metrics


@pytest.fixture(scope="session")
def data_dir(tfds_data_dir):
  return tfds_data_dir


@pytest.fixture(scope="module")
def rm_run(tmp_path_factory, data_dir):
  wd = str(tmp_path_factory.mktemp("rm"))
  reward_model.run(small(load_config("configs/rm.py:tiny"), data_dir), wd)
  return wd


def test_reward_model_learns_and_follows_workdir_contract(rm_run):
  r = rows(rm_run)
  assert [x["step"] for x in r] == [0, 10, 20, 30, 40, 50, 60]
  assert r[0]["eval_accuracy"] == pytest.approx(0.5, abs=0.15)  # untrained: chance
  assert r[-1]["eval_accuracy"] > 0.75, r[-1]  # held-out pairs
  assert r[-1]["loss"] < np.log(2)
  for key in ("accuracy", "margin", "learning_rate", "tokens_per_second",
              "data_train_malformed_skipped"):
    assert key in r[-1], key
  for f in ("config.json", "model_config.json", "tokenizer.model"):
    assert os.path.exists(os.path.join(rm_run, f)), f
  mcfg, params, tok = reward_model.load_reward_model(rm_run)
  assert set(params) == {"backbone", "head"} and tok.vocab_size <= mcfg.vocab_size


def test_reward_model_logs_heldout_score_stats(rm_run):
  """eval_score_mean/std (what the reward_model reward's normalize=True uses) equal the
  float64 statistics of the RM's scores on both replies of the held-out pairs, scored
  through the independent text path of RewardModelReward."""
  from rlhf_jax.rewards.reward_model import RewardModelReward
  with open(os.path.join(rm_run, "data", "pref_reverse_random_eval.jsonl")) as f:
    pairs = [json.loads(line) for line in f]
  with open(os.path.join(rm_run, "config.json")) as f:
    bs = min(json.load(f)["batch_size"], len(pairs))
  pairs = pairs[:len(pairs) - len(pairs) % bs]  # the trainer's eval uses full batches
  fn = RewardModelReward(rm_run, batch_size=32)
  prompts = [p["prompt"] for p in pairs]
  scores = np.concatenate([fn.raw_scores(prompts, [p["chosen"] for p in pairs]),
                           fn.raw_scores(prompts, [p["rejected"] for p in pairs])])
  last = rows(rm_run)[-1]
  assert last["eval_score_mean"] == pytest.approx(scores.astype(np.float64).mean(), abs=1e-3)
  assert last["eval_score_std"] == pytest.approx(scores.astype(np.float64).std(), rel=1e-3)
  assert RewardModelReward(rm_run, normalize=True).std == pytest.approx(last["eval_score_std"])


def test_eval_rm_cli_matches_training_eval(rm_run):
  data = os.path.join(rm_run, "data", "pref_reverse_random_eval.jsonl")
  out = subprocess.run([sys.executable, "-m", "rlhf_jax.launch", "eval-rm",
                        f"--checkpoint={rm_run}", f"--data={data}", "--batch_size=48"],
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  line = out.stdout.strip().splitlines()[-1]
  acc = float(line.split()[0].split("=")[1])
  assert "pairs=128" in line  # 128 = 2 batches of 48 + a padded one: all pairs, once
  assert acc == pytest.approx(rows(rm_run)[-1]["eval_accuracy"], abs=1e-4)  # 4 decimals


def test_reward_model_resumes(tmp_path, data_dir):
  wd = str(tmp_path / "rm")
  cfg = small(load_config("configs/rm.py:tiny"), data_dir, num_steps=20, eval_every=0)
  reward_model.run(cfg, wd)
  cfg.num_steps = 30
  result = reward_model.run(cfg, wd)
  assert result["step"] == 30
  assert [x["step"] for x in rows(wd)] == [10, 20, 30]
  assert sorted(int(d) for d in os.listdir(os.path.join(wd, "checkpoints"))
                if d.isdigit())[-1] == 30


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_every_dpo_loss_raises_implicit_reward_accuracy(tmp_path, data_dir, loss_type):
  over = {"dpo.loss_type": loss_type}
  if loss_type == "simpo":
    over["dpo.beta"] = 2.0  # SimPO's beta lives on a per-token scale (paper: 2-2.5)
  if loss_type == "orpo":
    over["dpo.orpo_lambda"] = 1.0  # at 0.1 the NLL term dominates a 60-step run
  wd = str(tmp_path / loss_type)
  dpo.run(small(load_config("configs/dpo.py:tiny"), data_dir, **over), wd)
  r = rows(wd)
  first, last = r[0], r[-1]
  assert last["eval_reward_accuracy"] > max(first["eval_reward_accuracy"], 0.5) + 0.15, (first,
                                                                                         last)
  assert np.isfinite(last["loss"])
  for key in ("chosen_reward", "rejected_reward", "reward_margin", "policy_chosen_logps",
              "kl_chosen"):
    assert key in last, key
  if loss_type not in ("simpo", "orpo"):  # the reference-free variants need no cache
    assert os.path.exists(os.path.join(wd, "reference_logps_train.npz"))


def test_dpo_reference_on_the_fly_equals_precomputed(tmp_path, data_dir, capsys):
  """Same seed, same data: caching the reference log-probs changes nothing. The
  precompute shows a progress bar and says what it did in one line per split."""
  out = {}
  for pre in (True, False):
    wd = str(tmp_path / f"pre{pre}")
    dpo.run(small(load_config("configs/dpo.py:tiny"), data_dir, num_steps=10, log_every=5,
                  eval_every=0, **{"dpo.precompute_reference": pre}), wd)
    out[pre] = rows(wd)
    std = capsys.readouterr()
    said = [line for line in std.out.splitlines() if line.startswith("reference log-probs")]
    if pre:
      assert [line.split(",")[0] for line in said] == [
          "reference log-probs (train): 1024 pairs in 32 batches of 32",
          "reference log-probs (eval): 128 pairs in 4 batches of 32"], said
      assert "reference log-probs (train): 100%" in std.err  # the tqdm bar
    else:
      assert said == [] and "reference log-probs" not in std.err
  for a, b in zip(out[True], out[False]):
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6)
    assert a["reward_margin"] == pytest.approx(b["reward_margin"], rel=1e-3, abs=1e-5)


def test_mismatched_rows_pair_prompt_i_with_reply_i_plus_1():
  T = 8
  def row(prompt, reply):
    t = np.zeros(T, np.int32); s = np.zeros(T, np.int32); m = np.zeros(T, np.int32)
    n = len(prompt) + len(reply)
    t[:n] = prompt + reply; s[:n] = 1; m[len(prompt):n] = 1
    return t, s, m
  rs = [row([1, 5], [7, 8, 2]), row([1, 6, 6], [9, 2]), row([1], [3, 3, 3, 2])]
  arrays = {f"chosen_{k}": np.stack([r[i] for r in rs])
            for i, k in enumerate(("tokens", "segment_ids", "loss_mask"))}
  kl = pairs.mismatched_rows(arrays, pad_id=0)
  assert kl["kl_tokens"][0].tolist() == [1, 5, 9, 2, 0, 0, 0, 0]
  assert kl["kl_tokens"][2].tolist() == [1, 7, 8, 2, 0, 0, 0, 0]
  assert kl["kl_loss_mask"][1].tolist() == [0, 0, 0, 1, 1, 1, 1, 0]
  assert kl["kl_segment_ids"][1].tolist() == [1] * 7 + [0]


def test_reward_model_initialises_from_an_sft_run(tmp_path, data_dir):
  """init_from=<SFT workdir>: the RM backbone starts from the SFT params, tokenizer too."""
  import jax

  from rlhf_jax.checkpoint import read_checkpoint
  from rlhf_jax.trainers import sft
  sft_wd = str(tmp_path / "sft")
  sc = load_config("configs/sft.py:tiny")
  sc.model.update(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128)
  sc.data.update(synthetic_train_examples=256, synthetic_eval_examples=32)
  sc.update(num_steps=4, log_every=2, eval_every=0)
  sc.optimizer.warmup_steps = 0
  sc.checkpoint.async_save = False
  sft.run(sc, sft_wd)
  rm_wd = str(tmp_path / "rm")
  cfg = small(load_config("configs/rm.py:tiny"), data_dir, num_steps=1, eval_every=0,
              log_every=1, init_from=sft_wd)
  cfg.optimizer.update(lr=1e-7, warmup_steps=0)
  reward_model.run(cfg, rm_wd)
  _, s = read_checkpoint(os.path.join(sft_wd, "checkpoints"))
  _, r = read_checkpoint(os.path.join(rm_wd, "checkpoints"))
  lm = s["params"]
  for path in (("embed", "embedding"), ("layers", "q", "kernel"), ("final_norm", "scale")):
    a, b = lm, r["params"]["backbone"]
    for p in path:
      a, b = a[p], b[p]
    np.testing.assert_allclose(b, a, atol=1e-5)  # one step at lr 1e-7 away
  assert open(os.path.join(rm_wd, "tokenizer.model"), "rb").read() == open(
      os.path.join(sft_wd, "tokenizer.model"), "rb").read()
  assert jax.tree.structure(r["params"]["backbone"]) == jax.tree.structure(
      {k: v for k, v in lm.items() if k != "lm_head"})
