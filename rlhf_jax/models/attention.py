"""Attention backends behind one function: `attend(q, k, v, mask, backend=...)`.

Every backend computes the same grouped-query attention (H query heads share K
kv heads, G = H / K):

    out[b, t, h] = sum_s softmax_s(scale * q[b, t, h] . k[b, s, h // G] | visible)[s] v[b, s, h // G]

with one visibility rule for every mask the model uses (`AttentionMask`):

    visible(t, s) = kv_seg[s] > 0  and  kv_idx[s] <= q_idx[t]
                    and (kv_seg[s] == q_seg[t]  or  (shared_prefix and kv_seg[s] == 1))

* kind "causal": causal attention within a segment; segment id 0 is padding (left or
  right), several positive ids in one row are packed sequences.
* kind "shared_prefix": rows packed as [prefix | continuation 1 | continuation 2 ...]
  (`transformer.pack_shared_prefix`): segment 1 is a prefix every later segment sees.
* kind "cached": decoding against a KV cache. The keys are the S cache slots (visible
  iff filled before this call: kv_seg) and then the T new tokens themselves (causal
  among themselves, new_segment_BT marks the real ones). The cache is read, never
  copied (the caller writes the new K/V once after the layers).

A query that sees no key gets the uniform average of the values (dense: softmax of
equal -1e30 logits; chunked reproduces it), never NaN.

Backends (`ModelConfig.attention`):

  dense    the reference: float32 scores [B, K, G, T, S] and a boolean mask; supports
           every kind. Memory O(T S) per head, kept for the backward pass.
  chunked  memory-efficient attention written here in plain JAX (blockwise with an
           online softmax, Rabe & Staats 2021; FlashAttention-2's backward, Dao 2023:
           only the output and the row log-sum-exp are saved, the scores are
           recomputed block by block). Runs on every platform including CPU;
           memory O(T * block). Written by hand because no kernel shipped with JAX runs
           on CPU with segment ids, a shared prefix and a KV cache at O(T) memory
           (jax.nn.dot_product_attention's "xla" path materialises [T, S]).
  cudnn    jax.nn.dot_product_attention(implementation="cudnn") on GPU (cuDNN flash
           attention), with the visibility rule passed as a boolean mask.
  splash   the Pallas splash-attention TPU kernel shipped with JAX
           (jax.experimental.pallas.ops.tpu.splash_attention) with causal + segment ids
           for training and scoring. It has no decode mode: cached decoding under
           `splash` runs `chunked` (which skips the unfilled cache blocks). It cannot
           express the shared-prefix mask and refuses it (`check_config`).
  auto     the best available on the running platform for the kind (`resolve`).
"""
from __future__ import annotations

BACKENDS = ("auto", "dense", "chunked", "cudnn", "splash")
MASK_KINDS = ("causal", "shared_prefix", "cached")

import functools
import math
from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
NEG_INF = -1e30  # masked score: a row that sees no key gives a uniform (not NaN) softmax

# Which mask kinds each backend expresses (the dense reference: all of them).
SUPPORTS = {"dense": set(MASK_KINDS), "chunked": set(MASK_KINDS),
            "cudnn": set(MASK_KINDS), "splash": {"causal", "cached"}}
# Above this many keys "auto" leaves the dense path on CPU (its [T, S] scores dominate
# memory); below it the dense einsums are the fastest on XLA:CPU (the spec workloads).
AUTO_DENSE_MAX_KEYS = 2048
DEFAULT_BLOCK_Q = 512
DEFAULT_BLOCK_K = 512


# ----------------------------------------------------------------------------
# The mask: one visibility rule, described by per-token arrays (never [T, S])
# ----------------------------------------------------------------------------

