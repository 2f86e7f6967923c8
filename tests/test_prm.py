"""Process reward model: GSM8K step labels (safe evaluator, corruption, first-error
cut), the per-step BCE vs a float64 reference, the trainer's eval metrics, PRMReward
aggregation vs a hand computation, and a GRPO run logging per-step PRM statistics."""
import json
import random

import numpy as np
import pytest

from conftest import CharTokenizer, override, read_metrics, shared_data_file
from rlhf_jax.data import prm as prm_data
from rlhf_jax.data.sft import DataError

NATALIA = "Natalia sold 48/2 = <<48/2=24>>24 clips in May."


# ---------------------------------------------------------------- safe evaluator

@pytest.mark.parametrize("expr,want", [("48/2", 24), ("1+2*3", 7), ("(1+2)*3", 9),
                                       ("-3+5", 2), ("0.2*50", 10), ("1,000/4", 250)])
def test_safe_eval(expr, want):
  assert prm_data.safe_eval(expr) == want


@pytest.mark.parametrize("expr", ["__import__('os')", "abs(3)", "x+1", "2**10", "'a'",
                                  "(1).real", "[1]", "1 if 1 else 2", "3;4"])
def test_safe_eval_rejects_names_calls_and_other_syntax(expr):
  with pytest.raises(prm_data.UnsafeExpression):
    prm_data.safe_eval(expr)


def test_check_annotation_rounding_and_errors():
  assert prm_data.check_annotation("48/2=24") is True
  assert prm_data.check_annotation("48/2=25") is False
  assert prm_data.check_annotation("100/3=33.33") is True   # rounded to shown decimals
  assert prm_data.check_annotation("100/3=33.3") is True
  assert prm_data.check_annotation("100/3=33.4") is False
  assert prm_data.check_annotation("1/0=1") is None
  assert prm_data.check_annotation("foo(1)=1") is None
  assert prm_data.check_annotation("no equals") is None


# ---------------------------------------------------------------- step labels

def test_issue_example_and_its_corruption():
  assert prm_data.step_correct(NATALIA) is True
  bad = prm_data.corrupt_step(NATALIA, random.Random(3))
  assert bad != NATALIA and prm_data.step_correct(bad) is False
  value = bad.split("=")[-1].split(">>")[0]
  assert value != "24" and f"<<48/2={value}>>{value} clips in May." in bad  # consistent


def test_real_gsm8k_rows_clean_and_corrupted():
  path = shared_data_file("gsm8k_train.jsonl")
  stats = {}
  rows = prm_data.gsm8k_prm_rows(str(path), max_examples=50, seed=0, stats=stats)
  assert stats["solutions"] == 50
  first, corrupted = rows[0], rows[1]
  assert first["steps"][0] == NATALIA and first["labels"] == [1, 1]
  assert first["first_error"] == -1 and not first["corrupted"]
  assert corrupted["corrupted"] and corrupted["prompt"] == first["prompt"]
  i = corrupted["first_error"]
  assert corrupted["labels"] == [1] * i + [0] and len(corrupted["steps"]) == i + 1  # cut
  assert corrupted["steps"][:i] == first["steps"][:i]
  assert prm_data.step_correct(corrupted["steps"][i]) is False
  for r in rows:  # every label agrees with the checker
    assert r["labels"] == [int(prm_data.step_correct(s)) for s in r["steps"]]
  # deterministic in the seed
  assert prm_data.gsm8k_prm_rows(str(path), 50, 0) == rows
  assert prm_data.gsm8k_prm_rows(str(path), 50, 1) != rows


def test_malformed_rows_name_file_and_line(tmp_path):
  p = tmp_path / "bad.jsonl"
  p.write_text('{"question": "q", "answer": "a\\n#### 1"}\n{"question": "q"}\n')
  with pytest.raises(DataError, match=r"bad.jsonl:2"):
    list(prm_data.read_gsm8k(str(p)))
  q = tmp_path / "prm.jsonl"
  q.write_text('{"prompt": "q", "steps": ["a"], "labels": [1]}\n'
               '{"prompt": "q", "steps": ["a", "b"], "labels": [1]}\n')
  with pytest.raises(DataError, match=r"prm.jsonl:2: 'labels'"):
    prm_data.read_prm_jsonl(str(q))


