"""data.pad_to (issue #22): batches cut to their longest row or to a bucket boundary give
the same step as the fixed max-length padding on the same rows (padding is masked).

SGD with learning rate 1 makes the parameter change the gradient itself, so comparing the
updated parameters compares gradients (as in tests/test_grad_accum.py)."""
from __future__ import annotations

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from ml_collections import ConfigDict

from rlhf_jax import config as config_lib
from rlhf_jax import trainers
from rlhf_jax.data import lengths
from rlhf_jax.launch import load_config
from rlhf_jax.models import ModelConfig, Transformer
from rlhf_jax.models.heads import ScalarModel
from rlhf_jax.trainers import dpo, prm, reward_model, sft

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = ModelConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1,
                  head_dim=8, d_ff=32)
TX = optax.sgd(1.0)
T = 16
PADS = {"longest": lengths.Padding("longest", T, multiple=4),
        "bucket": lengths.Padding("bucket", T, boundaries=(8, 12, T))}


# ----------------------------------------------------------------------------
# Pure functions
# ----------------------------------------------------------------------------

def _shares(lens, batch_size, bounds, rng, n=2000):
  """Fraction of random batches (rows drawn without replacement) padded to each bound."""
  picks = np.asarray([lengths.padded_length(rng.choice(lens, batch_size, replace=False).max(),
                                            "bucket", bounds[-1], bounds) for _ in range(n)])
  return {b: float(np.mean(picks == b)) for b in bounds}


def test_auto_buckets_from_a_skewed_length_distribution():
  """HH-RLHF-like: 2,312 pairs, 5 longer than 768 of 1024 tokens, batches of 32: a batch's
  longest row is nearly always ~700, so two shapes, and only batches holding one of the
  5 long rows (1 - (1 - 5/2312)^32 = 6.7%) pay for 1024."""
  rng = np.random.default_rng(0)
  lens = np.concatenate([rng.integers(60, 700, size=2307), [800, 900, 1000, 1024, 1024]])
  b = lengths.auto_buckets(lens, 32, 1024, multiple=64)
  assert b == (704, 1024)
  assert _shares(lens, 32, b, rng)[1024] == pytest.approx(1 - (1 - 5 / 2312) ** 32, abs=0.02)
  # A long-tailed (log-normal) distribution: four buckets, about a quarter of the batches
  # in each (rounding to 64 moves the shares a little).
  lens = np.minimum(rng.lognormal(5.3, 0.6, size=2312).astype(int), 1024)
  b = lengths.auto_buckets(lens, 32, 1024, multiple=64)
  assert len(b) == 4 and b[-1] == 1024 and all(x % 64 == 0 for x in b)
  for share in _shares(lens, 32, b, rng).values():
    assert share == pytest.approx(0.25, abs=0.08)
  # Degenerate inputs: every row the same length; no rows.
  assert lengths.auto_buckets([20] * 50, 8, 64) == (24, 64)
  assert lengths.auto_buckets([], 8, 64) == (64,)


def test_padded_length_row_lengths_and_cut():
  assert lengths.padded_length(5, "max", 16) == 16
  assert [lengths.padded_length(n, "longest", 16, multiple=4) for n in (0, 1, 4, 5, 15, 16)] == [
      4, 4, 4, 8, 16, 16]
  assert [lengths.padded_length(n, "bucket", 16, (8, 12)) for n in (3, 8, 9, 13)] == [8, 8, 12, 16]
  seg = np.array([[1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0], [0] * 6])
  arrays = {"chosen_segment_ids": seg, "rejected_segment_ids": seg[[1, 0, 2]],
            "chosen_tokens": seg * 7, "margin": np.zeros(3)}
  np.testing.assert_array_equal(lengths.row_lengths(arrays), [4, 4, 0])
  out = lengths.cut(arrays, 4, 6)
  assert out["chosen_tokens"].shape == (3, 4) and out["margin"].shape == (3,)
  assert lengths.cut(arrays, 6, 6) is arrays
  p = lengths.Padding("bucket", 6, boundaries=(2, 4, 6))
  assert p(arrays)["chosen_segment_ids"].shape == (3, 4) and p.seen == {"train": {4: 1}}


