"""Decoder LM against an independent float64 numpy forward written from the formulas."""
import dataclasses
import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.losses.logprobs import token_logprobs
from rlhf_jax.models import ModelConfig, Transformer, init_cache, init_params, lm_logits
from rlhf_jax.models.segments import positions_from_segments

TINY = dict(vocab_size=48, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
            d_ff=64, max_seq_len=128)
CONFIGS = {
    "gqa": ModelConfig(**TINY),
    "mha": ModelConfig(**{**TINY, "n_kv_heads": 4}),
    "qwen2_bias_untied": ModelConfig(**TINY, attn_bias=True, mlp_bias=True,
                                     tie_embeddings=False, rope_theta=1e6),
    "qwen3_qk_norm": ModelConfig(**TINY, qk_norm=True, tie_embeddings=False),
    # orig_max_pos=32: wavelengths 6.3 (kept), 63 (scaled), 628 and 6283 (scaled) and a
    # smoothly interpolated band between 8 and 32 -- with rope_theta=100 (see below).
    "llama3_rope_scaling": ModelConfig(**TINY, rope_theta=100.0,
                                       rope_scaling=(8.0, 1.0, 4.0, 32)),
    "gemma": ModelConfig(**TINY, norm_offset=1.0, embed_scale=True, activation="gelu_tanh"),
}
# Issue #20: sliding windows shorter than the 24-token test sequences, soft-capping (caps
# near the scores' scale, so tanh bends them), sandwich norms, query scaling, two RoPE bases.
GEMMA = dict(norm_offset=1.0, embed_scale=True, activation="gelu_tanh", post_norms=True)
FAMILIES = {
    "gemma2_like": ModelConfig(**{**TINY, "n_layers": 3}, **GEMMA, sliding_window=5,
                               window_pattern="LG", attn_softcap=2.0, final_softcap=4.0,
                               query_pre_attn_scalar=12.0),
    "gemma3_like": ModelConfig(**{**TINY, "n_layers": 3}, **GEMMA, sliding_window=4,
                               window_pattern="LLG", qk_norm=True, rope_theta=1e5,
                               rope_local_theta=100.0, rope_linear_factor=8.0,
                               query_pre_attn_scalar=8.0),
    "mistral_like": ModelConfig(**TINY, sliding_window=6, tie_embeddings=False),
}
CONFIGS.update(FAMILIES)


def random_params(config, seed):
  """Parameters of the right tree with O(1) activations (init_params is too close to 0)."""
  rng = np.random.default_rng(seed)
  base = 0.0 if config.norm_offset else 1.0

  def leaf(path, x):
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    shape = x.shape
    if name.endswith("scale"):
      v = base + 0.3 * rng.normal(size=shape)
    elif name.endswith("bias"):
      v = 0.3 * rng.normal(size=shape)
    elif name.endswith("embedding"):
      v = rng.normal(size=shape)
    elif name == "lm_head":
      v = rng.normal(size=shape) / math.sqrt(shape[0])
    else:   # stacked layer kernels [L, in..., out...]
      fan_in = shape[1] * shape[2] if name.startswith("layers/o/") else shape[1]
      v = rng.normal(size=shape) / math.sqrt(fan_in)
    return jnp.asarray(v, jnp.float32)

  shapes = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))  # no compute
  return jax.tree_util.tree_map_with_path(leaf, shapes)


# ----------------------------------------------------------------------------
# numpy float64 reference (one unpadded sequence)
# ----------------------------------------------------------------------------

def np_rmsnorm(x, w, eps, offset):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * (offset + w)


def np_inv_freq(head_dim, theta, scaling):
  """theta^(-2i/d); Llama 3 scaling as in Meta's reference `apply_scaling`."""
  freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
  if scaling is None:
    return freqs
  factor, low_freq_factor, high_freq_factor, old_context_len = scaling
  low_freq_wavelen = old_context_len / low_freq_factor
  high_freq_wavelen = old_context_len / high_freq_factor
  out = []
  for freq in freqs:
    wavelen = 2 * math.pi / freq
    if wavelen < high_freq_wavelen:
      out.append(freq)
    elif wavelen > low_freq_wavelen:
      out.append(freq / factor)
    else:
      smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
      out.append((1 - smooth) * freq / factor + smooth * freq)
  return np.array(out)


def np_rope(x_TNd, pos_T, inv_freq):
  """Rotate-half RoPE: x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1]."""
  ang = pos_T[:, None] * inv_freq[None, :]                      # [T, d/2]
  cos = np.cos(np.concatenate([ang, ang], -1))[:, None, :]
  sin = np.sin(np.concatenate([ang, ang], -1))[:, None, :]
  half = x_TNd.shape[-1] // 2
  rot = np.concatenate([-x_TNd[..., half:], x_TNd[..., :half]], -1)
  return x_TNd * cos + rot * sin


