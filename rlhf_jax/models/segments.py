"""Segment ids -> position ids, attention masks as matrices, and shared-prefix packing.

A row's int segment ids (0 = padding, equal positive ids = one sequence, several when
packed) define everything position-dependent outside the model: the position ids
restarting per segment (`positions_from_segments`), the boolean [B, T, T] masks of
`rlhf_jax.models.attention_mask`'s rule (`segment_causal_mask`, `shared_prefix_mask`),
and the packing of G rows that share a prompt into one row (`pack_shared_prefix`:
prefix sharing for DPO pairs and GRPO groups).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from rlhf_jax.models import attention_mask

Array = jax.Array


# ----------------------------------------------------------------------------
# Position ids and attention masks (one place for both)
# ----------------------------------------------------------------------------

def positions_from_segments(segment_ids_BT: Array) -> Array:
  """Position ids restarting at 0 at the start of every segment.

  segment_ids_BT: int [B, T]; 0 marks padding, equal positive ids mark one
  sequence (several when packed). Works for left- and right-padding.
  """
  T = segment_ids_BT.shape[1]
  idx = jnp.arange(T)[None, :]
  prev = jnp.pad(segment_ids_BT[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
  starts = jnp.where(segment_ids_BT != prev, idx, 0)
  first_idx = jax.lax.cummax(starts, axis=1)
  return jnp.where(segment_ids_BT > 0, idx - first_idx, 0).astype(jnp.int32)


def segment_causal_mask(segment_ids_BT: Array) -> Array:
  """bool [B, T, T]: query t sees key s iff s <= t, same segment, key not padding
  (`attention_mask.causal_mask`'s rule as a matrix)."""
  return attention_mask.causal_mask(segment_ids_BT).dense_matrix()


def shared_prefix_mask(segment_ids_BT: Array) -> Array:
  """bool [B, T, T] for rows packed as [shared prefix | continuation 1 | continuation 2 ...]:
  segment 1 is a prefix that every later segment continues. Query t sees key s iff
  s <= t, the key is not padding, and the key is in the query's segment or in segment 1.
  Each continuation then gets exactly the attention it would get alone after the prefix
  (prefix sharing: DPO's chosen and rejected replies, a GRPO group's completions).
  (`attention_mask.shared_prefix_mask`'s rule as a matrix.)"""
  return attention_mask.shared_prefix_mask(segment_ids_BT).dense_matrix()


class PackedPrefix(NamedTuple):
  """`pack_shared_prefix` output (N = B / G packed rows of length L = T + (G-1) W)."""
  tokens_NL: Array
  segment_ids_NL: Array   # 1 shared prefix, g + 2 row g's continuation, 0 padding
  positions_NL: Array     # each token's position in its own unpacked row
  predict_BW: Array       # packed index (in row b // G) whose output predicts window token w
  targets_BW: Array       # the window tokens tokens_BT[b, start_b + w] (pad_id past T)
  valid_BW: Array         # bool: window token w of row b is real and has a predictor
  slots_BW: Array         # start_b + w clipped to T - 1 (to gather other per-token arrays)


def pack_shared_prefix(tokens_BT: Array, segment_ids_BT: Array, start_B: Array,
                       group_size: int, window: int, pad_id: int = 0) -> PackedPrefix:
  """Pack each group of G rows that share a prefix into one row (prefix sharing).

  Rows b = iG .. iG+G-1 form group i; they hold the same tokens in slots
  [0, start_b) (the shared prompt; left padding allowed, start_b equal within the
  group) and their own continuation in slots [start_b, start_b + window). Packed
  row i = [row iG (all T slots) | window of row iG+1 | ... | window of row iG+G-1],
  with `shared_prefix_mask` segments and every token at the position it has in its
  own row, so the model's outputs at the window tokens equal those of the
  unpacked rows while the prompt runs once per group: T + (G-1) W tokens
  instead of G T. Window token w of row b is predicted by packed position
  predict_BW[b, w] (the last prompt slot start_b - 1 for w = 0). Slots past T
  and padding tokens are invalid (valid_BW False; their targets are pad_id).
  G = 1 keeps the rows and just indexes their windows.
  """
  B, T = tokens_BT.shape
  G, W = group_size, window
  if B % G:
    raise ValueError(f"pack_shared_prefix: {B} rows are not whole groups of {G}")
  N = B // G
  real_BT = segment_ids_BT > 0
  pos_BT = positions_from_segments(real_BT.astype(jnp.int32))
  start_B = start_B.astype(jnp.int32)
  slot_BW = start_B[:, None] + jnp.arange(W, dtype=jnp.int32)[None]
  inside_BW = slot_BW < T
  slots_BW = jnp.minimum(slot_BW, T - 1)
  take = lambda x: jnp.take_along_axis(x, slots_BW, axis=1)
  real_BW = inside_BW & take(real_BT)
  targets_BW = jnp.where(real_BW, take(tokens_BT), pad_id)
  # Packed rows: row 0 of the group in full, then the other rows' windows.
  group = lambda x: x.reshape((N, G) + x.shape[1:])
  first_NT = group(tokens_BT)[:, 0]
  start_N = group(start_B)[:, 0]
  seg_first_NT = jnp.where(group(real_BT)[:, 0],
                           jnp.where(jnp.arange(T)[None] < start_N[:, None], 1, 2), 0)
  rest = lambda x: group(x)[:, 1:].reshape(N, (G - 1) * W)
  seg_rest_NGW = jnp.where(group(real_BW)[:, 1:],
                           jnp.arange(1, G, dtype=jnp.int32)[None, :, None] + 2, 0)
  tokens_NL = jnp.concatenate([first_NT, rest(targets_BW)], axis=1)
  segment_ids_NL = jnp.concatenate([seg_first_NT, seg_rest_NGW.reshape(N, -1)], axis=1)
  positions_NL = jnp.concatenate([group(pos_BT)[:, 0], rest(take(pos_BT))], axis=1)
  g_B = jnp.arange(B, dtype=jnp.int32) % G
  w_W = jnp.arange(W, dtype=jnp.int32)[None]
  own_BW = T + (g_B[:, None] - 1) * W + w_W - 1          # inside the row's packed window
  predict_BW = jnp.where((g_B[:, None] == 0) | (w_W == 0), slot_BW - 1, own_BW)
  valid_BW = real_BW & (slot_BW >= 1)
  return PackedPrefix(tokens_NL.astype(jnp.int32), segment_ids_NL.astype(jnp.int32),
                      positions_NL, jnp.clip(predict_BW, 0, tokens_NL.shape[1] - 1),
                      targets_BW.astype(jnp.int32),
                      valid_BW, slots_BW)
