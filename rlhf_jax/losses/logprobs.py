"""Per-token log-probabilities: the one place they are computed.

Convention: logits at position t predict the token at t+1. Callers pass the
logits and the *targets* already aligned (targets_BT = tokens_BT[:, 1:] with
logits_BTV = logits[:, :-1]), see `shift_for_next_token`.

`chunked_token_logprobs` computes the same log-probs (and entropies) from the
final hidden states a chunk of tokens at a time, so that the [B, T, V] logits are
never alive at once (`model.logits_chunk`; `models.api.token_logprobs_from_hidden`
binds it to a model).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from rlhf_jax.losses.arrays import masked_mean  # noqa: F401 (re-exported)


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


def token_entropy(logits_BTV: jax.Array, temperature: float = 1.0) -> jax.Array:
  """Entropy of softmax(logits / temperature) per position, float32 [B, T].

      H = -sum_v p_v log p_v,   p = softmax(z),  z = logits / temperature

  A sum of non-negative terms (no cancellation for peaked p); banned (-inf)
  logits have p = 0 and contribute 0 (not 0 * -inf = NaN).
  """
  z = jnp.asarray(logits_BTV, jnp.float32)
  if temperature != 1.0:
    z = z / temperature
  logp = jax.nn.log_softmax(z, axis=-1)
  return -jnp.sum(jnp.exp(logp) * jnp.where(jnp.isfinite(logp), logp, 0.0), axis=-1)


def chunked_token_logprobs(unembed_fn: Callable[[jax.Array], jax.Array], h_BTD: jax.Array,
                           targets_BT: jax.Array, *, chunk: int, temperature: float = 1.0,
                           entropy: bool = False):
  """Target log-probs (and entropies) from final hidden states, `chunk` tokens at a time.

      logits_BTV   = unembed_fn(h_BTD)                    (float32)
      logp_BT[b,t] = log softmax(logits_BTV[b, t] / temperature)[targets_BT[b, t]]
      ent_BT[b,t]  = -sum_v p_v log p_v,  p = softmax(logits_BTV[b, t] / temperature)

  Returns logp_BT, or (logp_BT, ent_BT) with entropy=True; float32 [B, T], the
  same values as `token_logprobs(unembed_fn(h_BTD), targets_BT, temperature)` and
  `token_entropy(...)`. Inputs are aligned like `token_logprobs` (shift the hidden
  states, not the logits: `shift_for_next_token` works on any [B, T, ...] array).

  chunk = 0: exactly that unchunked computation (the [B, T, V] logits at once).
  chunk > 0: the T axis is split into ceil(T / chunk) chunks (T padded up to a
  multiple of chunk with zero hidden states and target 0; the padded positions are
  cut from the result, so they give nothing; chunk > T means one chunk of T) and a
  `lax.map` runs unembed -> log-softmax -> gather (-> entropy) on one [B, chunk, D]
  slice at a time. The body is `jax.checkpoint`-ed: the backward pass keeps only its
  inputs (the hidden chunk, already an input of the whole function) and recomputes
  the chunk's logits, instead of saving every chunk's logits as residuals.

  Memory (why): unchunked, a loss-and-gradient pass holds the float32 logits, their
  exponentials / log-softmax and their cotangent for every token: up to 3 [B, T, V]
  float32 buffers, ~12 B T V bytes (1.5 GiB for T = 4096, V = 32k at B = 1; more than
  all other activations of a small model under remat). Chunked, only buffers of
  ~B chunk V x 4 bytes are alive at a time, for one extra unembed matmul per chunk in
  the backward pass. Measured (XLA:CPU temporaries of value_and_grad of the SFT loss,
  V = 32768, T = 1024, D = 64, one layer, tests/test_logprobs_chunked.py): 278 MiB
  unchunked, 54 MiB with chunk = 128.

  unembed_fn maps hidden states [B, C, D] to float32 logits [B, C, V] (a model's
  `Transformer.unembed` bound to its parameters: `models.api.token_logprobs_from_hidden`).
  """
  if chunk <= 0:
    logits_BTV = unembed_fn(h_BTD)
    logp_BT = token_logprobs(logits_BTV, targets_BT, temperature)
    return (logp_BT, token_entropy(logits_BTV, temperature)) if entropy else logp_BT
  B, T, D = h_BTD.shape
  C = max(1, min(chunk, T))
  n = -(-T // C)
  pad = n * C - T
  h_NBCD = jnp.pad(h_BTD, ((0, 0), (0, pad), (0, 0))).reshape(B, n, C, D).swapaxes(0, 1)
  t_NBC = jnp.pad(targets_BT.astype(jnp.int32), ((0, 0), (0, pad)))
  t_NBC = t_NBC.reshape(B, n, C).swapaxes(0, 1)

  def one_chunk(args):
    h_BCD, t_BC = args
    logits_BCV = unembed_fn(h_BCD)
    logp_BC = token_logprobs(logits_BCV, t_BC, temperature)
    return (logp_BC, token_entropy(logits_BCV, temperature)) if entropy else logp_BC

  out = jax.lax.map(jax.checkpoint(one_chunk, prevent_cse=False), (h_NBCD, t_NBC))
  unchunk = lambda x_NBC: x_NBC.swapaxes(0, 1).reshape(B, n * C)[:, :T]
  return jax.tree.map(unchunk, out)


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


def sequence_logprobs_from_token_logps(logps_BS: jax.Array, mask_BS: jax.Array):
  """`sequence_logprobs` from already shifted per-token log-probs (e.g. chunked ones,
  `chunked_token_logprobs`): (sum_B, mean_B, count_B), float32.

      sum_B[b] = sum_s m[b, s] logps_BS[b, s],   count_B[b] = sum_s m[b, s]

  logps_BS[b, s] scores token s + 1 and mask_BS = completion_mask_BT[:, 1:]
  (`shift_for_next_token`); masked entries never contribute (not even a NaN).
  """
  mask_BS = mask_BS.astype(jnp.float32)
  sum_B = jnp.sum(jnp.where(mask_BS > 0, logps_BS * mask_BS, 0.0), axis=-1)
  count_B = jnp.sum(mask_BS, axis=-1)
  return sum_B, sum_B / jnp.maximum(count_B, 1.0), count_B
