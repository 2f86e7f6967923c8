"""Simplest entry points onto the model.

Log-prob passes (SFT loss, DPO-family scoring, GRPO/PPO updates, old/reference
log-probs) go through `token_logprobs_from_hidden` / `window_logprobs`, which honour
`ModelConfig.logits_chunk` (chunked unembed -> log-softmax -> gather,
`losses.logprobs.chunked_token_logprobs`). Reward models and PRMs put scalar heads
on the hidden states (`models.heads`) and never unembed: the knob does not concern them.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from rlhf_jax.losses.logprobs import chunked_token_logprobs, token_entropy, token_logprobs
from rlhf_jax.models.segments import pack_shared_prefix
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
  h_NKD, packed = _window_hidden(model, params, tokens_BT, segment_ids_BT, start_B,
                                 group_size, window, pad_id)
  B, W = packed.predict_BW.shape
  logits_NKV = model.apply({"params": params}, h_NKD, method=Transformer.unembed)
  return logits_NKV.reshape(B, W, -1), packed


def _window_hidden(model, params, tokens_BT, segment_ids_BT, start_B, group_size, window,
                   pad_id):
  """(h_NKD, packed): the final hidden states predicting the window tokens, K = G * W per
  packed row (`window_logits` before the unembedding)."""
  packed = pack_shared_prefix(tokens_BT, segment_ids_BT, start_B, group_size, window, pad_id)
  h_NLD, _ = model.apply({"params": params}, packed.tokens_NL, packed.segment_ids_NL,
                         packed.positions_NL, shared_prefix=True, output="hidden")
  N = h_NLD.shape[0]
  idx_NK = packed.predict_BW.reshape(N, -1)                  # K = G * W
  return jnp.take_along_axis(h_NLD, idx_NK[..., None], axis=1), packed


def token_logprobs_from_hidden(model: Transformer, params, h_BTD, targets_BT, *, chunk: int,
                               temperature: float = 1.0, entropy: bool = False):
  """log softmax(unembed(h_BTD) / temperature)[targets_BT], float32 [B, T] (and the
  entropies [B, T] with entropy=True: returns (logp_BT, ent_BT)), `chunk` tokens at a
  time (0 = all at once).

  `losses.logprobs.chunked_token_logprobs` with the model's `Transformer.unembed`:
  formula, memory (~B chunk V 4 bytes of logits alive instead of ~12 B T V bytes) and
  the rematerialisation are documented there. h_BTD are final hidden states
  (`output="hidden"`) already aligned with the targets (h[:, :-1] for tokens[:, 1:]).
  Callers pass chunk=model.config.logits_chunk.
  """
  unembed = lambda h_BCD: model.apply({"params": params}, h_BCD, method=Transformer.unembed)
  return chunked_token_logprobs(unembed, h_BTD, targets_BT, chunk=chunk,
                                temperature=temperature, entropy=entropy)


def window_logprobs(model: Transformer, params, tokens_BT, segment_ids_BT, start_B, *,
                    group_size: int, window: int, chunk: int, temperature: float = 1.0,
                    entropy: bool = False, pad_id: int = 0):
  """`window_logits` followed by the log-probs of the window tokens, without the
  [B, W, V] logits when chunk > 0: (logp_BW, ent_BW or None, packed).

      logp_BW[b, w] = log softmax(logits_BWV[b, w] / temperature)[packed.targets_BW[b, w]]
      ent_BW[b, w]  = entropy of that softmax (with entropy=True; else None)

  chunk = 0 unembeds every window position at once (`window_logits`, then
  `token_logprobs` / `token_entropy`); chunk > 0 unembeds `chunk` positions of each
  packed row at a time (`token_logprobs_from_hidden`; the same values to float
  tolerance). Invalid slots (packed.valid_BW False) hold finite values for the caller
  to mask.
  """
  if chunk <= 0:
    logits_BWV, packed = window_logits(model, params, tokens_BT, segment_ids_BT, start_B,
                                       group_size=group_size, window=window, pad_id=pad_id)
    logp_BW = token_logprobs(logits_BWV, packed.targets_BW, temperature)
    ent_BW = token_entropy(logits_BWV, temperature) if entropy else None
    return logp_BW, ent_BW, packed
  h_NKD, packed = _window_hidden(model, params, tokens_BT, segment_ids_BT, start_B,
                                 group_size, window, pad_id)
  B, W = packed.targets_BW.shape
  N = h_NKD.shape[0]
  out = token_logprobs_from_hidden(model, params, h_NKD, packed.targets_BW.reshape(N, -1),
                                   chunk=chunk, temperature=temperature, entropy=entropy)
  logp_NK, ent_NK = out if entropy else (out, None)
  return (logp_NK.reshape(B, W), None if ent_NK is None else ent_NK.reshape(B, W), packed)


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