def test_tokenize_puts_labels_at_step_ends():
  tok = CharTokenizer()
  rows = [{"prompt": "q", "steps": ["ab", "cde"], "labels": [1, 0]}]
  a = prm_data.tokenize_prm_rows(rows, tok, max_prompt_len=32, max_len=40)
  ids = prm_data.encode_prompt(tok, [{"role": "user", "content": "q"}])
  full = ids + tok.encode("ab") + tok.encode("\n") + tok.encode("cde")
  np.testing.assert_array_equal(a["tokens"][0, :len(full)], full)
  ends = [len(ids) + 1, len(full) - 1]
  np.testing.assert_array_equal(np.flatnonzero(a["step_mask"][0]), ends)
  assert a["step_labels"][0, ends[0]] == 1 and a["step_labels"][0, ends[1]] == 0
  assert a["first_error"][0] == 1
  # the second step does not fit: dropped, the first error counts as cut off (-2)
  b = prm_data.tokenize_prm_rows(rows, tok, 32, len(ids) + 4)
  assert b["step_mask"][0].sum() == 1 and b["first_error"][0] == -2


# ---------------------------------------------------------------- loss

def _reference(z, m, y, neg_w):
  z, m, y = (np.asarray(v, np.float64) for v in (z, m, y))
  nll = -(y * np.log(1 / (1 + np.exp(-z))) + (1 - y) * np.log(1 / (1 + np.exp(z))))
  w = m * (y + neg_w * (1 - y))
  loss = (w * nll).sum() / w.sum() if w.sum() > 0 else 0.0
  acc = (((z > 0) == (y > 0)) * m).sum() / m.sum() if m.sum() else 0.0
  return loss, acc


@pytest.mark.parametrize("neg_w", [1.0, 3.0])
def test_loss_matches_float64_reference(neg_w):
  from rlhf_jax.losses.prm import prm_step_loss
  rng = np.random.default_rng(0)
  z = rng.normal(0, 3, (4, 9)).astype(np.float32)
  m = (rng.random((4, 9)) < 0.3).astype(np.int32)
  m[2] = 0                                  # a row without steps (ragged)
  y = (rng.random((4, 9)) < 0.6).astype(np.int32)
  z[m == 0] = np.nan                        # unmasked positions must not leak
  loss, met = prm_step_loss(z, m, y, neg_w)
  ref_loss, ref_acc = _reference(np.nan_to_num(z), m, y, neg_w)
  np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)
  np.testing.assert_allclose(float(met["step_accuracy"]), ref_acc, rtol=1e-6)
  assert float(met["num_steps"]) == m.sum()


def test_loss_without_steps_is_zero_with_zero_gradient():
  import jax
  from rlhf_jax.losses.prm import prm_step_loss
  z = np.ones((2, 5), np.float32)
  m = np.zeros((2, 5), np.int32)
  loss, met = prm_step_loss(z, m, m)
  g = jax.grad(lambda x: prm_step_loss(x, m, m)[0])(z)
  assert float(loss) == 0.0 and float(met["step_accuracy"]) == 0.0
  assert np.all(np.asarray(g) == 0)


# ---------------------------------------------------------------- trainer + reward

def _learnable_rows(n, seed):
  """Rows whose wrong steps are visibly marked (a pipeline check: the trainer must learn
  a signal that is there; the real GSM8K task is in experiments/prm/README.md)."""
  rng = random.Random(seed)
  rows = []
  for _ in range(n):
    k = rng.randint(1, 3)
    labels = [1] * k
    if rng.random() < 0.5:
      labels[-1] = 0
    steps = [("a=1" if y else "zz9") for y in labels]
    rows.append({"prompt": "q", "steps": steps, "labels": labels,
                 "first_error": labels.index(0) if 0 in labels else -1,
                 "corrupted": 0 in labels})
  return rows


@pytest.fixture(scope="module")
def prm_run(tmp_path_factory):
  from rlhf_jax.launch import load_config
  from rlhf_jax.trainers import prm
  tmp = tmp_path_factory.mktemp("prm")
  for split, n, seed in (("train", 256, 0), ("eval", 64, 1)):
    prm_data.write_prm_jsonl(str(tmp / f"{split}.jsonl"), _learnable_rows(n, seed))
  c = load_config("configs/prm.py:tiny")
  override(c, **{"data.source": "jsonl", "data.train_path": str(tmp / "train.jsonl"),
                 "data.eval_path": str(tmp / "eval.jsonl"), "data.max_train_examples": 0,
                 "data.max_eval_examples": 0, "data.max_len": 24, "model.max_seq_len": 24,
                 "model.n_layers": 2, "tokenizer.vocab_size": 40, "num_steps": 40,
                 "batch_size": 16, "eval_every": 40, "log_every": 10,
                 "optimizer.warmup_steps": 4, "checkpoint.async_save": False})
  wd = str(tmp / "run")
  prm.run(c, wd)
  return wd


