"""Compute accounting (`rlhf_jax.flops`): the formula on hand-counted shapes, and the
cumulative flops/* and tokens/* counters of tiny SFT and GRPO runs vs a hand count."""
import csv
import dataclasses
import json
import os

import numpy as np
import pytest

from conftest import override, read_metrics
from rlhf_jax import flops
from rlhf_jax.models.transformer import ModelConfig

# D=8, F=16, H=4, K=2, Dh=2, V=32, L=3
C = ModelConfig(vocab_size=32, d_model=8, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=2,
                d_ff=16)


def _per_token(c):
  """(M, U, A) written out: blocks per token, unembedding per position, attention per pair."""
  D, F, H, K, Dh, V, L = (c.d_model, c.d_ff, c.n_heads, c.n_kv_heads, c.head_dim,
                          c.vocab_size, c.n_layers)
  M = L * (2 * D * H * Dh + 2 * 2 * D * K * Dh + 2 * H * Dh * D + 3 * 2 * D * F)
  return M, 2 * V * D, L * H * (2 * Dh + 2 * Dh)


def test_formula_by_hand():
  M, U, A = _per_token(C)
  assert (M, U, A) == (3 * (128 + 128 + 128 + 768), 512, 96)
  # a forward over 2 rows of 5 tokens: 15 visible (query, key) pairs per row
  assert flops.forward_flops(C, 2, 5) == 2 * (5 * M + 5 * U + 15 * A)
  assert flops.forward_flops(C, 2, 5, 1, head_flops=16) == 2 * (5 * M + 16 + 15 * A)
  assert flops.train_flops(C, 2, 5) == (3 * 2 * (5 * M + 5 * U + 15 * A), 0)
  # Kaplan et al.: without attention, 3F = 6 N per token (N = matmul parameters)
  assert 3 * (M + U) == 6 * flops.matmul_params(C)
  # remat policies
  qkv = 3 * (2 * 8 * 4 * 2 + 2 * 2 * 8 * 2 * 2)
  full = 2 * (5 * M + 15 * A)
  assert {p: flops.remat_flops(C, 2, 5, p) for p in
          ("none", "full", "dots", "dots_no_batch", "qkv_proj")} == {
      "none": 0, "full": full, "dots": 0, "dots_no_batch": 2 * 15 * A,
      "qkv_proj": full - 2 * 5 * qkv}
  assert flops.train_flops(dataclasses.replace(C, remat=True), 2, 5)[1] == full
  # generate: prefill 3 prompts of 4 (last position unembedded), then 2 decode steps of
  # 6 rows (groups of 2 share a prefill) against 5 and 6 keys
  assert flops.generate_flops(C, 6, 4, 2, prefill_rows=3) == (
      3 * (4 * M + U + 10 * A) + 6 * ((M + U + 5 * A) + (M + U + 6 * A)))
  # rollout: 4 rows in sampler calls of 2, lengths (3, 1) and (1, 1): 2 and 0 decode steps
  assert flops.rollout_generate_flops(C, [3, 1, 1, 1], 4, 2) == (
      flops.generate_flops(C, 2, 4, 2) + flops.generate_flops(C, 2, 4, 0))
  # a log-prob window pass: groups of 2 rows packed (prompt 4 + 2 x window 3 = 10 tokens)
  assert flops.window_flops(C, 4, 4, 3, 2) == 2 * (10 * M + 6 * U + 55 * A)
  assert flops.window_flops(C, 4, 4, 3) == 4 * (7 * M + 3 * U + 28 * A)


def test_counters_resume_from_the_checkpointed_step(tmp_path, capsys):
  wd = str(tmp_path)
  c = flops.Counters(wd, 0)
  c.add({"flops/update": 10, "tokens/trained": 3})
  c.saved(1)
  c.add({"flops/generate": 5})
  c.saved(2)
  c.add({"flops/remat": 7})
  row = c.row()
  assert row["flops/total"] == 22.0 and row["tokens/trained"] == 3.0
  resumed = flops.Counters(wd, 1)
  assert resumed.row() == {**dict.fromkeys(flops.KEYS, 0.0), "flops/update": 10.0,
                           "tokens/trained": 3.0, "flops/total": 10.0}
  assert flops.Counters(wd, 2).row()["flops/total"] == 15.0
  old = flops.Counters(wd, 5)  # no row for step 5 (a run from before the counters)
  assert old.row() == {} and "not logged" in capsys.readouterr().out
  with pytest.raises(KeyError):
    c.add({"flops/bogus": 1})
  flops.Counters(wd, 0)  # a fresh run starts a fresh file
  assert not os.path.exists(os.path.join(wd, flops.COUNTERS_FILE))