def test_max_is_the_default_and_leaves_batches_untouched():
  for name in ("sft", "rm", "dpo", "prm"):
    c = load_config(os.path.join(ROOT, f"configs/{name}.py:tiny"))
    assert (c.data.pad_to, tuple(c.data.buckets), c.data.pad_multiple) == ("max", (), 8)
  p = lengths.from_config(c.data, [3, 4], 2, 128)
  batch = {"tokens": np.zeros((2, 128), np.int32), "segment_ids": np.ones((2, 128), np.int32)}
  assert p(batch) is batch and p.seen == {}


def test_from_config_buckets_given_or_chosen():
  d = ConfigDict({"pad_to": "bucket", "buckets": (8, 12), "pad_multiple": 4})
  assert lengths.from_config(d, [3], 4, T).boundaries == (8, 12, T)
  d.buckets = ()
  assert lengths.from_config(d, [3, 5, 6, 7] * 10, 4, T).boundaries == (8, T)


@pytest.mark.parametrize("args,match", [
    (dict(pad_to="short"), "config.data.pad_to='short'"),
    (dict(pad_multiple=0), "config.data.pad_multiple"),
    (dict(pad_to="bucket", buckets=(16, 8)), "config.data.buckets: boundaries must be strictly"),
    (dict(pad_to="bucket", buckets=(0, 8)), "config.data.buckets: every boundary must be >= 1"),
    (dict(pad_to="bucket", buckets=(8, 99)), "config.data.buckets: boundary 99 exceeds"),
    (dict(buckets=(8,)), "config.data.buckets: set with data.pad_to='max'"),
])
def test_validation_names_the_key(args, match):
  c = load_config(os.path.join(ROOT, "configs/dpo.py:tiny"))
  c.data.update(args)
  with pytest.raises(config_lib.ConfigError, match=match.replace("(", r"\(")):
    trainers.validate(c)


# ----------------------------------------------------------------------------
# One step: pad_to = longest / bucket equals max on the same rows
# ----------------------------------------------------------------------------

def _state(model):
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))["params"])
  return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": TX.init(params)}


def _rows(rng, lens, start=0, tokens=None):
  seg = (np.arange(T)[None] < np.asarray(lens)[:, None]).astype(np.int32)
  if tokens is None:
    tokens = rng.integers(3, CFG.vocab_size, size=(len(lens), T))
  return (tokens * seg).astype(np.int32), seg, (seg * (np.arange(T)[None] >= start)).astype(np.int32)


def _assert_same_step(step_fn, state, *args, expect_len):
  """step_fn(state, *args, batch) under every PADS entry equals it on the max-padded batch
  (one jitted function: one compilation per shape; longest and bucket share theirs)."""
  *consts, batch = args
  f = jax.jit(step_fn)
  s_max, m_max = f(state, *consts, batch)
  for name, pad in PADS.items():
    cut = pad(batch)
    assert max(v.shape[1] for v in cut.values() if np.ndim(v) == 2) == expect_len, name
    s, m = f(state, *consts, cut)
    for a, b in zip(jax.tree.leaves(s["params"]), jax.tree.leaves(s_max["params"])):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6, rtol=1e-5)
    assert set(m) == set(m_max)
    for k in m:
      np.testing.assert_allclose(float(m[k]), float(m_max[k]), rtol=2e-5, atol=1e-6, err_msg=k)
  assert f._cache_size() == 2  # max and the one cut shape
  return m_max


def test_sft_step_same_as_max_padding():
  model = Transformer(CFG)
  tok, seg, mask = _rows(np.random.default_rng(0), [9, 4, 7, 6], start=3)
  batch = {"tokens": tok, "segment_ids": seg, "loss_mask": mask}
  m = _assert_same_step(sft.make_train_step(model, TX), _state(model), batch, expect_len=12)
  assert float(m["num_tokens"]) == (mask[:, 1:]).sum()


