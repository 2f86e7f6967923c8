"""The attention mask: one visibility rule, described by per-token arrays (never [T, S]).

    visible(t, s) = kv_seg[s] > 0  and  kv_idx[s] <= q_idx[t]
                    and (kv_seg[s] == q_seg[t]  or  (shared_prefix and kv_seg[s] == 1))
                    [and q_idx[t] - kv_idx[s] < window   (sliding-window layers)]

`AttentionMask` and its constructors for the three kinds (`causal_mask`,
`shared_prefix_mask`, `cached_mask`); every backend of `rlhf_jax.models.attention.attend`
reads the same mask (the kinds are described in that module's docstring).
"""
from __future__ import annotations

from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp

Array = jax.Array
NEG_INF = -1e30  # masked score: a row that sees no key gives a uniform (not NaN) softmax


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
  window: an int32 scalar (traced: it differs per layer) when a query sees only the keys
  less than `window` indices back (sliding-window attention); None = no window.
  """
  q_segment_BT: Array
  q_index_BT: Array
  kv_segment_BS: Array
  kv_index_BS: Array
  new_segment_BT: Optional[Array] = None
  dense: Optional[object] = None
  window: Optional[Array] = None
  kind: str = flax.struct.field(pytree_node=False, default="causal")

  def visible(self, q_seg, q_idx, kv_seg, kv_idx):
    """bool [..., Tq, Sk] of the visibility rule for query / key slices."""
    q_seg, q_idx = q_seg[..., :, None], q_idx[..., :, None]
    kv_seg, kv_idx = kv_seg[..., None, :], kv_idx[..., None, :]
    same = kv_seg == q_seg
    if self.kind == "shared_prefix":
      same = same | (kv_seg == 1)
    vis = (kv_idx <= q_idx) & same & (kv_seg > 0)
    if self.window is not None:
      vis = vis & (q_idx - kv_idx < self.window)
    return vis

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
  sees segment 1 (`segments.pack_shared_prefix`)."""
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