def test_samples_counter_of_the_offline_trainers():
  """samples/completions per step: DPO every side of every pair (KTO adds its mismatched
  rows), RM 2 per pair, PRM rows, SFT examples (packed ones counted apart)."""
  import ml_collections
  from rlhf_jax.trainers import dpo, prm, reward_model, sft
  B, T = 3, 5
  seg = np.ones((B, T), np.int32)
  pair = {f"{s}_{k}": seg for s in ("chosen", "rejected", "kl") for k in ("tokens", "segment_ids")}
  for loss_type, rows in (("sigmoid", 2 * B), ("kto", 3 * B)):
    d = ml_collections.ConfigDict(dict(loss_type=loss_type, reference_free=False))
    assert dpo.compute_counts(C, d, pair)["samples/completions"] == rows, loss_type
  assert reward_model.compute_counts(C, pair)["samples/completions"] == 2 * B
  assert prm.compute_counts(C, {"tokens": seg, "segment_ids": seg})["samples/completions"] == B
  packed = np.array([[1, 1, 2, 2, 3], [1, 1, 1, 0, 0], [1, 2, 0, 0, 0]], np.int32)
  assert sft.compute_counts(C, {"tokens": packed, "segment_ids": packed})[
      "samples/completions"] == 3 + 1 + 2


def _model(wd):
  with open(os.path.join(wd, "model_config.json")) as f:
    return ModelConfig.from_dict(json.load(f))