def np_act(name, x):
  if name == "silu":
    return x / (1 + np.exp(-x))
  return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def np_forward(c: ModelConfig, params, tokens_T):
  """float64 logits [T, V] of one sequence at positions 0..T-1 (Gemma 2 / 3, Mistral:
  sliding windows on the pattern's "L" layers, soft-caps, sandwich norms, two RoPE bases)."""
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
  T, H, K, Dh = len(tokens_T), c.n_heads, c.n_kv_heads, c.head_dim
  G = H // K
  norm = lambda x, w: np_rmsnorm(x, w, c.norm_eps, c.norm_offset)
  lin = lambda x, blk, l, eq: (np.einsum(eq, x, blk["kernel"][l])
                               + (blk["bias"][l] if "bias" in blk else 0.0))
  E = p["embed"]["embedding"]
  x = E[tokens_T] * (math.sqrt(c.d_model) if c.embed_scale else 1.0)
  pos = np.arange(T, dtype=np.float64)
  inv_global = np_inv_freq(Dh, c.rope_theta, c.rope_scaling) / c.rope_linear_factor
  causal = np.tril(np.ones((T, T), bool))
  pattern = c.window_pattern or "L"
  i, j = np.arange(T)[:, None], np.arange(T)[None, :]
  cap = lambda x, m: m * np.tanh(x / m) if m else x
  Lp = p["layers"]
  for l in range(c.n_layers):
    local = c.sliding_window > 0 and pattern[l % len(pattern)] == "L"
    visible = causal & (i - j < c.sliding_window) if local else causal
    inv = np_inv_freq(Dh, c.rope_local_theta, None) if local and c.rope_local_theta else inv_global
    h = norm(x, Lp["attn_norm"]["scale"][l])
    q = lin(h, Lp["q"], l, "td,dhk->thk")
    k = lin(h, Lp["k"], l, "td,dhk->thk")
    v = lin(h, Lp["v"], l, "td,dhk->thk")
    if c.qk_norm:
      q = norm(q, Lp["q_norm"]["scale"][l])
      k = norm(k, Lp["k_norm"]["scale"][l])
    q, k = np_rope(q, pos, inv), np_rope(k, pos, inv)
    out = np.zeros_like(q)
    for head in range(H):          # query head h reads kv head h // G
      s = q[:, head] @ k[:, head // G].T / math.sqrt(c.query_pre_attn_scalar or Dh)
      s = np.where(visible, cap(s, c.attn_softcap), -np.inf)
      w = np.exp(s - s.max(-1, keepdims=True))
      w /= w.sum(-1, keepdims=True)
      out[:, head] = w @ v[:, head // G]
    a = np.einsum("thk,hkd->td", out, Lp["o"]["kernel"][l])
    x = x + (norm(a, Lp["post_attn_norm"]["scale"][l]) if c.post_norms else a)
    h = norm(x, Lp["mlp_norm"]["scale"][l])
    g = np_act(c.activation, lin(h, Lp["gate"], l, "td,df->tf")) * lin(h, Lp["up"], l, "td,df->tf")
    m = lin(g, Lp["down"], l, "tf,fd->td")
    x = x + (norm(m, Lp["post_mlp_norm"]["scale"][l]) if c.post_norms else m)
  h = norm(x, p["final_norm"]["scale"])
  return cap(h @ (E.T if c.tie_embeddings else p["lm_head"]), c.final_softcap)


# ----------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gqa():
  c = CONFIGS["gqa"]
  return c, random_params(c, 0)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_numpy_reference(name):
  c = CONFIGS[name]
  params = random_params(c, 1)
  tokens = np.random.default_rng(2).integers(0, c.vocab_size, (2, 24))
  got = np.asarray(lm_logits(c, params, tokens))
  assert got.dtype == np.float32
  for b in range(tokens.shape[0]):
    want = np_forward(c, params, tokens[b])
    assert np.abs(want).max() > 1.0       # not a degenerate all-zero comparison
    np.testing.assert_allclose(got[b], want, atol=1e-4, rtol=1e-4, err_msg=name)


def test_llama3_rope_scaling_matters():
  c = CONFIGS["llama3_rope_scaling"]
  inv = np_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling)
  base = np_inv_freq(c.head_dim, c.rope_theta, None)
  wavelen = 2 * math.pi / base
  assert (wavelen < 8).any() and (wavelen > 32).any() and ((wavelen > 8) & (wavelen < 32)).any()
  assert not np.allclose(inv, base)
  params = random_params(c, 1)
  tokens = np.random.default_rng(2).integers(0, c.vocab_size, 24)
  unscaled = np_forward(dataclasses.replace(c, rope_scaling=None), params, tokens)
  assert np.abs(np_forward(c, params, tokens) - unscaled).max() > 1e-3


def test_left_padded_rows_equal_unpadded(gqa):
  c, params = gqa
  T, lengths = 12, [12, 7, 3]
  rng = np.random.default_rng(3)
  seqs = [rng.integers(1, c.vocab_size, n) for n in lengths]
  tokens = np.zeros((len(lengths), T), np.int32)
  seg = np.zeros((len(lengths), T), np.int32)
  for b, s in enumerate(seqs):
    tokens[b, T - len(s):] = s
    seg[b, T - len(s):] = 1
  batch = np.asarray(lm_logits(c, params, tokens, seg))
  for b, s in enumerate(seqs):
    alone = np.asarray(lm_logits(c, params, s[None]))[0]
    np.testing.assert_allclose(batch[b, T - len(s):], alone, atol=1e-4, rtol=1e-4)


def test_packed_sequences_equal_separate_runs(gqa):
  c, params = gqa
  tokens = np.array([[5, 9, 3, 7, 11, 0]])
  seg = np.array([[1, 1, 1, 2, 2, 0]])
  np.testing.assert_array_equal(positions_from_segments(jnp.asarray(seg)), [[0, 1, 2, 0, 1, 0]])
  packed = np.asarray(lm_logits(c, params, tokens, seg))[0]
  np.testing.assert_allclose(packed[:3], np.asarray(lm_logits(c, params, tokens[:, :3]))[0],
                             atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(packed[3:5], np.asarray(lm_logits(c, params, tokens[:, 3:5]))[0],
                             atol=1e-4, rtol=1e-4)
  assert np.isfinite(packed).all()


def test_bfloat16_compute_close_to_float32(gqa):
  c, params = gqa
  tokens = np.random.default_rng(4).integers(0, c.vocab_size, (2, 16))
  f32 = np.asarray(lm_logits(c, params, tokens))
  bf16 = lm_logits(dataclasses.replace(c, dtype="bfloat16"), params, tokens)
  assert bf16.dtype == jnp.float32
  err = np.abs(np.asarray(bf16) - f32).max()
  assert err < 0.05 * np.abs(f32).max(), (err, np.abs(f32).max())
  # Token log-probs (the quantity losses use) stay close too.
  tgt = jnp.asarray(tokens[:, 1:])
  lp32 = token_logprobs(jnp.asarray(f32[:, :-1]), tgt)
  lp16 = token_logprobs(bf16[:, :-1], tgt)
  np.testing.assert_allclose(lp16, lp32, atol=0.15)


def test_remat_same_logits_and_grads(gqa):
  c, params = gqa
  tokens = jnp.asarray(np.random.default_rng(5).integers(0, c.vocab_size, (2, 10)))

  def loss_and_logits(config, p):
    logits, _ = Transformer(config).apply({"params": p}, tokens)
    return -token_logprobs(logits[:, :-1], tokens[:, 1:]).mean(), logits

  outs = {}
  for remat in (False, True):
    cfg = dataclasses.replace(c, remat=remat)
    fn = jax.jit(jax.value_and_grad(lambda p: loss_and_logits(cfg, p), has_aux=True))
    outs[remat] = fn(params)
  (l0, lg0), g0 = outs[False]
  (l1, lg1), g1 = outs[True]
  np.testing.assert_allclose(lg1, lg0, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  flat0 = flax.traverse_util.flatten_dict(g0, sep="/")
  flat1 = flax.traverse_util.flatten_dict(g1, sep="/")
  assert flat0.keys() == flat1.keys()
  for k in flat0:
    np.testing.assert_allclose(flat1[k], flat0[k], atol=1e-6, rtol=1e-4, err_msg=k)


def test_cached_prefill_and_decode_equal_full_forward(gqa):
  c, params = gqa
  model = Transformer(c)
  T, prefill = 11, 6
  lengths = np.array([11, 8, 5])
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
  assert cache[0].shape == (c.n_layers, B, T, c.n_kv_heads, c.head_dim)
  logits, cache = cached(tokens[:, :prefill], positions[:, :prefill], cache, 0)
  steps = [np.asarray(logits)]
  for t in range(prefill, T):
    logits, cache = cached(tokens[:, t:t + 1], positions[:, t:t + 1], cache, t)
    steps.append(np.asarray(logits))
  got = np.concatenate(steps, axis=1)
  np.testing.assert_allclose(np.where(mask[..., None] > 0, got, 0),
                             np.where(mask[..., None] > 0, full, 0), atol=1e-4, rtol=1e-4)