@flax.struct.dataclass
class AttentionMask:
  """Which keys each query sees (module docstring): per-token arrays, no [T, S] matrix.

  q_segment_BT / q_index_BT: each query's segment id (0 = padding) and slot index;
  kv_segment_BS / kv_index_BS: the same for the keys (for kind "cached": the cache
  slots, segment 0 = not filled before this call); new_segment_BT (kind "cached"
  only): which of the T new tokens are real (1) -- they are keys too, at q_index_BT.
  dense: the boolean [B, T, S] matrix (for "cached": (old_BTS, new_BTT)) when the
  caller built it once for the dense backend (`with_dense`); None otherwise.
  """
  q_segment_BT: Array
  q_index_BT: Array
  kv_segment_BS: Array
  kv_index_BS: Array
  new_segment_BT: Optional[Array] = None
  dense: Optional[object] = None
  kind: str = flax.struct.field(pytree_node=False, default="causal")

  def visible(self, q_seg, q_idx, kv_seg, kv_idx):
    """bool [..., Tq, Sk] of the visibility rule for query / key slices."""
    q_seg, q_idx = q_seg[..., :, None], q_idx[..., :, None]
    kv_seg, kv_idx = kv_seg[..., None, :], kv_idx[..., None, :]
    same = kv_seg == q_seg
    if self.kind == "shared_prefix":
      same = same | (kv_seg == 1)
    return (kv_idx <= q_idx) & same & (kv_seg > 0)

  def dense_matrix(self):
    """The boolean [B, T, S] matrix (kind "cached": (old_BTS, new_BTT))."""
    if self.dense is not None:
      return self.dense
    old = self.visible(self.q_segment_BT, self.q_index_BT, self.kv_segment_BS,
                       self.kv_index_BS)
    if self.kind != "cached":
      return old
    return old, self.visible(self.q_segment_BT, self.q_index_BT, self.new_segment_BT,
                             self.q_index_BT)

  def with_dense(self):
    """This mask with its dense matrix built (once, outside the layer scan)."""
    return self.replace(dense=self.dense_matrix())


def causal_mask(segment_ids_BT: Array) -> AttentionMask:
  """Causal attention within segments (0 = padding, left or right; packed sequences)."""
  seg = segment_ids_BT.astype(jnp.int32)
  idx = jnp.broadcast_to(jnp.arange(seg.shape[1], dtype=jnp.int32)[None], seg.shape)
  return AttentionMask(seg, idx, seg, idx, kind="causal")


def shared_prefix_mask(segment_ids_BT: Array) -> AttentionMask:
  """Rows [prefix (segment 1) | continuation | continuation ...]: every segment also
  sees segment 1 (`transformer.pack_shared_prefix`)."""
  return causal_mask(segment_ids_BT).replace(kind="shared_prefix")


def cached_mask(kv_mask_BS: Array, cache_index, T: int) -> AttentionMask:
  """T new tokens going into cache slots cache_index..+T-1: a query sees cache slot s iff
  s < cache_index and the slot holds a real token (kv_mask_BS), and new token u <= t iff
  it is real."""
  kv = kv_mask_BS.astype(jnp.int32)
  B, S = kv.shape
  slots = jnp.arange(S, dtype=jnp.int32)[None]
  kv_seg = jnp.where(slots < cache_index, (kv > 0).astype(jnp.int32), 0)
  new_seg = (jax.lax.dynamic_slice_in_dim(kv, cache_index, T, axis=1) > 0).astype(jnp.int32)
  q_idx = jnp.broadcast_to(cache_index + jnp.arange(T, dtype=jnp.int32)[None], (B, T))
  return AttentionMask(jnp.ones((B, T), jnp.int32), q_idx, kv_seg,
                       jnp.broadcast_to(slots, (B, S)), new_seg, kind="cached")


# ----------------------------------------------------------------------------
# Backend choice
# ----------------------------------------------------------------------------

def supports(backend: str, kind: str) -> bool:
  """Whether `backend` expresses the mask kind (module docstring; auto: every kind)."""
  return backend == "auto" or kind in SUPPORTS[backend]


def available(backend: str, platform: str | None = None) -> bool:
  """Whether `backend` runs on `platform` (default: jax.default_backend())."""
  platform = platform or jax.default_backend()
  return {"dense": True, "chunked": True, "auto": True, "cudnn": platform == "gpu",
          "splash": platform == "tpu"}[backend]


