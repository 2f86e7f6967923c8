"""LoRA (rlhf_jax/models/lora.py) and its trainer integration.

Pure functions against an independent float64 numpy W + (alpha/r) A B per target
layout; the optimizer state holds only adapters (+ fully trained leaves); short
LoRA runs of every trainer starting from the conftest SFT run: SFT lowers the
held-out NLL and never touches the base, DPO / GRPO / PPO use the frozen base as
their reference (zero reward / KL at the first step), RM trains its head, a LoRA
workdir feeds `init_from` with merged weights, and preemption + resume is bitwise
equal to an uninterrupted run.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import override, read_metrics
from rlhf_jax import config as config_lib
from rlhf_jax.checkpoint import read_checkpoint
from rlhf_jax.launch import load_config
from rlhf_jax.models import ModelConfig, Transformer, init_params, lm_logits, lora
from rlhf_jax.models.heads import ScalarModel
from rlhf_jax import faults
from rlhf_jax import workdir as workdir_lib
from rlhf_jax.trainers import state as state_lib

TINY = ModelConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=4,
                   d_ff=24)
# Per-layer kernel layout (transformer.py), independent of lora.py: (input dims, output dims).
L, D, H, K, Dh, F = 2, 16, 4, 2, 4, 24
LAYOUT = {"q": ((D,), (H, Dh)), "k": ((D,), (K, Dh)), "v": ((D,), (K, Dh)),
          "o": ((H, Dh), (D,)), "gate": ((D,), (F,)), "up": ((D,), (F,)), "down": ((F,), (D,))}


def _base(seed=0):
  """Random float32 base parameters of TINY (numpy: fast, no compilation)."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda: init_params(TINY, jax.random.PRNGKey(0)))
  return jax.tree.map(lambda x: rng.normal(0, 0.2, x.shape).astype(np.float32), shapes)


def _init_trainable(base, cfg, seed=1):
  """lora.init_trainable under one jit (as the trainers call it; eager is slow to compile)."""
  return jax.jit(lora.init_trainable, static_argnums=1)(base, cfg, jax.random.PRNGKey(seed))


