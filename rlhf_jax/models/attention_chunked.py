"""The `chunked` attention backend: blockwise attention with an online softmax, in plain JAX.

Rabe & Staats 2021 for the forward (query blocks x key blocks, running max and sum);
FlashAttention-2's backward (Dao 2023): only the output and each row's softmax
statistics are saved, the scores are recomputed block by block. Memory O(T * block);
runs on every platform including CPU. Key blocks that no query of a block can see are
skipped (causal: ~half; decoding: the unfilled cache). Selected through
`rlhf_jax.models.attention.attend` (see its module docstring for the mask rule).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from rlhf_jax.models.attention_mask import NEG_INF, AttentionMask


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


def _scores(mask, q_i, k_j, seg_q, idx_q, seg_k, idx_k, inrange_k, scale, softcap=0.0):
  """float32 masked scores [B, K, G, bq, bk] of one (query, key) block pair and the
  visibility [B, 1, 1, bq, bk]: NEG_INF where masked, -inf on padding past S. softcap > 0:
  scores softcap * tanh(scores / softcap) before masking."""
  s = jnp.einsum("bqkgd,bskd->bkgqs", q_i, k_j, preferred_element_type=jnp.float32) * scale
  if softcap:
    s = softcap * jnp.tanh(s / softcap)
  vis = mask.visible(seg_q, idx_q, seg_k, idx_k)[:, None, None]
  s = jnp.where(vis, s, NEG_INF)
  return jnp.where(inrange_k[None, None, None, None, :], s, -jnp.inf), vis


def _flash_forward(mask, q_nBqKGd, qseg_nBq, qidx_nBq, keysets, scale, softcap=0.0):
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
          s, _ = _scores(mask, q_i, k_j, seg_q, idx_q, seg_kj, idx_kj, inr_kj, scale,
                         softcap)
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


def _chunked(q_BTHd, k_BSKd, v_BSKd, mask, scale, new_k_BTKd, new_v_BTKd, block_q, block_k,
             softcap=0.0):
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
    out, _ = _flash_forward(mask, q, qseg, qidx, keysets, scale, softcap)
    return jnp.moveaxis(out, 0, 1).reshape(B, n * bq, H, Dh)[:, :T].astype(dt)
  return _flash(q_BTHd, k_BSKd, v_BSKd, mask.q_segment_BT, mask.q_index_BT,
                mask.kv_segment_BS, mask.kv_index_BS, mask.window, kind=mask.kind,
                scale=scale, block_q=block_q, block_k=block_k, softcap=softcap)


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10, 11, 12))
def _flash(q_BTHd, k_BSKd, v_BSKd, qseg_BT, qidx_BT, kvseg_BS, kvidx_BS, window, kind, scale,
           block_q, block_k, softcap):
  return _flash_fwd(q_BTHd, k_BSKd, v_BSKd, qseg_BT, qidx_BT, kvseg_BS, kvidx_BS, window, kind,
                    scale, block_q, block_k, softcap)[0]


def _prepare(q_BTHd, k_BSKd, v_BSKd, qseg_BT, qidx_BT, kvseg_BS, kvidx_BS, window, kind,
             block_q, block_k):
  # An identity that XLA may not look through: without it, inside the model's layer scan
  # the mask-only work of every block pair (visibility, liveness) is hoisted out of the
  # loops and stacked over all block pairs -- O(T S) memory again (docs/memory.md).
  q_BTHd, qseg_BT, qidx_BT, kvseg_BS, kvidx_BS = jax.lax.optimization_barrier(
      (q_BTHd, qseg_BT, qidx_BT, kvseg_BS, kvidx_BS))
  B, T, H, Dh = q_BTHd.shape
  K = k_BSKd.shape[2]
  mask = AttentionMask(qseg_BT, qidx_BT, kvseg_BS, kvidx_BS, window=window, kind=kind)
  bq = min(block_q, T)
  n = -(-T // bq)
  q = _blocks(q_BTHd.reshape(B, T, K, H // K, Dh), n, bq)
  qseg, qidx = _blocks(qseg_BT, n, bq), _blocks(qidx_BT, n, bq)
  ks = _keyset(mask, k_BSKd, v_BSKd, kvseg_BS, kvidx_BS, qseg, qidx, block_k)
  return mask, q, qseg, qidx, ks, n, bq


def _flash_fwd(q_BTHd, k_BSKd, v_BSKd, qseg_BT, qidx_BT, kvseg_BS, kvidx_BS, window, kind,
               scale, block_q, block_k, softcap):
  B, T, H, Dh = q_BTHd.shape
  mask, q, qseg, qidx, ks, n, bq = _prepare(q_BTHd, k_BSKd, v_BSKd, qseg_BT, qidx_BT,
                                            kvseg_BS, kvidx_BS, window, kind, block_q,
                                            block_k)
  out32, stats = _flash_forward(mask, q, qseg, qidx, [ks], scale, softcap)
  out = jnp.moveaxis(out32, 0, 1).reshape(B, n * bq, H, Dh)[:, :T].astype(v_BSKd.dtype)
  res = (q_BTHd, k_BSKd, v_BSKd, qseg_BT, qidx_BT, kvseg_BS, kvidx_BS, window, out, stats)
  return out, res


def _flash_bwd(kind, scale, block_q, block_k, softcap, res, dout_BTHd):
  """FlashAttention-2 backward (Dao 2023): per block pair, P = exp(S - m) / l,
  dV += P^T dO, dP = dO V^T, dS = P (dP - rowsum(dO * O)), dQ += dS K, dK += dS^T Q."""
  (q_BTHd, k_BSKd, v_BSKd, qseg_BT, qidx_BT, kvseg_BS, kvidx_BS, window, out_BTHd,
   (m, inv_l)) = res
  B, T, H, Dh = q_BTHd.shape
  K = k_BSKd.shape[2]
  G = H // K
  mask, q, qseg, qidx, ks, n, bq = _prepare(q_BTHd, k_BSKd, v_BSKd, qseg_BT, qidx_BT,
                                            kvseg_BS, kvidx_BS, window, kind, block_q,
                                            block_k)
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
        s, vis = _scores(mask, q_i, k_j, seg_q, idx_q, seg_kj, idx_kj, inr_kj, scale,
                         softcap)
        p = jnp.exp(s - m_i[..., None]) * inv_l_i[..., None]         # [B, K, G, bq, bk]
        dv = dv + jnp.einsum("bkgqs,bqkgd->bskd", p.astype(do_i.dtype), do_i,
                             preferred_element_type=jnp.float32)
        dp = jnp.einsum("bqkgd,bskd->bkgqs", do_i, v_j, preferred_element_type=jnp.float32)
        ds = jnp.where(vis, p * (dp - d_i[..., None]), 0.0) * scale
        if softcap:  # d(c tanh(x / c)) / dx = 1 - tanh^2 = 1 - (s / c)^2 where visible
          ds = ds * jnp.where(vis, 1.0 - jnp.square(s / softcap), 0.0)
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
  return dq, dk, dv, None, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)