def resolve(backend: str, kind: str, platform: str | None = None,
            kv_len: int | None = None, dtype=None) -> str:
  """The concrete backend that runs attention of `kind` with `kv_len` keys.

  auto: TPU -> splash where it expresses the kind; GPU -> cudnn for bfloat16 / float16
  compute (`dtype`; cuDNN has no float32 flash attention) except for decoding; decoding
  on GPU/TPU -> chunked (it reads the cache in place and skips unfilled blocks, where
  cudnn would copy the cache per layer); otherwise (CPU, and TPU
  for shared-prefix / cached masks) dense up to AUTO_DENSE_MAX_KEYS keys (the fastest
  on XLA:CPU at short lengths; results bitwise as before), chunked above. An explicit backend that cannot
  express `kind` or run on `platform` raises ValueError (validated before any run by
  `check_config`)."""
  platform = platform or jax.default_backend()
  if backend == "auto":
    if platform == "tpu" and supports("splash", kind):
      return "splash"
    if platform == "gpu" and kind != "cached" and _half(dtype):
      return "cudnn"
    if kind == "cached" and platform in ("gpu", "tpu"):
      return "chunked"  # reads the cache in place and skips its unfilled blocks
    return "dense" if kv_len is not None and kv_len <= AUTO_DENSE_MAX_KEYS else "chunked"
  if backend not in SUPPORTS:
    raise ValueError(f"model.attention={backend!r}: expected one of {', '.join(BACKENDS)}")
  if not supports(backend, kind):
    raise ValueError(f"model.attention={backend!r} cannot express the {kind!r} attention "
                     f"mask (it supports {sorted(SUPPORTS[backend])}); use 'auto', "
                     f"'chunked' or 'dense'")
  if not available(backend, platform):
    raise ValueError(f"model.attention={backend!r} does not run on {platform!r} "
                     f"(cudnn: GPU only, splash: TPU only); use 'auto' or 'chunked'")
  if backend == "cudnn" and dtype is not None and not _half(dtype):
    raise ValueError(f"model.attention='cudnn' needs bfloat16 or float16 compute, got "
                     f"model.dtype={jnp.dtype(dtype).name}; use 'auto' or 'chunked'")
  return backend


def _half(dtype) -> bool:
  """bfloat16 / float16 (None: unknown, taken as yes)."""
  return dtype is None or jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def check_config(backend: str, kinds, platform: str | None = None) -> None:
  """Raise ValueError naming model.attention when `backend` cannot run every mask kind a
  run needs (`kinds`: e.g. {"causal", "cached"} for a trainer that samples)."""
  for kind in sorted(kinds):
    resolve(backend, kind, platform)


# ----------------------------------------------------------------------------
# attend: the one entry point
# ----------------------------------------------------------------------------

def attend(q_BTHd: Array, k_BSKd: Array, v_BSKd: Array, mask: AttentionMask, *,
           backend: str = "auto", scale: float | None = None,
           new_k_BTKd: Array | None = None, new_v_BTKd: Array | None = None,
           block_q: int = DEFAULT_BLOCK_Q, block_k: int = DEFAULT_BLOCK_K) -> Array:
  """Grouped-query attention of T queries over S keys under `mask`: out [B, T, H, Dh].

  q_BTHd: queries (H heads), k_BSKd / v_BSKd: keys and values (K kv heads, H % K == 0),
  all in the compute dtype; scores and softmax run in float32, the probabilities are
  cast to the compute dtype for the value product. For mask.kind "cached", k/v are
  the cache (read only) and new_k_BTKd / new_v_BTKd the T new tokens' keys and values.
  scale defaults to 1 / sqrt(Dh). block_q / block_k: tile sizes of `chunked`.
  """
  Dh = q_BTHd.shape[-1]
  scale = 1.0 / math.sqrt(Dh) if scale is None else scale
  if (mask.kind == "cached") != (new_k_BTKd is not None):
    raise ValueError("attend: new_k_BTKd / new_v_BTKd go with (and only with) a cached mask")
  name = resolve(backend, mask.kind, kv_len=k_BSKd.shape[1], dtype=v_BSKd.dtype)
  if name == "dense":
    return _dense(q_BTHd, k_BSKd, v_BSKd, mask, scale, new_k_BTKd, new_v_BTKd)
  if name == "chunked":
    return _chunked(q_BTHd, k_BSKd, v_BSKd, mask, scale, new_k_BTKd, new_v_BTKd,
                    block_q, block_k)
  if name == "cudnn":
    return _cudnn(q_BTHd, k_BSKd, v_BSKd, mask, scale, new_k_BTKd, new_v_BTKd)
  if mask.kind == "cached":  # splash has no decode kernel (module docstring)
    return _chunked(q_BTHd, k_BSKd, v_BSKd, mask, scale, new_k_BTKd, new_v_BTKd,
                    block_q, block_k)
  return _splash(q_BTHd, k_BSKd, v_BSKd, mask, scale)