def _random_adapters(trained, seed=0):
  """The trained tree with A and B both random (B = 0 at init would make merge trivial)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: rng.normal(0, 0.3, x.shape).astype(np.float32), trained)


# ----------------------------------------------------------------------------
# Pure functions
# ----------------------------------------------------------------------------

def test_merge_matches_float64_numpy_for_every_target_layout():
  base = _base()
  cfg = lora.LoraConfig(rank=3, alpha=5.0, target_modules=lora.TARGETS)
  trained = _random_adapters(_init_trainable(base, cfg))
  merged = lora.merge(base, trained, cfg)
  for name, (ins, outs) in LAYOUT.items():
    W = np.asarray(base["layers"][name]["kernel"], np.float64)
    A = np.asarray(trained["lora"]["layers"][name]["a"], np.float64)
    B = np.asarray(trained["lora"]["layers"][name]["b"], np.float64)
    assert W.shape == (L, *ins, *outs) and A.shape == (L, *ins, 3) and B.shape == (L, 3, *outs)
    n_in, n_out = int(np.prod(ins)), int(np.prod(outs))
    want = np.stack([W[l].reshape(n_in, n_out) + (5.0 / 3) * A[l].reshape(n_in, 3)
                     @ B[l].reshape(3, n_out) for l in range(L)]).reshape(W.shape)
    got = np.asarray(merged["layers"][name]["kernel"])
    assert np.abs(want - W).max() > 1e-2, name  # the adapter changes the kernel
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=name)
  for path in (("embed", "embedding"), ("final_norm", "scale"), ("layers", "attn_norm", "scale")):
    a, b = base, merged
    for k in path:
      a, b = a[k], b[k]
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_only_target_modules_change_and_dropout_masks_input_features():
  base = _base()
  cfg = lora.LoraConfig(rank=2, alpha=2.0, dropout=0.5, target_modules=("q", "down"))
  trained = _random_adapters(_init_trainable(base, cfg))
  assert sorted(trained["lora"]["layers"]) == ["down", "q"]
  merged = lora.merge(base, trained, cfg)
  for name in ("k", "v", "o", "gate", "up"):
    np.testing.assert_array_equal(merged["layers"][name]["kernel"], base["layers"][name]["kernel"])
  # dropout: rows of A (input features) zeroed or scaled by 1/(1-p), one mask per layer
  dropped = lora.merge(base, trained, cfg, rng=jax.random.PRNGKey(3))
  A = np.asarray(trained["lora"]["layers"]["q"]["a"], np.float64)
  B = np.asarray(trained["lora"]["layers"]["q"]["b"], np.float64).reshape(L, 2, H * Dh)
  W = np.asarray(base["layers"]["q"]["kernel"], np.float64).reshape(L, D, H * Dh)
  dW = np.asarray(dropped["layers"]["q"]["kernel"], np.float64).reshape(L, D, H * Dh) - W
  kept = np.abs(dW).max(-1) > 0                                        # [L, D] input features
  assert 0 < kept.mean() < 1
  want = np.einsum("lir,lro->lio", A * kept[..., None] / 0.5, B)       # scale alpha/r = 1
  np.testing.assert_allclose(dW, want, rtol=1e-4, atol=1e-5)


def test_zero_b_init_gives_exactly_the_base_model():
  base = _base()
  cfg = lora.LoraConfig(rank=4, alpha=16.0, target_modules=lora.TARGETS)
  trained = _init_trainable(base, cfg)
  for name, (ins, _) in LAYOUT.items():
    a, b = (np.asarray(trained["lora"]["layers"][name][k]) for k in ("a", "b"))
    assert not b.any()
    assert 0.5 < a.std() * np.sqrt(np.prod(ins)) < 1.5  # N(0, 1/fan_in)
  merged = lora.merge(base, trained, cfg)
  for x, y in zip(jax.tree.leaves(base), jax.tree.leaves(merged)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  tokens = jnp.asarray([[1, 5, 7, 2, 9]])
  np.testing.assert_array_equal(np.asarray(lm_logits(TINY, merged, tokens)),
                                np.asarray(lm_logits(TINY, base, tokens)))


def test_unmerge_inverts_merge():
  base = _base()
  cfg = lora.LoraConfig(rank=2, alpha=4.0, target_modules=("q", "o", "up"))
  trained = _random_adapters(_init_trainable(base, cfg))
  merged = lora.merge(base, trained, cfg)
  back = lora.unmerge(merged, trained, cfg)
  for name in ("q", "o", "up"):
    w, m, b = (np.asarray(t["layers"][name]["kernel"]) for t in (base, merged, back))
    assert np.abs(m - w).max() > 1e-2
    np.testing.assert_allclose(b, w, atol=1e-6)


def test_bad_lora_config_is_a_clear_error():
  with pytest.raises(ValueError, match="target_modules"):
    lora.LoraConfig(rank=2, target_modules=("q", "qkv"))
  with pytest.raises(ValueError, match="rank"):
    lora.LoraConfig(rank=-1)
  base = _base()
  with pytest.raises(ValueError, match=r"trainable=\['heads'\].*top-level names"):
    lora.init_trainable(base, lora.LoraConfig(rank=2, trainable=("heads",)), jax.random.PRNGKey(0))


# ----------------------------------------------------------------------------
# Train state: what the optimizer holds, how it is sharded
# ----------------------------------------------------------------------------

def _lora_config(**over):
  c = config_lib.base_config("sft")
  c.lora.rank = 2
  return override(c, **{f"lora.{k}": v for k, v in over.items()})


def test_optimizer_state_holds_only_adapters_and_they_shard_like_the_base(capsys):
  import optax
  from rlhf_jax import parallel
  mesh = parallel.make_mesh((1, 1, 1))
  model = Transformer(TINY)
  dummy = jnp.zeros((1, 2), jnp.int32)
  tx = optax.adam(1e-3)
  state, shardings, frozen = state_lib.create_train_state(
      lambda r: model.init(r, dummy)["params"], tx, mesh, jax.random.PRNGKey(0),
      config=_lora_config(target_modules=("q", "o", "down")))
  r = 2
  want = sorted([(L, D, r), (L, r, H, Dh), (L, H, Dh, r), (L, r, D), (L, F, r), (L, r, D)])
  assert sorted(x.shape for x in jax.tree.leaves(state["params"])) == want
  moments = [x.shape for x in jax.tree.leaves(state["opt_state"]) if x.ndim]
  assert sorted(moments) == sorted(want * 2)  # Adam mu and nu of the adapters, nothing else
  full, _ = state_lib.create_state(lambda r: model.init(r, dummy)["params"], tx, mesh,
                                jax.random.PRNGKey(0))
  base = full["params"]  # the base is what full fine-tuning would start from, bitwise
  assert jax.tree.structure(frozen.params) == jax.tree.structure(base)
  for x, y in zip(jax.tree.leaves(frozen.params), jax.tree.leaves(base)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # the base lives in the state (held once: the same arrays) but not in its checkpoints
  assert state[state_lib.BASE] is frozen.params and shardings[state_lib.BASE] is frozen.shardings
  assert set(state_lib.checkpointed(state)) == {"step", "params", "opt_state"}
  specs = jax.tree.map(lambda s: tuple(s.spec), shardings["params"]["lora"]["layers"])
  assert specs["q"] == {"a": (None, "fsdp", None), "b": (None, None, "tensor", None)}
  assert specs["o"] == {"a": (None, "tensor", None, None), "b": (None, None, "fsdp")}
  assert specs["down"] == {"a": (None, "tensor", None), "b": (None, None, "fsdp")}
  n_total = sum(x.size for x in jax.tree.leaves(base)) + sum(int(np.prod(s)) for s in want)
  n_trained = sum(int(np.prod(s)) for s in want)
  assert (f"trainable_params={n_trained:,} total_params={n_total:,}"
          in capsys.readouterr().out)


def test_reward_model_head_is_always_trained_fully():
  import optax
  from rlhf_jax import parallel
  model = ScalarModel(TINY)
  dummy = jnp.zeros((1, 2), jnp.int32)
  state, _, frozen = state_lib.create_train_state(
      lambda r: model.init(r, dummy)["params"], optax.adam(1e-3), parallel.make_mesh((1, 1, 1)),
      jax.random.PRNGKey(0), config=_lora_config(), always_trained=("head",))
  assert set(state["params"]["full"]) == {"head"}
  assert state["params"]["full"]["head"]["dense"]["kernel"].shape == (D, 1)
  assert set(state["params"]["lora"]) == {"backbone"}
  assert sorted(state["params"]["lora"]["backbone"]["layers"]) == ["k", "o", "q", "v"]
  moments = [x.shape for x in jax.tree.leaves(state["opt_state"]) if x.ndim]
  assert moments.count((D, 1)) == 2 and (L, D, H, Dh) not in moments


# ----------------------------------------------------------------------------
# Trainers (tiny runs from the conftest SFT run)
# ----------------------------------------------------------------------------

def sft_lora_config(sft_add_run, **over):
  c = load_config("configs/sft.py:tiny")
  c.init_from = sft_add_run
  c.data.update(synthetic_task="add", synthetic_max_len=2, synthetic_train_examples=400,
                synthetic_eval_examples=64)
  c.update(num_steps=16, eval_every=0, log_every=1)
  c.optimizer.update(lr=1e-2, warmup_steps=0)
  c.lora.update(rank=3, alpha=6.0, dropout=0.1, target_modules=("q", "v", "o", "gate", "up"))
  c.checkpoint.async_save = False
  return override(c, **over)


@pytest.fixture(scope="module")
def lora_sft(sft_add_run, tmp_path_factory):
  from rlhf_jax.trainers import sft
  wd = str(tmp_path_factory.mktemp("lora_sft"))
  sft.run(sft_lora_config(sft_add_run), wd)
  return wd


def _eval_nll(workdir, params, mcfg):
  """Token-mean NLL of the eval completions (+ EOS), computed here with lm_logits."""
  from rlhf_jax.data import sft as sft_data
  from rlhf_jax.tokenizer import load_tokenizer
  tok = load_tokenizer(workdir)
  ex = sft_data.tokenize_sft_file(os.path.join(workdir, "data", "add2_eval.jsonl"), tok, 32,
                                  "error", False)
  arr = sft_data.pad_examples(ex, 32, tok.pad_id)
  logits = np.asarray(lm_logits(mcfg, params, arr["tokens"], arr["segment_ids"]), np.float64)
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - logits.max(-1, keepdims=True)
  tgt = arr["tokens"][:, 1:]
  lp = np.take_along_axis(logp[:, :-1], tgt[..., None], -1)[..., 0]
  m = arr["loss_mask"][:, 1:]
  return -(lp * m).sum() / m.sum()


@pytest.mark.slow  # a training run
def test_lora_sft_lowers_the_loss_and_never_touches_the_base(lora_sft, sft_add_run):
  _, sft_state = read_checkpoint(os.path.join(sft_add_run, "checkpoints"))
  start = sft_state["params"]
  step, state = read_checkpoint(os.path.join(lora_sft, "checkpoints"))
  assert step == 16 and set(state["params"]) == {"lora", "full"} and not state["params"]["full"]
  assert "lora_rng" in state  # dropout keys are part of the checkpoint
  moments = [x.shape for x in jax.tree.leaves(state["opt_state"]) if x.ndim]
  assert len(moments) == 2 * 10 and all(3 in s for s in moments)  # mu, nu of 5 x (A, B), rank 3
  cfg, base = workdir_lib.read_lora(lora_sft)
  assert cfg.rank == 3 and cfg.scale == 2.0
  assert json.load(open(os.path.join(lora_sft, "lora", "config.json")))["trainable_params"] == (
      sum(x.size for x in jax.tree.leaves(state["params"])))
  for x, y in zip(jax.tree.leaves(start), jax.tree.leaves(base)):  # base == the SFT run, bitwise
    np.testing.assert_array_equal(x, y)
  _, merged = workdir_lib.read_workdir_params(lora_sft)
  for name in ("k", "down", "attn_norm", "mlp_norm"):  # not LoRA targets
    for k in merged["layers"][name]:
      np.testing.assert_array_equal(merged["layers"][name][k], start["layers"][name][k])
  np.testing.assert_array_equal(merged["embed"]["embedding"], start["embed"]["embedding"])
  for name in ("q", "v", "o", "gate", "up"):
    assert np.abs(merged["layers"][name]["kernel"] - start["layers"][name]["kernel"]).max() > 1e-4
  mcfg = ModelConfig.from_dict(json.load(open(os.path.join(lora_sft, "model_config.json"))))
  before, after = _eval_nll(lora_sft, start, mcfg), _eval_nll(lora_sft, merged, mcfg)
  assert after < before - 0.02, (before, after)
  # a LoRA workdir as init_from: load_init returns the merged parameters
  _, init = workdir_lib.load_init(lora_sft, "float32", False)
  for x, y in zip(jax.tree.leaves(init), jax.tree.leaves(merged)):
    np.testing.assert_array_equal(x, y)


@pytest.mark.slow  # a training run
def test_lora_resume_is_bitwise_identical(lora_sft, sft_add_run, tmp_path):
  from rlhf_jax.trainers import sft
  wd = str(tmp_path / "resumed")
  undo = faults.install(fault="7:TERM")  # SIGTERM after step 7: checkpoint + return
  try:
    out = sft.run(sft_lora_config(sft_add_run), wd)
  finally:
    undo()
  assert out["preempted"] and read_checkpoint(os.path.join(wd, "checkpoints"))[0] == 7
  sft.run(sft_lora_config(sft_add_run), wd)
  (sa, a), (sb, b) = (read_checkpoint(os.path.join(w, "checkpoints")) for w in (lora_sft, wd))
  assert sa == sb == 16
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  with pytest.raises(config_lib.ConfigError, match="config.lora differs"):
    sft.run(sft_lora_config(sft_add_run, **{"lora.alpha": 4.0, "num_steps": 20}), wd)


@pytest.fixture(scope="module")
def add_pairs(lora_sft, tmp_path_factory):
  """Preference pairs on the addition task: the right sum vs the sum plus one."""
  path = str(tmp_path_factory.mktemp("pairs") / "pairs.jsonl")
  with open(os.path.join(lora_sft, "data", "add2_eval.jsonl")) as f, open(path, "w") as out:
    for line in f:
      r = json.loads(line)
      out.write(json.dumps({"prompt": r["prompt"], "chosen": r["completion"],
                            "rejected": str(int(r["completion"]) + 1)}) + "\n")
  return path


def _pair_config(name, init_from, pairs, tfds_data_dir, **over):
  c = load_config(f"configs/{name}.py:tiny")
  c.init_from = init_from
  c.data.update(source="jsonl", train_path=pairs, eval_path="", data_dir=tfds_data_dir)
  c.update(num_steps=2, eval_every=0, log_every=1, batch_size=16)
  c.optimizer.update(lr=1e-2, warmup_steps=0)
  c.lora.rank = 4
  c.checkpoint.async_save = False
  return override(c, **over)


@pytest.mark.slow  # a training run
def test_lora_dpo_from_a_lora_sft_workdir_uses_the_base_as_reference(
    lora_sft, add_pairs, tfds_data_dir, tmp_path):
  from rlhf_jax.trainers import dpo
  wd = str(tmp_path / "dpo")
  dpo.run(_pair_config("dpo", lora_sft, add_pairs, tfds_data_dir), wd)
  _, sft_merged = workdir_lib.read_workdir_params(lora_sft)
  _, base = workdir_lib.read_lora(wd)  # the DPO run's frozen base = the merged LoRA SFT policy
  for x, y in zip(jax.tree.leaves(sft_merged), jax.tree.leaves(base)):
    np.testing.assert_array_equal(x, y)
  rows = read_metrics(wd)
  # step 1 is computed with the initial adapters (B = 0): policy == reference
  assert abs(rows[0]["chosen_reward"]) < 1e-5 and abs(rows[0]["rejected_reward"]) < 1e-5
  assert abs(rows[0]["policy_chosen_logps"]) > 0.01
  assert abs(rows[1]["chosen_reward"]) > 1e-4  # the adapters moved the policy
  _, state = read_checkpoint(os.path.join(wd, "checkpoints"))
  assert set(state["params"]) == {"lora", "full"}


@pytest.mark.slow  # a training run
def test_lora_reward_model_trains_adapters_and_head(lora_sft, add_pairs, tfds_data_dir,
                                                    tmp_path):
  from rlhf_jax.trainers import reward_model
  wd = str(tmp_path / "rm")
  reward_model.run(_pair_config("rm", lora_sft, add_pairs, tfds_data_dir), wd)
  _, state = read_checkpoint(os.path.join(wd, "checkpoints"))
  assert set(state["params"]["full"]) == {"head"}
  _, base = workdir_lib.read_lora(wd)
  assert np.abs(state["params"]["full"]["head"]["dense"]["kernel"]
                - base["head"]["dense"]["kernel"]).max() > 1e-4
  mcfg, params, _ = reward_model.load_reward_model(wd)  # merged, as the reward function sees it
  _, sft_merged = workdir_lib.read_workdir_params(lora_sft)
  np.testing.assert_array_equal(params["backbone"]["embed"]["embedding"],
                                sft_merged["embed"]["embedding"])
  assert np.abs(params["backbone"]["layers"]["q"]["kernel"]
                - sft_merged["layers"]["q"]["kernel"]).max() > 1e-5
  np.testing.assert_array_equal(params["head"]["dense"]["kernel"],
                                state["params"]["full"]["head"]["dense"]["kernel"])


def _rl_config(name, init_from, tfds_data_dir, **over):
  c = load_config(f"configs/{name}.py:tiny")
  c.init_from = init_from
  c.data.data_dir = tfds_data_dir
  c.update(num_steps=2, eval_every=0, log_every=1)
  c.rollout.update(prompts_per_step=4, group_size=4, generate_micro_batch=16,
                   logprob_micro_batch=16)
  c.optimizer.lr = 3e-3
  c.lora.rank = 4
  c.checkpoint.async_save = False
  return override(c, **over)


@pytest.mark.slow  # a training run
def test_lora_grpo_reference_is_the_base(lora_sft, tfds_data_dir, tmp_path):
  from rlhf_jax.trainers import grpo
  wd = str(tmp_path / "grpo")
  c = _rl_config("grpo", lora_sft, tfds_data_dir)
  c.grpo.old_logps = "recompute"  # policy and reference log-probs by the same forward pass
  grpo.run(c, wd)
  rows = read_metrics(wd)
  assert rows[0]["kl_ref_k1"] == 0.0  # step 1 samples with B = 0: policy == base, exactly
  assert rows[1]["kl_ref_k1"] != 0.0 and np.isfinite(rows[1]["loss"])
  _, state = read_checkpoint(os.path.join(wd, "checkpoints"))
  assert set(state["params"]) == {"lora", "full"} and not state["params"]["full"]


@pytest.mark.slow  # a training run
def test_lora_ppo_trains_policy_adapters_critic_adapters_and_value_head(
    lora_sft, tfds_data_dir, tmp_path):
  from rlhf_jax.trainers import ppo
  wd = str(tmp_path / "ppo")
  ppo.run(_rl_config("ppo", lora_sft, tfds_data_dir), wd)
  rows = read_metrics(wd)
  assert rows[0]["kl_seq"] == 0.0 and rows[1]["kl_seq"] != 0.0
  _, state = read_checkpoint(os.path.join(wd, "checkpoints"))
  p = state["params"]
  assert set(p["lora"]) == {"policy", "value"} and set(p["lora"]["value"]) == {"backbone"}
  assert set(p["full"]) == {"value"} and set(p["full"]["value"]) == {"head"}
  _, base = workdir_lib.read_lora(wd)
  assert set(base) == {"policy", "value"}
