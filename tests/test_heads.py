"""Scalar head / reward-model backbone."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.models import (ModelConfig, ScalarHead, ScalarModel, Transformer,
                             backbone_params_from_lm, init_params, init_scalar_params,
                             last_token_score)

CFG = ModelConfig(vocab_size=48, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                  d_ff=64, tie_embeddings=False)


def _np_last_token_score(values, mask):
  out = np.zeros(values.shape[0], np.float32)
  for b in range(values.shape[0]):
    idx = np.flatnonzero(mask[b])
    if len(idx):
      out[b] = values[b, idx[-1]]
  return out


def test_last_token_score_numpy():
  rng = np.random.default_rng(0)
  values = rng.normal(size=(6, 7)).astype(np.float32)
  mask = np.array([
      [0, 0, 0, 1, 1, 1, 1],     # left padded
      [1, 1, 1, 0, 0, 0, 0],     # right padded
      [1, 1, 1, 1, 1, 1, 1],     # full
      [0, 1, 1, 1, 0, 0, 0],     # both sides
      [0, 0, 0, 0, 0, 0, 0],     # empty -> 0
      [1, 0, 1, 1, 0, 1, 0],     # ragged with holes
  ])
  for m in (mask, mask.astype(bool), mask.astype(np.float32)):
    got = last_token_score(jnp.asarray(values), jnp.asarray(m))
    assert got.dtype == jnp.float32 and got.shape == (6,)
    np.testing.assert_array_equal(np.asarray(got), _np_last_token_score(values, mask))
  with pytest.raises(ValueError, match="must both be"):
    last_token_score(jnp.asarray(values), jnp.asarray(mask[:, 1:]))


def _fill(shapes, seed):
  """Random normal arrays of the given shape tree (cheaper than running init)."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda x: jnp.asarray(0.3 * rng.normal(size=x.shape), x.dtype), shapes)


@pytest.fixture(scope="module")
def lm_and_scalar_params():
  lm = _fill(jax.eval_shape(lambda: init_params(CFG, jax.random.PRNGKey(0))), 0)
  scalar = _fill(jax.eval_shape(lambda: init_scalar_params(CFG, jax.random.PRNGKey(1))), 1)
  return lm, scalar


def test_backbone_tree_is_lm_minus_lm_head(lm_and_scalar_params):
  lm, scalar = lm_and_scalar_params
  assert set(scalar) == {"backbone", "head"}
  assert "lm_head" in lm and "lm_head" not in scalar["backbone"]
  shapes = lambda t: jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), t)
  assert shapes(scalar["backbone"]) == shapes(backbone_params_from_lm(lm))
  assert shapes(scalar["head"]) == {"dense": {"kernel": ((CFG.d_model, 1), jnp.float32),
                                              "bias": ((1,), jnp.float32)}}
  tied = dataclasses.replace(CFG, tie_embeddings=True)
  tied_lm = jax.eval_shape(lambda: init_params(tied, jax.random.PRNGKey(0)))
  tied_scalar = jax.eval_shape(lambda: init_scalar_params(tied, jax.random.PRNGKey(0)))
  assert shapes(tied_scalar["backbone"]) == shapes(tied_lm)


def test_head_logical_axes():
  boxed = jax.eval_shape(lambda: init_scalar_params(CFG, jax.random.PRNGKey(0), boxed=True))
  kernel = boxed["head"]["dense"]["kernel"]
  assert isinstance(kernel, nn.Partitioned) and kernel.names == ("embed", None)


def test_scalar_model_values(lm_and_scalar_params):
  lm, scalar = lm_and_scalar_params
  params = {"backbone": backbone_params_from_lm(lm), "head": scalar["head"]}
  T, lengths = 9, np.array([9, 4, 6])
  B = len(lengths)
  mask = (np.arange(T)[None, :] >= T - lengths[:, None]).astype(np.int32)   # left padded
  tokens = np.where(mask > 0, np.random.default_rng(2).integers(1, CFG.vocab_size, (B, T)), 0)

  apply = jax.jit(lambda p, t, s: ScalarModel(CFG).apply({"params": p}, t, s))
  values = apply(params, tokens, mask)
  assert values.shape == (B, T) and values.dtype == jnp.float32

  # Same as the LM's final hidden states through the head, by hand.
  h, _ = jax.jit(lambda p: Transformer(CFG).apply({"params": p}, tokens, mask,
                                                  output="hidden"))(lm)
  k, c = scalar["head"]["dense"]["kernel"], scalar["head"]["dense"]["bias"]
  want = np.asarray(h, np.float64) @ np.asarray(k, np.float64)[:, 0] + float(c[0])
  np.testing.assert_allclose(np.where(mask > 0, values, 0), np.where(mask > 0, want, 0),
                             atol=1e-5, rtol=1e-5)

  # A left-padded row scores like the same sequence alone (reward model use).
  scores = np.asarray(last_token_score(values, mask))
  alone = apply(params, tokens[1:2, T - lengths[1]:], None)
  np.testing.assert_allclose(scores[1], np.asarray(alone)[0, -1], atol=1e-5, rtol=1e-5)


def test_scalar_head_float32_from_bfloat16():
  head = ScalarHead(init_std=0.0)
  h = jnp.ones((2, 3, 8), jnp.bfloat16)
  params = head.init(jax.random.PRNGKey(0), h)
  out = head.apply(params, h)
  assert out.dtype == jnp.float32 and out.shape == (2, 3)
  np.testing.assert_array_equal(np.asarray(out), 0.0)


def test_a_subtree_of_the_init_is_the_whole_inits():
  """`state_lib.unboxed_init(path=...)`: the trainers' fresh scalar head computed alone
  (jit drops the rest) has the bytes of the whole init's head."""
  from rlhf_jax.trainers import state as state_lib
  model, rng, dummy = ScalarModel(CFG), jax.random.PRNGKey(3), jnp.zeros((1, 2), jnp.int32)
  whole = state_lib.unboxed_init(model, rng, dummy)
  head = state_lib.unboxed_init(model, rng, dummy, path=("head",))
  assert jax.tree.structure(head) == jax.tree.structure(whole["head"])
  for a, b in zip(jax.tree.leaves(head), jax.tree.leaves(whole["head"])):
    assert a.dtype == b.dtype and np.asarray(a).tobytes() == np.asarray(b).tobytes()
  assert float(jnp.abs(head["dense"]["kernel"]).sum()) > 0  # random, not zeros
