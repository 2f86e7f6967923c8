"""Attention backends (rlhf_jax/models/attention.py) against the dense reference.

Every backend x every mask kind it claims: forward and gradients equal `dense` (float32,
random ragged inputs, <= 1e-5 relative to the largest entry) on every query that sees at
least one key (a query that sees none -- padding -- is unspecified but finite). cudnn
runs its adapter through XLA (`implementation=None`: same call, same mask) and splash
the Pallas kernel in interpret mode, since neither device exists on CPU; the device
check (experiments/accelerator) compares the real kernels on a GPU.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.config import ConfigError
from rlhf_jax.models import ModelConfig, attention as A, init_params, lm_logits
from rlhf_jax.models import attention_chunked as AC, attention_kernels as AK
from rlhf_jax.models import attention_mask as AM
from rlhf_jax.models.segments import pack_shared_prefix
from rlhf_jax.models.transformer import Transformer
from rlhf_jax.sampling import generate

B, H, K, DH = 3, 4, 2, 16
TOL = 1e-5


def _rel(a, b, rows=None):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if rows is not None:
    a, b = a[rows], b[rows]
  return np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)


def _ragged_segments(T, rng):
  """Left padding, packed segments and a right-padded row."""
  seg = np.ones((B, T), np.int32)
  seg[0, :rng.integers(1, T // 3)] = 0                  # left padding
  cut = rng.integers(T // 3, 2 * T // 3)
  seg[1, cut:] = 2                                      # two packed sequences
  seg[1, cut + (T - cut) // 2:] = 3                     # three
  seg[2, rng.integers(2 * T // 3, T):] = 0              # right padding
  return seg


def _shared_prefix_segments(T, rng):
  """[padding | prefix (1) | continuation 2 | continuation 3 | padding] rows."""
  seg = np.zeros((B, T), np.int32)
  for b in range(B):
    pad = rng.integers(0, 4)
    p, c1, c2 = rng.integers(3, T // 4, size=3)
    seg[b, pad:pad + p] = 1
    seg[b, pad + p:pad + p + c1] = 2
    seg[b, pad + p + c1:min(T, pad + p + c1 + c2)] = 3
  return seg


def _qkv(rng, T, S, dtype=jnp.float32):
  n = lambda *s: jnp.asarray(rng.normal(size=s), dtype)
  return n(B, T, H, DH), n(B, S, K, DH), n(B, S, K, DH)


def _training_case(kind, T=45, seed=0):
  rng = np.random.default_rng(seed)
  seg = (_ragged_segments if kind == "causal" else _shared_prefix_segments)(T, rng)
  mask = (AM.causal_mask if kind == "causal" else AM.shared_prefix_mask)(jnp.asarray(seg))
  q, k, v = _qkv(rng, T, T)
  rows = np.asarray(mask.dense_matrix()).any(-1)       # queries that see a key
  w = jnp.asarray(rng.normal(size=q.shape), jnp.float32) * rows[:, :, None, None]
  return mask, (q, k, v), rows, w


# Each backend as a function of (q, k, v, mask, new_k, new_v).
def _run(backend, q, k, v, mask, new_k=None, new_v=None):
  scale = 1.0 / np.sqrt(DH)
  if backend == "dense":
    return A._dense(q, k, v, mask, scale, new_k, new_v)
  if backend == "chunked":  # small tiles: many blocks, skipped ones, T not a multiple
    return AC._chunked(q, k, v, mask, scale, new_k, new_v, 8, 8)
  if backend == "cudnn":
    return AK._cudnn(q, k, v, mask, scale, new_k, new_v, implementation=None)
  if backend == "splash":
    if mask.kind == "cached":
      return AC._chunked(q, k, v, mask, scale, new_k, new_v, 8, 8)
    return AK._splash(q, k, v, mask, scale, interpret=True)
  raise ValueError(backend)


# Jitted (backend static): one compilation per case instead of op-by-op dispatch.
_jrun = jax.jit(_run, static_argnums=0)


def _jgrad(backend, argnums, *args):
  """Gradients of sum(_run(backend, q, k, v, mask, new_k, new_v) * w) wrt `argnums`
  (positions in q, k, v, mask, new_k, new_v), jitted; args = (..., new_k, new_v, w)."""
  f = lambda *a: jnp.sum(_run(backend, *a[:-1]) * a[-1])
  return jax.jit(jax.grad(f, argnums=argnums))(*args)


CASES = [(b, kind) for b in ("chunked", "cudnn", "splash") for kind in A.MASK_KINDS
         if A.supports(b, kind)]


@pytest.mark.parametrize("backend,kind", [c for c in CASES if c[1] != "cached"])
def test_backend_equals_dense_forward_and_gradients(backend, kind):
  mask, (q, k, v), rows, w = _training_case(kind)
  out = _jrun(backend, q, k, v, mask, None, None)
  ref = _jrun("dense", q, k, v, mask, None, None)
  assert np.isfinite(np.asarray(out)).all()
  assert _rel(out, ref, rows) <= TOL

  def grads(name):
    return _jgrad(name, (0, 1, 2), q, k, v, mask, None, None, w)
  for got, want, name in zip(grads(backend), grads("dense"), "qkv"):
    assert np.isfinite(np.asarray(got)).all(), name
    assert _rel(got, want) <= TOL, (name, _rel(got, want))


def _numpy_attention(q, k, v, vis, scale):
  """float64 reference from the formula: out[t, h] = sum_s softmax_s(scale q_t.k_s | visible)
  v_s with kv head h // G; rows that see no key are left out (NaN)."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  B, T, H, _ = q.shape
  G = H // k.shape[2]
  out = np.full(q.shape, np.nan)
  for b in range(B):
    for t in range(T):
      keys = np.flatnonzero(vis[b, t])
      if not len(keys):
        continue
      for h in range(H):
        z = scale * k[b, keys, h // G] @ q[b, t, h]
        p = np.exp(z - z.max())
        out[b, t, h] = (p / p.sum()) @ v[b, keys, h // G]
  return out


def _numpy_visible(seg, shared):
  """The visibility rule written out: key s real, s <= t, same segment (or the prefix)."""
  B, T = seg.shape
  vis = np.zeros((B, T, T), bool)
  for b in range(B):
    for t in range(T):
      for s_ in range(t + 1):
        vis[b, t, s_] = seg[b, s_] > 0 and (seg[b, s_] == seg[b, t] or
                                           (shared and seg[b, s_] == 1))
  return vis


@pytest.mark.parametrize("kind", ["causal", "shared_prefix"])
def test_dense_and_chunked_equal_a_float64_numpy_reference(kind):
  mask, (q, k, v), rows, _ = _training_case(kind, T=24, seed=7)
  seg = np.asarray(mask.q_segment_BT)
  vis = _numpy_visible(seg, kind == "shared_prefix")
  np.testing.assert_array_equal(np.asarray(mask.dense_matrix()), vis)
  want = _numpy_attention(q, k, v, vis, 0.25)
  sees = vis.any(-1)
  for got in jax.jit(lambda q, k, v, mask: (A._dense(q, k, v, mask, 0.25, None, None),
                                            AC._chunked(q, k, v, mask, 0.25, None, None, 8, 8))
                     )(q, k, v, mask):
    np.testing.assert_allclose(np.asarray(got, np.float64)[sees], want[sees], rtol=1e-5,
                               atol=1e-5)


def _cached_case(seed=0, S=40, T=3, index=21):
  """T new tokens at slot `index` of an S-slot cache; left-padded prompts (kv_mask 0)."""
  rng = np.random.default_rng(seed)
  kv = np.ones((B, S), np.int32)
  kv[0, :5] = 0
  kv[1, :13] = 0
  kv[2, index + 1] = 0                                # a padded new token
  mask = AM.cached_mask(jnp.asarray(kv), index, T)
  q, k, v = _qkv(rng, T, S)
  _, nk, nv = _qkv(rng, T, T)
  return mask, q, k, v, nk, nv


@pytest.mark.parametrize("backend", [b for b, kind in CASES if kind == "cached"])
@pytest.mark.parametrize("T,index", [(1, 0), (3, 21)])
def test_cached_decoding_equals_dense(backend, T, index):
  mask, q, k, v, nk, nv = _cached_case(T=T, index=index)
  out = _jrun(backend, q, k, v, mask, nk, nv)
  ref = _jrun("dense", q, k, v, mask, nk, nv)
  old, new = mask.dense_matrix()
  rows = np.asarray(old).any(-1) | np.asarray(new).any(-1)
  assert rows.any()
  assert np.isfinite(np.asarray(out)).all()
  assert _rel(out, ref, rows) <= TOL
  if T == 1:
    return
  # Gradients (nothing differentiates through decoding today, but the path is exact).
  w = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)
  w = w * rows[:, :, None, None]
  g = lambda name: _jgrad(name, (0, 4), q, k, v, mask, nk, nv, w)
  for got, want in zip(g(backend), g("dense")):
    assert _rel(got, want) <= TOL


def test_chunked_skips_blocks_no_query_can_see():
  """Causal: query block i skips key blocks after it; decoding skips unfilled slots."""
  seg = jnp.ones((1, 32), jnp.int32)
  m = AM.causal_mask(seg)
  blocks = lambda x: AC._blocks(x, 4, 8)
  live = np.asarray(AC._block_live(blocks(m.q_segment_BT), blocks(m.q_index_BT),
                                  blocks(m.kv_segment_BS), blocks(m.kv_index_BS)))
  np.testing.assert_array_equal(live, np.tril(np.ones((4, 4), bool)))
  c = AM.cached_mask(jnp.ones((1, 64), jnp.int32), 19, 1)
  live = np.asarray(AC._block_live(AC._blocks(c.q_segment_BT, 1, 1),
                                   AC._blocks(c.q_index_BT, 1, 1),
                                   AC._blocks(c.kv_segment_BS, 8, 8),
                                   AC._blocks(c.kv_index_BS, 8, 8)))
  np.testing.assert_array_equal(live[0], [True, True, True] + [False] * 5)


def test_chunked_bfloat16_close_to_dense():
  mask, (q, k, v), rows, _ = _training_case("causal", seed=3)
  bf = lambda x: x.astype(jnp.bfloat16)
  out = _jrun("chunked", bf(q), bf(k), bf(v), mask, None, None)
  assert out.dtype == jnp.bfloat16
  ref = _jrun("dense", q, k, v, mask, None, None)
  assert _rel(out, ref, rows) <= 2e-2   # bf16 inputs and probabilities: ~3 significant digits


def test_chunked_memory_is_linear_in_length():
  """XLA's compiled scratch of value_and_grad: dense keeps [T, T] scores, chunked
  O(T * block) (compiled from abstract shapes, nothing allocated)."""
  def temp(backend, T):
    mask = AM.causal_mask(jnp.ones((1, T), jnp.int32))
    spec = jax.ShapeDtypeStruct((1, T, H, DH), jnp.float32)
    kspec = jax.ShapeDtypeStruct((1, T, K, DH), jnp.float32)
    f = jax.jit(jax.grad(lambda q, k, v: jnp.sum(A.attend(q, k, v, mask, backend=backend)),
                         argnums=(0, 1, 2)))
    return f.lower(spec, kspec, kspec).compile().memory_analysis().temp_size_in_bytes
  T = 4096
  dense, chunked = temp("dense", T), temp("chunked", T)
  assert dense >= H * T * T * 4          # the float32 scores
  assert chunked * 20 < dense, (dense, chunked)


# ----------------------------------------------------------------------------
# Choice and refusal
# ----------------------------------------------------------------------------

def test_resolve_auto_and_refusals():
  assert A.resolve("auto", "causal", "cpu", kv_len=64) == "dense"
  assert A.resolve("auto", "causal", "cpu", kv_len=32768) == "chunked"
  assert A.resolve("auto", "causal", "gpu", kv_len=64, dtype=jnp.bfloat16) == "cudnn"
  assert A.resolve("auto", "causal", "gpu", kv_len=64, dtype=jnp.float32) == "dense"
  assert A.resolve("auto", "cached", "gpu", kv_len=64, dtype=jnp.bfloat16) == "chunked"
  assert A.resolve("auto", "cached", "cpu", kv_len=64) == "dense"
  with pytest.raises(ValueError, match="needs bfloat16 or float16"):
    A.resolve("cudnn", "causal", "gpu", dtype=jnp.float32)
  assert A.resolve("auto", "causal", "tpu", kv_len=64) == "splash"
  assert A.resolve("auto", "shared_prefix", "tpu", kv_len=32768) == "chunked"
  with pytest.raises(ValueError, match="model.attention='splash' cannot express"):
    A.resolve("splash", "shared_prefix", "tpu")
  with pytest.raises(ValueError, match="does not run on 'cpu'"):
    A.resolve("cudnn", "causal", "cpu")
  with pytest.raises(ValueError, match="expected one of"):
    ModelConfig(attention="flash")


def test_config_validation_refuses_a_mask_the_backend_cannot_express():
  from configs import dpo, grpo
  from rlhf_jax.trainers import validate
  for get in (dpo.get_config, grpo.get_config):
    c = get("tiny")
    c.model.attention = "splash"
    key = "dpo" if "dpo" in c else "grpo"
    c[key].share_prompt = True
    with pytest.raises(ConfigError, match=f"model.attention='splash'.*{key}.share_prompt"):
      validate(c)
    c[key].share_prompt = False
    validate(c)                                  # fine without a device check
    with pytest.raises(ConfigError, match="does not run on this 'cpu'"):
      validate(c, num_devices=1)
  c = dpo.get_config("tiny")
  c.model.attention = "cudnn"
  with pytest.raises(ConfigError, match="'cudnn' needs bfloat16"):
    validate(c)
  c = dpo.get_config("tiny")
  c.model.logits_chunk = -1
  with pytest.raises(ConfigError, match="model.logits_chunk"):
    validate(c)


# ----------------------------------------------------------------------------
# The whole model: every training mask and the sampler under `chunked`
# ----------------------------------------------------------------------------

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                  d_ff=64, max_seq_len=128, attention="dense")
CHUNKED = ModelConfig(**{**CFG.to_dict(), "attention": "chunked"})


