"""Per-token log-probabilities: the one place they are computed.

Convention: logits at position t predict the token at t+1. Callers pass the
logits and the *targets* already aligned (targets_BT = tokens_BT[:, 1:] with
logits_BTV = logits[:, :-1]), see `shift_for_next_token`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def shift_for_next_token(logits_BTV, tokens_BT, mask_BT):
  """Align next-token predictions: (logits[:, :-1], tokens[:, 1:], mask[:, 1:])."""
  return logits_BTV[:, :-1], tokens_BT[:, 1:], mask_BT[:, 1:]


def token_logprobs(logits_BTV: jax.Array, targets_BT: jax.Array,
                   temperature: float = 1.0) -> jax.Array:
  """log softmax(logits / temperature)[target], float32 [B, T].

  Computed as logit[target] - logsumexp(logits) in float32, without
  materialising the full log-softmax.
  """
  logits = logits_BTV.astype(jnp.float32)
  if temperature != 1.0:
    logits = logits / temperature
  target_logit = jnp.take_along_axis(logits, targets_BT[..., None].astype(jnp.int32), axis=-1)
  return target_logit[..., 0] - jax.nn.logsumexp(logits, axis=-1)


def masked_mean(x, mask, axis=None):
  """sum(x * mask) / max(sum(mask), 1) over `axis` (all axes by default)."""
  mask = mask.astype(jnp.float32)
  return jnp.sum(x * mask, axis=axis) / jnp.maximum(jnp.sum(mask, axis=axis), 1.0)
