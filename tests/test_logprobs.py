"""sequence_logprobs / per_token_logprobs vs a float64 numpy reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.losses.logprobs import per_token_logprobs, sequence_logprobs


def np_log_softmax(x):
  x = x.astype(np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def np_sequence_logprobs(logits, tokens, mask, temperature=1.0):
  """Loop form: token t (t >= 1, mask[b, t] = 1) scored by softmax(logits[b, t-1] / temp)."""
  B, T, _ = logits.shape
  s = np.zeros(B)
  n = np.zeros(B)
  for b in range(B):
    for t in range(1, T):
      if mask[b, t]:
        s[b] += np_log_softmax(logits[b, t - 1] / temperature)[tokens[b, t]]
        n[b] += 1
  return s, s / np.maximum(n, 1), n


def ragged_mask(rng, B, T, left_pad):
  """Rows of [pad..., prompt..., completion...] (left) or [prompt, completion, pad] (right)."""
  mask = np.zeros((B, T), np.int32)
  for b in range(B):
    length = rng.integers(2, T + 1)
    prompt = rng.integers(1, length)
    start = T - length if left_pad else 0
    mask[b, start + prompt:start + length] = 1
  mask[0] = 0  # a row with no completion tokens: sum 0, mean 0, count 0
  return mask


@pytest.mark.parametrize("left_pad", [False, True])
@pytest.mark.parametrize("seed,scale,temperature", [(0, 1.0, 1.0), (1, 3.0, 0.7), (2, 40.0, 1.0)])
def test_sequence_logprobs_ragged(left_pad, seed, scale, temperature):
  rng = np.random.default_rng(seed)
  B, T, V = 6, 10, 17
  logits = (rng.normal(size=(B, T, V)) * scale).astype(np.float32)
  tokens = rng.integers(0, V, size=(B, T))
  mask = ragged_mask(rng, B, T, left_pad)
  got = sequence_logprobs(jnp.asarray(logits), jnp.asarray(tokens), jnp.asarray(mask), temperature)
  want = np_sequence_logprobs(logits, tokens, mask, temperature)
  for g, w in zip(got, want):
    assert g.dtype == jnp.float32 and g.shape == (B,)
    np.testing.assert_allclose(np.asarray(g), w, rtol=1e-5, atol=1e-4 * scale)
  assert float(got[2][0]) == 0.0 and float(got[0][0]) == 0.0


def test_first_token_mask_ignored_and_bf16_logits():
  rng = np.random.default_rng(4)
  B, T, V = 6, 10, 17
  logits = rng.normal(size=(B, T, V)).astype(np.float32)
  tokens = rng.integers(0, V, size=(B, T))
  mask = np.ones((B, T), np.int32)
  s, m, n = sequence_logprobs(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(tokens), jnp.asarray(mask))
  assert s.dtype == jnp.float32 and np.all(np.asarray(n) == T - 1)
  logits_bf = np.asarray(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32))
  np.testing.assert_allclose(np.asarray(s), np_sequence_logprobs(logits_bf, tokens, mask)[0], rtol=1e-5)


def test_per_token_logprobs_shapes_and_masked_zeros():
  rng = np.random.default_rng(5)
  B, T, V = 6, 10, 17
  logits = rng.normal(size=(B, T, V)).astype(np.float32)
  logits[:, :, 0] = -np.inf  # token 0 impossible; masked positions pointing at it must not NaN
  tokens = rng.integers(1, V, size=(B, T))
  mask = ragged_mask(rng, B, T, left_pad=False)
  tokens[mask == 0] = 0
  lp, m = per_token_logprobs(jnp.asarray(logits), jnp.asarray(tokens), jnp.asarray(mask))
  assert lp.shape == (B, T - 1) and m.shape == (B, T - 1) and lp.dtype == jnp.float32
  lp, m = np.asarray(lp), np.asarray(m)
  assert np.all(lp[m == 0] == 0.0) and np.isfinite(lp).all()
  want = np.take_along_axis(np_log_softmax(logits[:, :-1]), tokens[:, 1:, None], -1)[..., 0]
  np.testing.assert_allclose(lp[m > 0], want[m > 0], rtol=1e-5)


def test_sequence_logprobs_gradient_finite_and_masked():
  rng = np.random.default_rng(6)
  B, T, V = 6, 10, 17
  logits = jnp.asarray(rng.normal(size=(B, T, V)).astype(np.float32) * 30)
  tokens = jnp.asarray(rng.integers(0, V, size=(B, T)))
  mask = jnp.asarray(ragged_mask(rng, B, T, left_pad=True))
  g = jax.jit(jax.grad(lambda l: jnp.sum(sequence_logprobs(l, tokens, mask)[1])))(logits)
  g = np.asarray(g)
  assert np.isfinite(g).all()
  # logits at t only matter if token t+1 is scored
  unused = np.asarray(mask)[:, 1:] == 0
  assert np.all(g[:, :-1][unused] == 0) and np.all(g[:, -1] == 0)
