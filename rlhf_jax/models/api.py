"""Simplest entry points onto the model."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from rlhf_jax.models.transformer import ModelConfig, Transformer


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
