"""Issue #20: sliding-window attention, soft-capping, sandwich norms (Gemma 2 / 3, Mistral).

The logits of each family against the independent float64 numpy forward are checked in
test_model.py (`FAMILIES` in its CONFIGS); here: the chunked backend against dense with a
window and a soft-cap (forward and gradients), cached decoding with windows against the
full forward, shared-prefix packing with windows, and the backends that are refused.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.models import ModelConfig, Transformer, init_cache, lm_logits
from rlhf_jax.models import attention as A
from rlhf_jax.models import attention_chunked as AC
from rlhf_jax.models import attention_mask as AM
from test_model import FAMILIES, random_params


def test_window_and_softcap_chunked_equals_dense_forward_and_gradients():
  rng = np.random.default_rng(0)
  B, T, H, K, Dh = 2, 37, 4, 2, 8
  seg = np.ones((B, T), np.int32)
  seg[0, :5] = 0                       # left padding
  seg[1, 20:] = 2                      # two packed sequences
  mask = AM.causal_mask(jnp.asarray(seg)).replace(window=jnp.int32(6))
  q, k, v = (jnp.asarray(rng.normal(size=s) * 2, jnp.float32)
             for s in ((B, T, H, Dh), (B, T, K, Dh), (B, T, K, Dh)))
  w = jnp.asarray(rng.normal(size=(B, T, H, Dh)), jnp.float32) * (seg > 0)[:, :, None, None]

  def run(backend, q, k, v):
    if backend == "dense":
      return A._dense(q, k, v, mask, 0.3, None, None, softcap=1.5)
    return AC._chunked(q, k, v, mask, 0.3, None, None, 8, 8, softcap=1.5)

  loss = lambda backend: jax.jit(jax.value_and_grad(
      lambda q, k, v: jnp.sum(run(backend, q, k, v) * w), argnums=(0, 1, 2)))(q, k, v)
  (lc, gc), (ld, gd) = loss("chunked"), loss("dense")
  np.testing.assert_allclose(lc, ld, rtol=1e-5)
  for a, b in zip(gc, gd):
    np.testing.assert_allclose(a, b, atol=1e-5 * np.abs(b).max())
  # The window and the cap matter: without them the output differs.
  plain = A._dense(q, k, v, mask.replace(window=None), 0.3, None, None)
  assert np.abs(np.asarray(run("dense", q, k, v) - plain)).max() > 0.1


@pytest.mark.parametrize("name", ["gemma3_like", "mistral_like"])
def test_cached_decoding_with_windows_equals_full_forward(name):
  c = FAMILIES[name]
  params = random_params(c, 3)
  model = Transformer(c)
  T, prefill = 14, 7                    # longer than the windows (4 and 6)
  lengths = np.array([14, 9])
  B = len(lengths)
  mask = (np.arange(T)[None, :] >= T - lengths[:, None]).astype(np.int32)
  tokens = np.where(mask > 0, np.random.default_rng(6).integers(1, c.vocab_size, (B, T)), 0)
  positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
  full = np.asarray(lm_logits(c, params, tokens, mask))

  @jax.jit
  def cached(tokens_BT, positions_BT, cache, index):
    return model.apply({"params": params}, tokens_BT, positions_BT=positions_BT, cache=cache,
                       cache_index=index, kv_mask_BS=jnp.asarray(mask))

  cache = init_cache(c, B, T)
  logits, cache = cached(tokens[:, :prefill], positions[:, :prefill], cache, 0)
  steps = [np.asarray(logits)]
  for t in range(prefill, T):
    logits, cache = cached(tokens[:, t:t + 1], positions[:, t:t + 1], cache, t)
    steps.append(np.asarray(logits))
  got = np.concatenate(steps, axis=1)
  np.testing.assert_allclose(np.where(mask[..., None] > 0, got, 0),
                             np.where(mask[..., None] > 0, full, 0), atol=1e-4, rtol=1e-4)


def test_greedy_generate_with_windows_equals_full_forward():
  from rlhf_jax import sampling
  c = FAMILIES["gemma2_like"]
  params = random_params(c, 4)
  prompt = np.random.default_rng(7).integers(1, c.vocab_size, (1, 5))
  res = sampling.generate(c, params, prompt, np.ones_like(prompt), jax.random.PRNGKey(0),
                          max_new_tokens=6, greedy=True, eos_id=None, pad_id=0)
  seq = list(prompt[0])
  for _ in range(6):                   # windows 5 < 11 tokens: the cache must honour them
    seq.append(int(np.argmax(np.asarray(lm_logits(c, params, np.array([seq])))[0, -1])))
  assert [int(t) for t in res.tokens_BN[0]] == seq[5:]


def test_shared_prefix_with_windows_equals_separate_runs():
  c = FAMILIES["mistral_like"]
  params = random_params(c, 5)
  rng = np.random.default_rng(8)
  prefix, c1, c2 = (rng.integers(1, c.vocab_size, n) for n in (7, 5, 4))
  tokens = np.concatenate([prefix, c1, c2])[None]
  seg = np.array([[1] * 7 + [2] * 5 + [3] * 4])
  pos = np.array([list(range(7)) + list(range(7, 12)) + list(range(7, 11))])
  packed, _ = Transformer(c).apply({"params": params}, jnp.asarray(tokens), jnp.asarray(seg),
                                   jnp.asarray(pos), shared_prefix=True)
  for cont, cols in ((c1, slice(7, 12)), (c2, slice(12, 16))):
    alone = np.asarray(lm_logits(c, params, np.concatenate([prefix, cont])[None]))[0]
    np.testing.assert_allclose(np.asarray(packed)[0, cols], alone[7:], atol=1e-4, rtol=1e-4)


def test_backends_without_window_or_softcap_are_refused():
  for backend, platform, dtype in (("cudnn", "gpu", jnp.bfloat16), ("splash", "tpu", None)):
    for feature in ("window", "softcap"):
      with pytest.raises(ValueError, match=f"model.attention='{backend}' does not support "
                                           f"{feature}"):
        A.resolve(backend, "causal", platform, dtype=dtype, features={feature})
  feats = A.model_features(FAMILIES["gemma2_like"])
  assert feats == {"window", "softcap"}
  assert A.model_features(ModelConfig()) == frozenset()
  assert A.resolve("auto", "causal", "tpu", kv_len=64, features=feats) == "dense"
  assert A.resolve("auto", "causal", "gpu", kv_len=64, dtype=jnp.bfloat16,
                   features=feats) == "dense"
  with pytest.raises(ValueError, match="window_pattern"):
    ModelConfig(window_pattern="LLG")           # a pattern needs a window
  with pytest.raises(ValueError, match="window_pattern"):
    ModelConfig(sliding_window=4, window_pattern="LX")
  assert FAMILIES["gemma3_like"].local_layers == (True, True, False)
  assert dataclasses.replace(FAMILIES["gemma3_like"], n_layers=7).local_layers == (
      True, True, False, True, True, False, True)