@pytest.mark.parametrize("window,accum", [(0, 2), (8, 1)])  # 8: dpo.share_prompt's packed rows
def test_dpo_step_same_as_max_padding(window, accum):
  model = Transformer(CFG)
  d = load_config(os.path.join(ROOT, "configs/dpo.py:tiny")).dpo
  rng = np.random.default_rng(1)
  prompt = rng.integers(3, CFG.vocab_size, size=(4, T))
  batch = {"margin": np.zeros(4, np.float32)}
  for side, lens in (("chosen", [7, 5, 8, 6]), ("rejected", [6, 7, 4, 8])):
    tokens = np.concatenate([prompt[:, :3], rng.integers(3, CFG.vocab_size, (4, T - 3))], 1)
    tok, seg, mask = _rows(rng, lens, start=3, tokens=tokens)
    batch.update({f"{side}_tokens": tok, f"{side}_segment_ids": seg, f"{side}_loss_mask": mask})
  state = _state(model)
  ref = jax.tree.map(lambda p: p * 0.9, state["params"])  # a reference unlike the policy
  _assert_same_step(dpo.make_train_step(model, TX, d, window=window, grad_accum_steps=accum),
                    state, ref, batch, expect_len=8)


def test_reward_model_and_prm_outputs_same_as_max_padding():
  """Their eval functions (forward only: the steps are the same code as above)."""
  model = ScalarModel(CFG)
  params = _state(model)["params"]
  rng = np.random.default_rng(2)
  ct, cs, _ = _rows(rng, [10, 3, 7, 5])
  rt, rs, _ = _rows(rng, [4, 9, 2, 11])
  batch = {"chosen_tokens": ct, "chosen_segment_ids": cs, "rejected_tokens": rt,
           "rejected_segment_ids": rs, "margin": np.asarray([0.5, 0.0, 1.0, 0.25], np.float32)}
  f = jax.jit(reward_model.make_eval_step(model))
  want = f(params, batch)
  for pad in PADS.values():
    np.testing.assert_allclose(f(params, pad(batch)), want, rtol=1e-5, atol=1e-6)
  tokens, seg, _ = _rows(rng, [6, 3, 5, 2])
  g = jax.jit(lambda p, b: prm.step_logits(model, p, b))
  batch = {"tokens": tokens, "segment_ids": seg}
  want = np.asarray(g(params, batch))
  for pad in PADS.values():
    got = np.asarray(g(params, pad(batch)))
    assert got.shape == (4, 8)
    real = seg[:, :8] > 0  # values at padding are never read (masked)
    np.testing.assert_allclose(np.where(real, got, 0.0), np.where(real, want[:, :8], 0.0),
                               rtol=1e-5, atol=1e-5)


def test_flops_counters_follow_the_padded_shape():
  """compute_counts sees the batch as the step ran it: FLOPs of [B, cut length], the same
  real tokens."""
  from rlhf_jax import flops as flops_lib
  tok, seg, mask = _rows(np.random.default_rng(3), [9, 4, 7, 6], start=3)
  batch = {"tokens": tok, "segment_ids": seg, "loss_mask": mask}
  full, cut = sft.compute_counts(CFG, batch), sft.compute_counts(CFG, PADS["bucket"](batch))
  assert cut["tokens/trained"] == full["tokens/trained"] == 26
  assert cut["flops/update"] == flops_lib.train_flops(CFG, 4, 12, 12)[0] < full["flops/update"]
  pairs = {f"{s}_{k}": v for s in ("chosen", "rejected")
           for k, v in zip(("tokens", "segment_ids", "loss_mask"), (tok, seg, mask))}
  d = load_config(os.path.join(ROOT, "configs/dpo.py:tiny")).dpo
  full, cut = dpo.compute_counts(CFG, d, pairs), dpo.compute_counts(CFG, d, PADS["longest"](pairs))
  assert cut["tokens/trained"] == full["tokens/trained"]
  assert cut["flops/update"] == flops_lib.train_flops(CFG, 8, 12)[0] < full["flops/update"]