def _dense(q_BTHd, k_BSKd, v_BSKd, mask, scale, new_k_BTKd, new_v_BTKd):
  """The reference: every score [B, K, G, T, S] in float32."""
  B, T, H, Dh = q_BTHd.shape
  K = k_BSKd.shape[2]
  dt = v_BSKd.dtype
  q_BTKGd = q_BTHd.reshape(B, T, K, H // K, Dh)
  if mask.kind != "cached":
    logits = jnp.einsum("btkgd,bskd->bkgts", q_BTKGd, k_BSKd,
                        preferred_element_type=jnp.float32) * scale
    logits = jnp.where(mask.dense_matrix()[:, None, None], logits, NEG_INF)
    probs = jax.nn.softmax(logits, axis=-1).astype(dt)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v_BSKd)
  else:
    old_mask_BTS, new_mask_BTT = mask.dense_matrix()
    lo = jnp.einsum("btkgd,bskd->bkgts", q_BTKGd, k_BSKd,
                    preferred_element_type=jnp.float32) * scale
    ln = jnp.einsum("btkgd,bskd->bkgts", q_BTKGd, new_k_BTKd,
                    preferred_element_type=jnp.float32) * scale
    lo = jnp.where(old_mask_BTS[:, None, None], lo, NEG_INF)
    ln = jnp.where(new_mask_BTT[:, None, None], ln, NEG_INF)
    probs = jax.nn.softmax(jnp.concatenate([lo, ln], axis=-1), axis=-1).astype(dt)
    S = k_BSKd.shape[1]
    out = (jnp.einsum("bkgts,bskd->btkgd", probs[..., :S], v_BSKd)
           + jnp.einsum("bkgts,bskd->btkgd", probs[..., S:], new_v_BTKd))
  return out.reshape(B, T, H, Dh)


# ----------------------------------------------------------------------------
# chunked: blockwise attention with an online softmax and a recomputing backward
# ----------------------------------------------------------------------------

def _blocks(x, n, size, axis=1, fill=0):
  """x with `axis` padded to n * size and split: [n, ..., size, ...] (block axis first)."""
  pad = n * size - x.shape[axis]
  if pad:
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    x = jnp.pad(x, widths, constant_values=fill)
  x = x.reshape(x.shape[:axis] + (n, size) + x.shape[axis + 1:])
  return jnp.moveaxis(x, axis, 0)


def _block_live(q_seg_nBq, q_idx_nBq, kv_seg_mBk, kv_idx_mBk):
  """bool [n, m]: query block i may see key block j (some real key j at or before the
  last query index of i). Blocks that are not live are skipped (causal: ~half)."""
  big = jnp.iinfo(jnp.int32).max
  kv_min = jnp.min(jnp.where(kv_seg_mBk > 0, kv_idx_mBk, big), axis=(1, 2))
  del q_seg_nBq  # a padding query may see keys too (the shared prefix): the rule decides
  q_max = jnp.max(q_idx_nBq, axis=(1, 2))
  return kv_min[None, :] <= q_max[:, None]


