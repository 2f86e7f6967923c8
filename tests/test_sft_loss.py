"""SFT loss and gradient accumulation vs a float64 numpy reference."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from ml_collections import ConfigDict

from rlhf_jax.losses.logprobs import masked_mean, shift_for_next_token, token_logprobs
from rlhf_jax.losses.sft import sft_loss


def np_log_softmax(x):
  x = x.astype(np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def np_sft_loss(logits, tokens, mask):
  """Token-mean NLL of tokens[t+1] under softmax(logits[t]) where mask[t+1] = 1."""
  lp = np_log_softmax(logits[:, :-1])
  tgt = tokens[:, 1:]
  m = mask[:, 1:].astype(np.float64)
  nll = -np.take_along_axis(lp, tgt[..., None], -1)[..., 0]
  return (nll * m).sum() / max(m.sum(), 1.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sft_loss_matches_numpy_ragged(seed):
  rng = np.random.default_rng(seed)
  B, T, V = 5, 9, 13
  logits = rng.normal(size=(B, T, V)).astype(np.float32) * 3
  tokens = rng.integers(0, V, size=(B, T))
  prompt = rng.integers(1, T - 1, size=B)
  length = np.maximum(prompt + 1, rng.integers(2, T + 1, size=B))
  idx = np.arange(T)[None]
  mask = ((idx >= prompt[:, None]) & (idx < length[:, None])).astype(np.int32)
  loss, metrics = sft_loss(*shift_for_next_token(jnp.asarray(logits), jnp.asarray(tokens),
                                                 jnp.asarray(mask)))
  np.testing.assert_allclose(float(loss), np_sft_loss(logits, tokens, mask), rtol=1e-5)
  assert float(metrics["num_tokens"]) == mask[:, 1:].sum()


def test_sft_loss_degenerate_all_masked_is_zero_not_nan():
  logits = jnp.zeros((2, 4, 7))
  loss, m = sft_loss(logits, jnp.zeros((2, 4), jnp.int32), jnp.zeros((2, 4)))
  assert float(loss) == 0.0 and float(m["num_tokens"]) == 0.0


def test_token_logprobs_temperature_and_extremes():
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(3, 4, 11)).astype(np.float32) * 50  # large logits: stable?
  tgt = rng.integers(0, 11, size=(3, 4))
  for temp in (1.0, 0.7):
    got = np.asarray(token_logprobs(jnp.asarray(logits), jnp.asarray(tgt), temp))
    want = np.take_along_axis(np_log_softmax(logits / temp), tgt[..., None], -1)[..., 0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
  assert np.isfinite(got).all()


def test_masked_mean():
  x = np.arange(6.0).reshape(2, 3)
  m = np.array([[1, 0, 1], [0, 0, 0]])
  assert float(masked_mean(jnp.asarray(x), jnp.asarray(m))) == pytest.approx((0 + 2) / 2)
  np.testing.assert_allclose(masked_mean(jnp.asarray(x), jnp.asarray(m), axis=1), [1.0, 0.0])


def test_gradient_accumulation_equals_full_batch():
  from rlhf_jax.models import ModelConfig, Transformer
  from rlhf_jax.trainers import sft
  cfg = ModelConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1,
                    head_dim=8, d_ff=32)
  model = Transformer(cfg)
  # SGD with lr 1: the parameter change *is* the gradient, so this compares gradients.
  tx = optax.sgd(1.0)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))["params"]
  import flax.linen as nn
  params = nn.meta.unbox(params)
  state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
  rng = np.random.default_rng(0)
  B, T = 4, 10
  lengths = np.array([10, 3, 7, 5])  # ragged: micro-batches hold different token counts
  seg = (np.arange(T)[None] < lengths[:, None]).astype(np.int32)
  batch = {"tokens": jnp.asarray(rng.integers(0, 32, size=(B, T)) * seg, jnp.int32),
           "segment_ids": jnp.asarray(seg), "loss_mask": jnp.asarray(seg)}
  s1, m1 = jax.jit(sft.make_train_step(model, tx, 1))(state, batch)
  s2, m2 = jax.jit(sft.make_train_step(model, tx, 2))(state, batch)
  np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-6)
  for a, b, p in zip(jax.tree.leaves(s1["params"]), jax.tree.leaves(s2["params"]),
                     jax.tree.leaves(params)):
    g1, g2 = np.asarray(p) - np.asarray(a), np.asarray(p) - np.asarray(b)
    np.testing.assert_allclose(g2, g1, atol=1e-6, rtol=1e-4)
  assert max(float(np.abs(np.asarray(p) - np.asarray(a)).max())
             for a, p in zip(jax.tree.leaves(s1["params"]), jax.tree.leaves(params))) > 1e-3
  # and the reported loss is the numpy token-mean over the whole batch
  logits = np.asarray(model.apply({"params": params}, batch["tokens"], batch["segment_ids"])[0])
  np.testing.assert_allclose(float(m1["loss"]),
                             np_sft_loss(logits, np.asarray(batch["tokens"]), seg), rtol=1e-5)
