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


def per_token_logprobs(logits_BTV: jax.Array, tokens_BT: jax.Array, mask_BT: jax.Array,
                       temperature: float = 1.0):
  """Shifted, masked next-token log-probs: (logps_BS, mask_BS), S = T - 1, float32.

      logps_BS[b, s] = mask_BT[b, s+1] * log softmax(logits_BTV[b, s] / temperature)[tokens_BT[b, s+1]]
      mask_BS[b, s]  = mask_BT[b, s+1]

  Unshifted inputs: mask_BT[b, t] = 1 means token t is scored (by the logits at
  t - 1); mask_BT[:, 0] is ignored since nothing predicts the first token.
  Masked positions hold exactly 0 (never NaN), so sums over s need no further
  masking.
  """
  logits_BSV, targets_BS, mask_BS = shift_for_next_token(logits_BTV, tokens_BT, mask_BT)
  mask_BS = mask_BS.astype(jnp.float32)
  logps_BS = token_logprobs(logits_BSV, targets_BS, temperature)
  return jnp.where(mask_BS > 0, logps_BS * mask_BS, 0.0), mask_BS


def sequence_logprobs(logits_BTV: jax.Array, tokens_BT: jax.Array,
                      completion_mask_BT: jax.Array, temperature: float = 1.0):
  """Per-sequence log-probability of the completion: (sum_B, mean_B, count_B), float32.

      sum_B[b]   = sum_{t >= 1} m[b, t] log p(tokens[b, t] | tokens[b, <t])
      count_B[b] = sum_{t >= 1} m[b, t]
      mean_B[b]  = sum_B[b] / max(count_B[b], 1)

  with m = completion_mask_BT and p = softmax(logits_BTV / temperature).
  Inputs are *unshifted*: logits_BTV[:, t] are the model outputs at position t
  (they predict token t + 1), tokens_BT are the input tokens, and
  completion_mask_BT[b, t] = 1 marks token t as a completion token, scored by
  the logits at t - 1. The shift happens here; completion_mask_BT[:, 0] is
  ignored (nothing predicts the first token; it is a prompt/BOS token anyway).
  Works for left- or right-padded rows: only the mask decides what counts.

  sum_B is log pi(y | x) as used by DPO-style losses; mean_B is the
  length-normalised log-prob used by SimPO / ORPO; count_B is |y|.
  """
  logps_BS, mask_BS = per_token_logprobs(logits_BTV, tokens_BT, completion_mask_BT, temperature)
  sum_B = jnp.sum(logps_BS, axis=-1)
  count_B = jnp.sum(mask_BS, axis=-1)
  return sum_B, sum_B / jnp.maximum(count_B, 1.0), count_B