@pytest.mark.slow
def test_sft_counters_equal_a_hand_count(tmp_path):
  from rlhf_jax.data import sft as sft_data
  from rlhf_jax.launch import load_config
  from rlhf_jax.trainers import sft
  wd = str(tmp_path)
  c = override(load_config("configs/sft.py:tiny"), num_steps=2, log_every=1, eval_every=0,
               **{"checkpoint.async_save": False, "sample.every": 0,
                  "data.synthetic_train_examples": 64, "optimizer.warmup_steps": 1})
  sft.run(c, wd)
  rows = [r for r in read_metrics(wd) if r["step"] > 0]
  m = _model(wd)
  M, U, A = _per_token(m)
  B, T = c.batch_size, c.data.max_seq_len
  per_step = 3 * B * (T * M + T * U + A * T * (T + 1) // 2)
  # the real tokens of the two batches the trainer drew (same data pipeline)
  from rlhf_jax.tokenizer import load_tokenizer
  train_path, _ = sft.resolve_data(c, wd)
  ex = sft_data.tokenize_sft_file(train_path, load_tokenizer(wd), T, c.data.overlength,
                                  c.data.loss_on_prompt)
  ds = sft_data.batched(sft_data.pad_examples(ex, T, load_tokenizer(wd).pad_id), B, c.seed)
  real = [int((ds[i]["segment_ids"] > 0).sum()) for i in range(2)]
  for step, r in zip((1, 2), rows):
    assert r["flops/update"] == step * per_step
    assert r["flops/remat"] == 0 and r["flops/generate"] == 0
    assert r["flops/logprob_passes"] == 0 and r["tokens/sampled"] == 0
    assert r["flops/total"] == step * per_step
    assert r["tokens/trained"] == sum(real[:step])
    assert r["samples/completions"] == step * B  # unpacked: one example per row
  assert 0 < real[0] < B * T


@pytest.mark.slow
def test_grpo_counters_equal_a_hand_count(tfds_data_dir, tmp_path):
  from rlhf_jax.launch import load_config
  from rlhf_jax.trainers import grpo
  wd = str(tmp_path)
  c = override(load_config("configs/grpo.py:tiny"), num_steps=1, log_every=1, eval_every=0,
               **{"checkpoint.async_save": False, "data.data_dir": tfds_data_dir,
                  "rollout.stop_at_eos": False, "optimizer.warmup_steps": 0})
  grpo.run(c, wd)
  r = read_metrics(wd)[-1]
  m = _model(wd)
  M, U, A = _per_token(m)
  N, G, P, W = (c.rollout.prompts_per_step, c.rollout.group_size, c.data.max_prompt_len,
                c.rollout.max_new_tokens)
  B, n = N * G, W - 1  # every completion runs to max_new_tokens: W - 1 decode steps
  # sampling: one call of B rows, each group's prompt prefilled once (N rows, last
  # position unembedded), then decode step k of all B rows against P + k keys
  generate = N * (P * M + U + A * P * (P + 1) // 2) + B * sum(M + U + A * (P + k)
                                                              for k in range(1, n + 1))
  # one update per rollout (on-policy: no old-log-prob pass); the reference pass and the
  # update run each group as one packed row: prompt once + G completions, G W unembedded
  S = P + G * W
  forward = N * (S * M + G * W * U + A * S * (S + 1) // 2)
  assert r["flops/generate"] == generate
  assert r["flops/logprob_passes"] == forward
  assert r["flops/update"] == 3 * forward
  assert r["flops/remat"] == 0
  assert r["flops/total"] == generate + 4 * forward
  assert r["tokens/sampled"] == B * W
  assert r["samples/completions"] == B
  assert 0 < r["tokens/trained"] <= B * (P + W) and r["tokens/trained"] >= B * W
  assert np.isfinite(r["loss"])


def _run(path, rows):
  path.mkdir(parents=True)
  with open(path / "metrics.jsonl", "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")


def test_report_equal_compute_interpolates_on_a_flops_grid(tmp_path):
  from rlhf_jax import report, report_robust
  from rlhf_jax.report_runs import discover
  # arm "a": 10 FLOPs a step, logged every 2 steps; arm "b": 30 a step, logged every step;
  # accuracy = FLOPs / 100 for a (seed 1: + 0.1), FLOPs / 200 for b
  root = tmp_path / "sweep"
  for seed, off in ((0, 0.0), (1, 0.1)):
    _run(root / f"a/seed_{seed}", [{"step": s, "flops/total": 10.0 * s,
                                    "eval_accuracy": 10.0 * s / 100 + off}
                                   for s in range(0, 9, 2)])
  for seed in (0, 1):
    _run(root / f"b/seed_{seed}", [{"step": s, "flops/total": 30.0 * s,
                                    "eval_accuracy": 30.0 * s / 200} for s in range(0, 5)])
  groups = {}
  for r in discover([str(root)]):
    groups.setdefault(r.group, []).append(r)
  eq = report_robust.equal_x(groups, "eval_accuracy", points=5, reps=200)
  assert eq["budget"] == 80.0  # a reached 80, b 120
  np.testing.assert_allclose(eq["grid"], [0, 20, 40, 60, 80])
  np.testing.assert_allclose(eq["a"]["mean"], np.array([0, 20, 40, 60, 80]) / 100 + 0.05)
  np.testing.assert_allclose(eq["b"]["mean"], np.array([0, 20, 40, 60, 80]) / 200)  # interpolated
  assert eq["a"]["at_budget"]["mean"] == pytest.approx(0.85)
  assert eq["b"]["at_budget"]["mean_boot_low"] == pytest.approx(0.4)  # equal seeds: no spread
  out = report.write_report([str(root)], str(tmp_path / "rep"), primary="eval_accuracy")
  md = open(out).read()
  assert "## Equal compute" in md and "8e+01 FLOPs" in md.replace("80 FLOPs", "8e+01 FLOPs")
  assert os.path.exists(tmp_path / "rep" / "equal_compute.png")
  assert "vs cumulative `flops/total`" in md  # the scaling fit's default x
  # old runs without the counters: one line, no section
  old = tmp_path / "old"
  for g in ("a", "b"):
    _run(old / g / "seed_0", [{"step": s, "eval_accuracy": 0.1 * s} for s in range(3)])
  md = open(report.write_report([str(old)], str(tmp_path / "rep_old"))).read()
  assert "Not available: some runs log no `flops/total`" in md
  assert not os.path.exists(tmp_path / "rep_old" / "equal_compute.png")


def test_report_equal_samples_and_equal_kl_sections(tmp_path):
  """The other two equal-x axes: samples/completions (cumulative) and the KL metric (measured,
  not monotone: each seed's eval points in order of KL); the baseline group is left out of
  both and drawn as a line; the frontier has a band per group over its own KL range."""
  from rlhf_jax import report, report_robust
  from rlhf_jax.report_runs import discover
  root = tmp_path / "sweep"
  # arm a: 4 completions a step, KL 0.1 a step; arm b: 8 a step, KL 0.3 a step, but b's
  # seed 1 turns back (KL 0, 0.3, 0.2): its points are read in order of KL
  kls = {("a", 0): [0, .1, .2, .3], ("a", 1): [0, .1, .2, .3], ("b", 0): [0, .3, .6, .9],
         ("b", 1): [0, .3, .2, .9]}
  for (g, seed), kl in kls.items():
    per = 4.0 if g == "a" else 8.0
    _run(root / g / f"seed_{seed}", [
        {"step": s, "flops/total": 1.0 * s, "samples/completions": per * s, "eval_kl": kl[s],
         "eval_accuracy": (0.5 + s / 10 if g == "a" else 0.5 + kl[s] / 3)} for s in range(4)])
  _run(root / "sft" / "seed_0", [{"step": 0, "flops/total": 0.0, "samples/completions": 0.0,
                                  "eval_kl": 0.0, "eval_accuracy": 0.5}])
  groups = {}
  for r in discover([str(root)]):
    groups.setdefault(r.group, []).append(r)
  arms = {g: groups[g] for g in ("a", "b")}
  eq = report_robust.equal_x(arms, "eval_accuracy", "samples/completions", points=4, reps=100)
  assert eq["budget"] == 12.0  # a reached 12 completions, b 24
  np.testing.assert_allclose(eq["a"]["mean"], [0.5, 0.6, 0.7, 0.8])
  # b at 0, 4, 8, 12 completions = steps 0, 0.5, 1, 1.5: KL interpolated per seed
  kl_b = np.array([[0, .15, .3, .45], [0, .15, .3, .25]])
  np.testing.assert_allclose(eq["b"]["mean"], (0.5 + kl_b / 3).mean(0))
  kl = report_robust.equal_x(arms, "eval_accuracy", "eval_kl", points=4, reps=100)
  assert kl["budget"] == pytest.approx(0.3)
  # a: accuracy = 0.5 + KL; b: 0.5 + KL / 3, seed 1's points sorted (0.2 before 0.3)
  np.testing.assert_allclose(kl["a"]["mean"], [0.5, 0.6, 0.7, 0.8])
  np.testing.assert_allclose(kl["b"]["mean"], 0.5 + np.array([0, .1, .2, .3]) / 3)
  fr = report_robust.frontier(arms, "eval_accuracy", "eval_kl", points=4, reps=100)
  assert fr["a"]["budget"] == pytest.approx(0.3) and fr["b"]["budget"] == pytest.approx(0.9)
  np.testing.assert_allclose(fr["b"]["b"]["mean"], 0.5 + np.array([0, .3, .6, .9]) / 3)
  out = report.write_report([str(root)], str(tmp_path / "rep"), primary="eval_accuracy",
                            kl="eval_kl", reward="eval_accuracy", baselines="sft")
  md = open(out).read()
  for section in ("## Equal compute", "## Equal samples", "## Equal KL"):
    assert section in md
  assert "baselines left out: `sft`" in md
  for png in ("equal_compute.png", "equal_samples.png", "equal_kl.png", "frontier.png"):
    assert os.path.exists(tmp_path / "rep" / png), png
  rows = list(csv.DictReader(open(tmp_path / "rep" / "equal_x.csv")))
  assert {(r["axis"], r["group"]) for r in rows} == {(a, g) for a in ("compute", "samples", "KL")
                                                     for g in ("a", "b")}
  at = {(r["axis"], r["group"]): float(r["mean"]) for r in rows}
  assert at["samples", "b"] == pytest.approx((0.5 + kl_b[:, 3] / 3).mean())
  assert at["KL", "a"] == pytest.approx(0.8)
  with pytest.raises(report.ReportError, match="unknown group 'nope'"):
    report.write_report([str(root)], str(tmp_path / "rep2"), baselines="nope")