@functools.lru_cache(maxsize=None)
def _params():
  p = jax.jit(init_params, static_argnums=0)(CFG, jax.random.PRNGKey(0))
  return jax.tree.map(lambda x: x * 8.0 if x.ndim > 1 else x, p)   # peaked predictions


def test_model_chunked_equals_dense_logits_and_gradients():
  rng = np.random.default_rng(0)
  T = 40
  seg = _ragged_segments(T, rng)
  tokens = jnp.asarray(rng.integers(1, 64, (B, T)), jnp.int32)
  real = seg > 0

  def loss(cfg, p):
    logits, _ = Transformer(cfg).apply({"params": p}, tokens, jnp.asarray(seg))
    return jnp.sum(jnp.where(real[..., None], jax.nn.log_softmax(logits), 0.0)[..., 0])
  lc, gc = jax.jit(jax.value_and_grad(functools.partial(loss, CHUNKED)))(_params())
  ld, gd = jax.jit(jax.value_and_grad(functools.partial(loss, CFG)))(_params())
  assert _rel(lc, ld) <= TOL
  for a, b in zip(jax.tree.leaves(gc), jax.tree.leaves(gd)):
    assert _rel(a, b) <= 1e-4   # summed over layers and heads: a few float32 roundings more


def test_model_chunked_shared_prefix_equals_dense():
  rng = np.random.default_rng(1)
  G, P, W = 3, 9, 6
  tokens = np.tile(rng.integers(1, 64, (1, P + W)), (G, 1))
  tokens[:, P:] = rng.integers(1, 64, (G, W))
  seg = np.ones_like(tokens)
  pk = pack_shared_prefix(jnp.asarray(tokens), jnp.asarray(seg), jnp.full((G,), P), G, W)
  out = {}
  for cfg in (CFG, CHUNKED):
    h, _ = jax.jit(functools.partial(Transformer(cfg).apply, shared_prefix=True,
                                     output="hidden"))(
        {"params": _params()}, pk.tokens_NL, pk.segment_ids_NL, pk.positions_NL)
    out[cfg.attention] = np.asarray(h)
  real = np.asarray(pk.segment_ids_NL) > 0
  assert _rel(out["chunked"], out["dense"], real) <= TOL


