"""Simplest entry points onto the model."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from rlhf_jax.models.transformer import ModelConfig, Transformer, pack_shared_prefix


def lm_logits(config: ModelConfig, params, tokens_BT, segment_ids_BT=None) -> jax.Array:
  """float32 logits [B, T, V] of the decoder LM on int tokens [B, T].

  `segment_ids_BT` (optional, int, 0 = padding) handles left-padded batches.
  """
  tokens_BT = jnp.asarray(tokens_BT, jnp.int32)
  if tokens_BT.ndim != 2:
    raise ValueError(f"tokens must be [batch, time], got shape {tokens_BT.shape}")
  logits, _ = _forward(config, params, tokens_BT, segment_ids_BT)
  return logits


@functools.partial(jax.jit, static_argnums=0)
def _forward(config, params, tokens_BT, segment_ids_BT):
  return Transformer(config).apply({"params": params}, tokens_BT, segment_ids_BT)


def window_logits(model: Transformer, params, tokens_BT, segment_ids_BT, start_B, *,
                  group_size: int, window: int, pad_id: int = 0):
  """Logits predicting each row's `window` tokens from slot start_b on, with the shared
  prompt of every group of `group_size` rows run once (`pack_shared_prefix`) and only
  the window positions unembedded.

  Returns (logits_BWV float32, packed: PackedPrefix): logits_BWV[b, w] are the
  model's logits for token tokens_BT[b, start_b + w] = packed.targets_BW[b, w] given
  the tokens before it in row b; rows whose window token is padding or past T have
  packed.valid_BW False. Equal (to float tolerance) to the unpacked forward pass's
  logits[b, start_b + w - 1].
  """
  packed = pack_shared_prefix(tokens_BT, segment_ids_BT, start_B, group_size, window, pad_id)
  h_NLD, _ = model.apply({"params": params}, packed.tokens_NL, packed.segment_ids_NL,
                         packed.positions_NL, shared_prefix=True, output="hidden")
  N = h_NLD.shape[0]
  B, W = packed.predict_BW.shape
  idx_NK = packed.predict_BW.reshape(N, -1)                  # K = G * W
  h_NKD = jnp.take_along_axis(h_NLD, idx_NK[..., None], axis=1)
  logits_NKV = model.apply({"params": params}, h_NKD, method=Transformer.unembed)
  return logits_NKV.reshape(B, W, -1), packed


def prefix_sharing_saves_flops(config: ModelConfig, prefix_len: int, window: int,
                               group_size: int) -> bool:
  """Whether packing groups of `group_size` rows of [prefix_len | window] tokens into one
  row (`window_logits`) costs fewer forward FLOPs than running the rows separately.

  Matmuls scale with tokens (P + G W packed vs G (P + W)), but the dense attention with
  the square of the row length ((P + G W)^2 vs G (P + W)^2, the masked blocks between
  continuations included), so long continuations or large groups can make packing a loss.
  """
  P, W, G = prefix_len, window, group_size
  if G <= 1:
    return True
  c = config
  per_token = 2 * (c.d_model * c.head_dim * (c.n_heads + 2 * c.n_kv_heads)
                   + c.n_heads * c.head_dim * c.d_model + 3 * c.d_model * c.d_ff) * c.n_layers
  attn = 4 * c.n_layers * c.n_heads * c.head_dim  # QK^T and PV per (query, key) pair
  packed = (P + G * W) * per_token + attn * (P + G * W) ** 2
  separate = G * (P + W) * per_token + attn * G * (P + W) ** 2
  return packed < separate