def test_prm_training_beats_majority_baseline(prm_run):
  last = [r for r in read_metrics(prm_run) if "eval_step_accuracy" in r][-1]
  first = [r for r in read_metrics(prm_run) if "eval_step_accuracy" in r][0]
  assert last["step"] == 40 and first["step"] == 0
  assert last["eval_step_accuracy"] > last["eval_majority_baseline"] + 0.05
  assert last["eval_balanced_accuracy"] > 0.9
  assert last["eval_first_error_accuracy"] > 0.9
  assert last["eval_accuracy_corrupted"] > 0.9 and last["eval_accuracy_clean"] > 0.9


def test_prm_reward_aggregation_by_hand(prm_run):
  from rlhf_jax.rewards import make_reward_fn
  from rlhf_jax.rewards.prm import PRMReward, aggregate, split_completion
  assert split_completion("a\n\n b \n#### 3") == ["a", "b"]
  p = [0.9, 0.2, 0.6]
  assert aggregate(p, "min") == 0.2 and aggregate(p, "last") == 0.6
  assert aggregate(p, "prod") == pytest.approx(0.108) and aggregate(p, "mean") == pytest.approx(
      1.7 / 3)
  assert aggregate([], "min", empty=-1.0) == -1.0
  fn = PRMReward(prm_run, aggregate="prod")
  prompts, comps = ["q", "q", "q"], ["a=1\na=1", "a=1\nzz9", ""]
  probs = fn.step_probs(prompts, comps)
  assert [len(x) for x in probs] == [2, 2, 0]
  assert probs[1][1] < 0.5 < probs[0][1]   # the trained PRM spots the marked wrong step
  r = fn(prompts, comps, {})
  np.testing.assert_allclose(r, [np.prod(probs[0]), np.prod(probs[1]), 0.0], rtol=1e-6)
  combined = make_reward_fn([
      {"name": "prm", "workdir": prm_run, "aggregate": "min"},
      {"name": "prm", "workdir": prm_run, "stat": "num_steps", "label": "prm_steps",
       "weight": 0}])
  total, parts = combined(prompts, comps, {})
  np.testing.assert_allclose(total, [min(probs[0]), min(probs[1]), 0.0], rtol=1e-6)
  np.testing.assert_array_equal(parts["prm_steps"], [2, 2, 0])
  with pytest.raises(ValueError, match="aggregate"):
    PRMReward(prm_run, aggregate="max")


@pytest.mark.slow  # trains the shared SFT policy fixture (~20 s) + 2 GRPO steps
def test_grpo_with_prm_reward_logs_per_step_stats(prm_run, sft_add_run, tfds_data_dir, tmp_path):
  from rlhf_jax.launch import load_config
  from rlhf_jax.trainers import grpo
  c = load_config("configs/grpo.py:tiny")
  c.init_from = sft_add_run
  c.data.data_dir = tfds_data_dir
  c.checkpoint.async_save = False
  spec = [{"name": "prm", "workdir": prm_run, "aggregate": "min"}] + [
      {"name": "prm", "workdir": prm_run, "stat": s, "label": f"prm_{s}", "weight": 0}
      for s in ("num_steps", "step_mean", "step_min", "frac_wrong")]
  override(c, **{"reward.spec": json.dumps(spec), "num_steps": 2, "log_every": 1,
                 "eval_every": 0, "rollout.prompts_per_step": 4, "rollout.group_size": 4,
                 "rollout.generate_micro_batch": 16, "rollout.logprob_micro_batch": 16})
  wd = str(tmp_path / "grpo_prm")
  grpo.run(c, wd)
  rows = [r for r in read_metrics(wd) if "reward/prm" in r]
  assert len(rows) == 2
  for r in rows:
    for s in ("num_steps", "step_mean", "step_min", "frac_wrong"):
      assert f"reward/prm_{s}" in r and np.isfinite(r[f"reward/prm_{s}"])
    assert 0.0 <= r["reward/prm"] <= 1.0 and r["reward/prm_num_steps"] >= 0