def test_sampler_chunked_equals_dense_and_the_full_forward():
  rng = np.random.default_rng(2)
  lengths = [7, 2, 5]
  P = max(lengths)
  pmask = (np.arange(P)[None] >= P - np.array(lengths)[:, None]).astype(np.int32)
  prompts = np.where(pmask > 0, rng.integers(1, 64, (B, P)), 0).astype(np.int32)
  outs = {cfg.attention: generate(cfg, _params(), prompts, pmask, jax.random.PRNGKey(5),
                                  max_new_tokens=12, temperature=1.0, eos_id=None, pad_id=0)
          for cfg in (CFG, CHUNKED)}
  np.testing.assert_array_equal(outs["chunked"].tokens_BN, outs["dense"].tokens_BN)
  np.testing.assert_allclose(outs["chunked"].logprobs_BN, outs["dense"].logprobs_BN,
                             atol=2e-5)
  # And against one full forward pass of the completed rows.
  o = outs["chunked"]
  logits = lm_logits(CHUNKED, _params(), o.sequences_BS, o.sequence_mask_BS)[:, P - 1:-1]
  want = jnp.take_along_axis(jax.nn.log_softmax(logits), o.tokens_BN[..., None], -1)[..., 0]
  np.testing.assert_allclose(o.logprobs_BN, want, atol=2e-5)