def _scores(mask, q_i, k_j, seg_q, idx_q, seg_k, idx_k, inrange_k, scale):
  """float32 masked scores [B, K, G, bq, bk] of one (query, key) block pair and the
  visibility [B, 1, 1, bq, bk]: NEG_INF where masked, -inf on padding past S."""
  s = jnp.einsum("bqkgd,bskd->bkgqs", q_i, k_j, preferred_element_type=jnp.float32) * scale
  vis = mask.visible(seg_q, idx_q, seg_k, idx_k)[:, None, None]
  s = jnp.where(vis, s, NEG_INF)
  return jnp.where(inrange_k[None, None, None, None, :], s, -jnp.inf), vis


def _flash_forward(mask, q_nBqKGd, qseg_nBq, qidx_nBq, keysets, scale):
  """Online-softmax forward over query blocks (lax.map) x key blocks (lax.scan), with
  several key sets in turn (the cache, then the new tokens). Returns the output
  [n, B, bq, K, G, Dh] in float32 and each row's softmax statistics (max m, 1 / sum l),
  each [n, B, K, G, bq]. A row that sees no key gets the uniform average over the key
  blocks it shares with visible rows (dense: over all keys), or 0 when every block was
  skipped (1/l = 0); such rows are padding, never read."""
  n, B, bq, K, G, Dh = q_nBqKGd.shape

  def one_query_block(args):
    q_i, seg_q, idx_q, live_row = args
    m = jnp.full((B, K, G, bq), NEG_INF, jnp.float32)
    l = jnp.zeros((B, K, G, bq), jnp.float32)
    acc = jnp.zeros((B, K, G, bq, Dh), jnp.float32)
    carry = (m, l, acc)
    for ks, live_i in zip(keysets, live_row):
      k_mBkKd, v_mBkKd, seg_k, idx_k, inr_k = ks[:5]

      def step(carry, xs, ks=ks):
        k_j, v_j, seg_kj, idx_kj, inr_kj, live = xs

        def compute(carry):
          m, l, acc = carry
          s, _ = _scores(mask, q_i, k_j, seg_q, idx_q, seg_kj, idx_kj, inr_kj, scale)
          m_new = jnp.maximum(m, jnp.max(s, axis=-1))
          corr = jnp.exp(m - m_new)
          p = jnp.exp(s - m_new[..., None])
          l = l * corr + jnp.sum(p, axis=-1)
          pv = jnp.einsum("bkgqs,bskd->bkgqd", p.astype(v_j.dtype), v_j,
                          preferred_element_type=jnp.float32)
          return m_new, l, acc * corr[..., None] + pv
        return jax.lax.cond(live, compute, lambda c: c, carry), None

      carry, _ = jax.lax.scan(step, carry, (k_mBkKd, v_mBkKd, seg_k, idx_k, inr_k, live_i))
    m, l, acc = carry
    inv_l = jnp.where(l > 0, 1.0 / jnp.where(l > 0, l, 1.0), 0.0)
    # The softmax statistics are kept as (m, 1/l), not as log-sum-exp m + log l: for a
    # row that sees no key m = NEG_INF absorbs log l in float32.
    return jnp.moveaxis(acc * inv_l[..., None], 3, 1), (m, inv_l)  # out [B, bq, K, G, Dh]

  live = [ks[5] for ks in keysets]                 # each [n, m]: row i goes with block i
  return jax.lax.map(lambda a: one_query_block((a[0], a[1], a[2], a[3:])),
                     (q_nBqKGd, qseg_nBq, qidx_nBq, *live))


def _keyset(mask, k_BSKd, v_BSKd, seg_BS, idx_BS, qseg_nBq, qidx_nBq, block_k):
  """A key set split into blocks: (k, v, seg, idx, in-range) [m, ...] and live [n, m]."""
  S = k_BSKd.shape[1]
  bk = min(block_k, S)
  m = -(-S // bk)
  seg = _blocks(seg_BS, m, bk)
  idx = _blocks(idx_BS, m, bk)
  inr = _blocks(jnp.arange(S)[None] < S, m, bk)[:, 0]  # [m, bk]
  live = _block_live(qseg_nBq, qidx_nBq, seg, idx)
  return (_blocks(k_BSKd, m, bk), _blocks(v_BSKd, m, bk), seg, idx, inr, live)


def _chunked(q_BTHd, k_BSKd, v_BSKd, mask, scale, new_k_BTKd, new_v_BTKd, block_q, block_k):
  B, T, H, Dh = q_BTHd.shape
  K = k_BSKd.shape[2]
  dt = v_BSKd.dtype
  if mask.kind == "cached":  # decoding: forward only (no backward pass is ever taken)
    bq = min(block_q, T)
    n = -(-T // bq)
    q = _blocks(q_BTHd.reshape(B, T, K, H // K, Dh), n, bq)
    qseg, qidx = _blocks(mask.q_segment_BT, n, bq), _blocks(mask.q_index_BT, n, bq)
    keysets = [_keyset(mask, k_BSKd, v_BSKd, mask.kv_segment_BS, mask.kv_index_BS, qseg,
                       qidx, block_k),
               _keyset(mask, new_k_BTKd, new_v_BTKd, mask.new_segment_BT, mask.q_index_BT,
                       qseg, qidx, block_k)]
    out, _ = _flash_forward(mask, q, qseg, qidx, keysets, scale)
    return jnp.moveaxis(out, 0, 1).reshape(B, n * bq, H, Dh)[:, :T].astype(dt)
  return _flash(q_BTHd, k_BSKd, v_BSKd, mask.q_segment_BT, mask.q_index_BT,
                mask.kv_segment_BS, mask.kv_index_BS, kind=mask.kind, scale=scale,
                block_q=block_q, block_k=block_k)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def _flash(q_BTHd, k_BSKd, v_BSKd, qseg_BT, qidx_BT, kvseg_BS, kvidx_BS, kind, scale,
           block_q, block_k):
  return _flash_fwd(q_BTHd, k_BSKd, v_BSKd, qseg_BT, qidx_BT, kvseg_BS, kvidx_BS, kind,
                    scale, block_q, block_k)[0]


def _prepare(q_BTHd, k_BSKd, v_BSKd, qseg_BT, qidx_BT, kvseg_BS, kvidx_BS, kind, block_q,
             block_k):
  # An identity that XLA may not look through: without it, inside the model's layer scan
  # the mask-only work of every block pair (visibility, liveness) is hoisted out of the
  # loops and stacked over all block pairs -- O(T S) memory again (docs/memory.md).
  q_BTHd, qseg_BT, qidx_BT, kvseg_BS, kvidx_BS = jax.lax.optimization_barrier(
      (q_BTHd, qseg_BT, qidx_BT, kvseg_BS, kvidx_BS))
  B, T, H, Dh = q_BTHd.shape
  K = k_BSKd.shape[2]
  mask = AttentionMask(qseg_BT, qidx_BT, kvseg_BS, kvidx_BS, kind=kind)
  bq = min(block_q, T)
  n = -(-T // bq)
  q = _blocks(q_BTHd.reshape(B, T, K, H // K, Dh), n, bq)
  qseg, qidx = _blocks(qseg_BT, n, bq), _blocks(qidx_BT, n, bq)
  ks = _keyset(mask, k_BSKd, v_BSKd, kvseg_BS, kvidx_BS, qseg, qidx, block_k)
  return mask, q, qseg, qidx, ks, n, bq


def _flash_fwd(q_BTHd, k_BSKd, v_BSKd, qseg_BT, qidx_BT, kvseg_BS, kvidx_BS, kind, scale,
               block_q, block_k):
  B, T, H, Dh = q_BTHd.shape
  mask, q, qseg, qidx, ks, n, bq = _prepare(q_BTHd, k_BSKd, v_BSKd, qseg_BT, qidx_BT,
                                            kvseg_BS, kvidx_BS, kind, block_q, block_k)
  out32, stats = _flash_forward(mask, q, qseg, qidx, [ks], scale)
  out = jnp.moveaxis(out32, 0, 1).reshape(B, n * bq, H, Dh)[:, :T].astype(v_BSKd.dtype)
  res = (q_BTHd, k_BSKd, v_BSKd, qseg_BT, qidx_BT, kvseg_BS, kvidx_BS, out, stats)
  return out, res


def _flash_bwd(kind, scale, block_q, block_k, res, dout_BTHd):
  """FlashAttention-2 backward (Dao 2023): per block pair, P = exp(S - m) / l,
  dV += P^T dO, dP = dO V^T, dS = P (dP - rowsum(dO * O)), dQ += dS K, dK += dS^T Q."""
  q_BTHd, k_BSKd, v_BSKd, qseg_BT, qidx_BT, kvseg_BS, kvidx_BS, out_BTHd, (m, inv_l) = res
  B, T, H, Dh = q_BTHd.shape
  K = k_BSKd.shape[2]
  G = H // K
  mask, q, qseg, qidx, ks, n, bq = _prepare(q_BTHd, k_BSKd, v_BSKd, qseg_BT, qidx_BT,
                                            kvseg_BS, kvidx_BS, kind, block_q, block_k)
  k_m, v_m, seg_k, idx_k, inr_k, live = ks
  do = _blocks(dout_BTHd.reshape(B, T, K, G, Dh), n, bq)               # [n, B, bq, K, G, Dh]
  o = _blocks(out_BTHd.reshape(B, T, K, G, Dh), n, bq)
  # D = rowsum(dO * O) per query row: [n, B, K, G, bq]
  d_rows = jnp.moveaxis(jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), -1), 2, -1)
  dq0 = jnp.zeros(q.shape, jnp.float32)

  def key_block(dq, xs):
    k_j, v_j, seg_kj, idx_kj, inr_kj, live_j = xs

    def query_block(carry, ys):
      dq, dk, dv = carry
      i, q_i, do_i, seg_q, idx_q, m_i, inv_l_i, d_i, live = ys

      def compute(carry):
        dq, dk, dv = carry
        s, vis = _scores(mask, q_i, k_j, seg_q, idx_q, seg_kj, idx_kj, inr_kj, scale)
        p = jnp.exp(s - m_i[..., None]) * inv_l_i[..., None]         # [B, K, G, bq, bk]
        dv = dv + jnp.einsum("bkgqs,bqkgd->bskd", p.astype(do_i.dtype), do_i,
                             preferred_element_type=jnp.float32)
        dp = jnp.einsum("bqkgd,bskd->bkgqs", do_i, v_j, preferred_element_type=jnp.float32)
        ds = jnp.where(vis, p * (dp - d_i[..., None]), 0.0) * scale
        dq_i = jnp.einsum("bkgqs,bskd->bqkgd", ds, k_j.astype(jnp.float32))
        dk = dk + jnp.einsum("bkgqs,bqkgd->bskd", ds, q_i.astype(jnp.float32))
        return dq.at[i].add(dq_i), dk, dv
      return jax.lax.cond(live, compute, lambda c: c, carry), None

    bk = k_j.shape[1]
    dk0 = jnp.zeros((B, bk, K, Dh), jnp.float32)
    (dq, dk, dv), _ = jax.lax.scan(
        query_block, (dq, dk0, dk0),
        (jnp.arange(n), q, do, qseg, qidx, m, inv_l, d_rows, live_j))
    return dq, (dk, dv)

  dq, (dk, dv) = jax.lax.scan(key_block, dq0, (k_m, v_m, seg_k, idx_k, inr_k, live.T))
  S = k_BSKd.shape[1]
  unblock = lambda x, L: jnp.moveaxis(x, 0, 1).reshape((B, -1) + x.shape[3:])[:, :L]
  dq = unblock(dq, T).reshape(B, T, H, Dh).astype(q_BTHd.dtype)
  dk = unblock(dk, S).astype(k_BSKd.dtype)
  dv = unblock(dv, S).astype(v_BSKd.dtype)
  return dq, dk, dv, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------
# cudnn (GPU) and splash (TPU): kernels shipped with JAX
# ----------------------------------------------------------------------------

def _sees_any(vis_BTS):
  return jnp.any(vis_BTS, axis=-1)[:, :, None, None]


def _cudnn(q_BTHd, k_BSKd, v_BSKd, mask, scale, new_k_BTKd=None, new_v_BTKd=None,
           implementation: str | None = "cudnn"):
  """jax.nn.dot_product_attention (cuDNN flash attention on GPU) with the visibility rule
  as its boolean mask [B, 1, T, S] (cuDNN takes it as an additive bias; the kernel
  still never keeps the [T, S] probabilities for the backward pass). For a KV cache the
  new keys are appended to the cache's (one copy per layer). Rows that see no key give
  0 (cuDNN's softmax of an all-masked row is not defined). `implementation=None` runs
  the same call through XLA, which is how the adapter is tested on CPU."""
  vis = mask.dense_matrix()
  if mask.kind == "cached":
    old, new = vis
    vis = jnp.concatenate([old, new], axis=-1)
    k_BSKd = jnp.concatenate([k_BSKd, new_k_BTKd], axis=1)
    v_BSKd = jnp.concatenate([v_BSKd, new_v_BTKd], axis=1)
  dt = v_BSKd.dtype
  out = jax.nn.dot_product_attention(q_BTHd.astype(dt), k_BSKd.astype(dt), v_BSKd,
                                     mask=vis[:, None], scale=scale,
                                     implementation=implementation)
  return jnp.where(_sees_any(vis), out, 0).astype(dt)


def _splash(q_BTHd, k_BSKd, v_BSKd, mask, scale, interpret: bool = False):
  """The Pallas splash-attention TPU kernel (jax.experimental.pallas.ops.tpu), causal
  with segment ids; one kernel per kv head over its G query heads (`make_splash_mqa`),
  vmapped over the batch and the kv heads. T is padded to the kernel's block size
  (padding is segment 0, which no real query sees). `interpret=True` runs the kernel
  in the Pallas interpreter (CPU tests)."""
  from jax.experimental.pallas.ops.tpu.splash_attention import (  # pylint: disable=g-import-not-at-top
      splash_attention_kernel as sk, splash_attention_mask as sm)
  B, T, H, Dh = q_BTHd.shape
  K = k_BSKd.shape[2]
  G = H // K
  block = 128
  L = -(-T // block) * block
  pad = lambda x: jnp.pad(x, [(0, 0), (0, L - T)] + [(0, 0)] * (x.ndim - 2))
  seg = pad(mask.q_segment_BT)
  dt = v_BSKd.dtype
  q = pad(q_BTHd * jnp.asarray(scale, q_BTHd.dtype)).reshape(B, L, K, G, Dh)
  q_BKGLd = jnp.transpose(q, (0, 2, 3, 1, 4))
  k_BKLd = jnp.transpose(pad(k_BSKd), (0, 2, 1, 3))
  v_BKLd = jnp.transpose(pad(v_BSKd), (0, 2, 1, 3))
  sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                        block_q_dq=block, block_kv_dq=block)
  heads = sm.MultiHeadMask([sm.CausalMask((L, L)) for _ in range(G)])
  kernel = sk.make_splash_mqa(heads, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                              interpret=interpret)
  def one(q_GLd, k_Ld, v_Ld, seg_L):
    return kernel(q_GLd, k_Ld, v_Ld, segment_ids=sk.SegmentIds(q=seg_L, kv=seg_L))
  per_head = jax.vmap(one, in_axes=(0, 0, 0, None))                # over kv heads
  out_BKGLd = jax.vmap(per_head)(q_BKGLd, k_BKLd, v_BKLd, seg)
  out = jnp.transpose(out_BKGLd, (0, 3, 1, 2, 4)).reshape(B, L, H, Dh)[:, :T]
  sees = (mask.q_segment_BT > 0)[:, :, None, None]
  return jnp.where(sees, out, 0).astype(dt)
