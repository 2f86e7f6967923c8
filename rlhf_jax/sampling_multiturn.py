"""Multi-turn KV-cache decoding: model turns and environment turns in one sequence per row.

An episode is one sequence [prompt | completion], where the completion interleaves the
model's turns and the environment's observation tokens:

    prompt | model turn 1 (EOS) | env tokens | model turn 2 (EOS) | env tokens | ... | pad

The prompt is prefilled once; after that no token is ever recomputed. Three jitted
functions, each compiled once per shape and static knobs (`MultiTurnSpec`; the turn
limit and the stop sequences' ids are arguments, so changing them does not recompile):

    start(prompts)                  prefill the prompts, sample each row's first token
    decode_turn(state, live_B)      decode the live rows until each ends its turn: EOS,
                                    a stop sequence (e.g. the tool-call end "</tool>"),
                                    rollout.max_tokens_per_turn tokens, or the completion
                                    budget; rows not live sit idle
    extend(state, chunk_BX, n_B)    "prefill-extend": feed up to X tokens per row (the
                                    pending model token + the env's observation tokens)
                                    into the cache at the row's own position, and sample
                                    the first token of its next turn

The Python host loop (`rollout_multiturn`) decodes the turns, asks the environments and
tokenizes their observations between these calls.

Cache layout (per row, compact): slots 0..P-1 the left-padded prompt, slot P+j the
completion token j (model or env) once it has been fed, then X scratch slots. Rows are
ragged: row b has `filled_B[b]` completion tokens in the cache and its next token goes
to position n_b + filled_B[b] (n_b = its real prompt tokens) -- exactly the positions a
full forward pass over the final sequence gives, so the log-probs equal a recomputation
(tests/test_multiturn.py). The model takes one cache index for all rows, so every call
writes its new K/V to the scratch slots first (cache index P + C, the key mask admitting
each row's prompt, its own filled completion slots and its own new tokens) and then
moves them to each row's slots P + filled .. (a scatter), as `sampling_continuous`
does. Slots past `filled_B[b]` are never attended to, so the host can take tokens
back (a turn cut at a stop string found in the decoded text) by lowering filled_B.

Sampling noise is per row as in `sampling`: model token k of row b (k counts the row's
model tokens over all its turns) is drawn with `sampling_choice.row_bits(key_b, k)`,
key_b from (rng, row_offset + b). With one turn and no stop sequence the tokens equal
`sampling.generate`'s for the same rng. Log-probs follow `sampling`'s convention
(log softmax(logits / temperature) of the sampled token, over the full vocabulary).

Not supported: sliding-window layers (the window is measured in cache slots, and the
scratch slots are not at the row's position) -- `make_spec` refuses such a model; the
shared prefill of a group's equal prompts (each row is prefilled; same samples). The KV
cache is constrained to `parallel.kv_cache_sharding` when the spec is given a mesh; the
rollout passes none yet (multi-turn sampling is tested on one device).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.models.transformer import ModelConfig, Transformer, init_cache
from rlhf_jax.sampling import _shard_cache, resolve_kv_cache_dtype
from rlhf_jax.sampling_choice import _choose, row_bits, row_keys

Array = jax.Array


class MultiTurnSpec(NamedTuple):
  """The static part of a multi-turn sampler (hashable; one compilation per value).

  P prompt columns, C completion budget (rollout.max_new_tokens: model + env tokens),
  X tokens fed per extend call, num_stops the number of stop sequences (token ids that
  end a turn besides the stop ids eos_ids; their ids are an argument, padded to
  MAX_STOP_TOKENS)."""
  config: ModelConfig
  P: int
  C: int
  X: int
  eos_ids: tuple
  num_stops: int
  pad_id: int
  top_k: int
  use_top_p: bool
  greedy: bool
  kv_cache_dtype: str
  mesh: object


MAX_STOP_TOKENS = 16  # longer stop sequences are left to the host's text check


class TurnState(NamedTuple):
  """Where every row stands (device arrays; B rows, C completion slots).

  cache: the KV cache [L, B, P + C + X, K, Dh] (k, v).
  tokens_BC / logprobs_BC: the completion so far (model and env tokens; the sampler's
    log-prob on model tokens, 0 elsewhere).
  filled_B: completion tokens in the cache. While a row is mid-episode its last token
    tokens_BC[b, filled_B[b]] is "pending": sampled but not yet fed.
  turn_start_B: index of the current model turn's first token.
  model_count_B: model tokens sampled so far (the noise step of the next one).
  """
  cache: tuple
  tokens_BC: Array
  logprobs_BC: Array
  filled_B: Array
  turn_start_B: Array
  model_count_B: Array


def make_spec(config: ModelConfig, *, prompt_len: int, max_new_tokens: int, env_chunk: int,
              eos_id, num_stops: int = 0, pad_id: int, top_k: int = 0, top_p: float = 1.0,
              greedy: bool = False, kv_cache_dtype: str = "auto", mesh=None) -> MultiTurnSpec:
  """A `MultiTurnSpec`, checked: ValueError naming the argument."""
  if config.per_layer_attention:
    raise ValueError("multi-turn sampling does not support sliding-window layers (the "
                     "window is counted in cache slots; `sampling_multiturn` docstring)")
  for name, v, lo in (("prompt_len", prompt_len, 1), ("max_new_tokens", max_new_tokens, 1),
                      ("env_chunk", env_chunk, 1)):
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < lo:
      raise ValueError(f"{name}={v!r}: expected an int >= {lo}")
  if prompt_len + max_new_tokens > config.max_seq_len:
    raise ValueError(f"prompt_len {prompt_len} + max_new_tokens {max_new_tokens} exceeds "
                     f"model.max_seq_len={config.max_seq_len}")
  V = config.vocab_size
  eos_ids = () if eos_id is None else tuple(int(e) for e in np.atleast_1d(np.asarray(eos_id)))
  for e in eos_ids + (pad_id,):
    if not 0 <= e < V:
      raise ValueError(f"token id {e} (stop id or pad) is outside [0, vocab_size={V})")
  if not greedy and top_k < 0:
    raise ValueError(f"top_k={top_k!r}: expected an int >= 0")
  return MultiTurnSpec(config, int(prompt_len), int(max_new_tokens), int(env_chunk),
                       eos_ids, int(num_stops), int(pad_id),
                       0 if greedy else int(top_k), (not greedy) and top_p < 1.0, bool(greedy),
                       resolve_kv_cache_dtype(config, kv_cache_dtype), mesh)


# ----------------------------------------------------------------------------
# The jitted pieces
# ----------------------------------------------------------------------------

def _chooser(spec, keys_B2, temperature, top_p):
  """sample(logits_BV, step_B) -> (token_B, logprob_B) with row b's noise for step_B[b]."""
  choose = functools.partial(_choose, temperature=temperature, top_p=top_p,
                             greedy=spec.greedy, top_k=spec.top_k, use_top_p=spec.use_top_p)

  def sample(logits_BV, step_B):
    bits = None if spec.greedy else row_bits(keys_B2, step_B, spec.config.vocab_size)
    return choose(logits_BV, bits)
  return sample


def _kv_mask(spec, prompt_mask_BP, filled_B, scratch_BX):
  """[B, P + C + X]: the prompt's real slots, each row's first filled_B completion slots,
  and the scratch slots holding this call's real new tokens."""
  C = spec.C
  done_BC = (jnp.arange(C)[None, :] < filled_B[:, None]).astype(jnp.int32)
  return jnp.concatenate([prompt_mask_BP, done_BC, scratch_BX.astype(jnp.int32)], axis=1)


def _move_scratch(spec, cache, filled_B, count_B, width: int):
  """Move each row's first count_B[b] scratch K/V (of `width`) to slots P + filled_B[b] + i."""
  P, C = spec.P, spec.C
  S0, Sc = P + C, P + C + spec.X
  B = filled_B.shape[0]
  i_W = jnp.arange(width)[None, :]
  slots_BW = jnp.where(i_W < count_B[:, None], P + filled_B[:, None] + i_W, Sc)  # Sc: dropped
  r_B1 = jnp.arange(B)[:, None]
  return tuple(c.at[:, r_B1, slots_BW].set(c[:, :, S0:S0 + width], mode="drop") for c in cache)


def _is_stop(spec, tokens_BC, index_B, turn_start_B, stops):
  """bool [B]: token index_B[b] of row b ends its turn (a stop id, or the end of a stop
  sequence lying inside the current turn). stops = (ids [K, MAX_STOP_TOKENS], lengths [K])."""
  B = tokens_BC.shape[0]
  tok_B = jnp.take_along_axis(tokens_BC, index_B[:, None], axis=1)[:, 0]
  stop_B = jnp.zeros((B,), bool)
  for e in spec.eos_ids:
    stop_B = stop_B | (tok_B == e)
  ids_KM, len_K = stops
  j_M = jnp.arange(MAX_STOP_TOKENS)
  for k in range(spec.num_stops):
    first_B = index_B - (len_K[k] - 1)
    idx_BM = jnp.clip(first_B[:, None] + j_M[None, :], 0, spec.C - 1)
    got_BM = jnp.take_along_axis(tokens_BC, idx_BM, axis=1)
    match_B = jnp.all((got_BM == ids_KM[k][None, :]) | (j_M[None, :] >= len_K[k]), axis=1)
    stop_B = stop_B | (match_B & (first_B >= turn_start_B))
  return stop_B


def _continues(spec, state: TurnState, live_B, turn_tokens, stops):
  """bool [B]: live rows whose pending token does not end their turn (no stop, the turn
  (turn_tokens) and the completion budget not yet full)."""
  f = state.filled_B
  return (live_B & ~_is_stop(spec, state.tokens_BC, f, state.turn_start_B, stops)
          & (f - state.turn_start_B + 1 < turn_tokens) & (f + 1 < spec.C))


@functools.partial(jax.jit, static_argnames=("spec",))
def _start(spec, params, prompt_BP, prompt_mask_BP, keys_B2, temperature, top_p):
  model = Transformer(spec.config)
  B, P = prompt_BP.shape
  prompt_BP = jnp.where(prompt_mask_BP > 0, prompt_BP, spec.pad_id)
  positions_BP = jnp.maximum(jnp.cumsum(prompt_mask_BP, axis=1) - 1, 0).astype(jnp.int32)
  Sc = P + spec.C + spec.X
  kv_mask_BS = jnp.concatenate([prompt_mask_BP, jnp.zeros((B, Sc - P), jnp.int32)], axis=1)
  cache = _shard_cache(init_cache(spec.config, B, Sc, spec.kv_cache_dtype), spec.mesh)
  h_BPD, cache = model.apply({"params": params}, prompt_BP, positions_BT=positions_BP,
                             cache=cache, cache_index=0, kv_mask_BS=kv_mask_BS, output="hidden")
  logits_BV = model.apply({"params": params}, h_BPD[:, -1:], method=Transformer.unembed)[:, 0]
  token_B, logprob_B = _chooser(spec, keys_B2, temperature, top_p)(
      logits_BV, jnp.zeros((B,), jnp.int32))
  cache = _shard_cache(cache, spec.mesh)
  tokens_BC = jnp.full((B, spec.C), spec.pad_id, jnp.int32).at[:, 0].set(token_B)
  logprobs_BC = jnp.zeros((B, spec.C), jnp.float32).at[:, 0].set(logprob_B)
  zeros_B = jnp.zeros((B,), jnp.int32)
  return TurnState(cache, tokens_BC, logprobs_BC, zeros_B, zeros_B, zeros_B + 1)


@functools.partial(jax.jit, static_argnames=("spec",), donate_argnums=(1,))
def _decode_turn(spec, state: TurnState, params, live_B, prompt_mask_BP, keys_B2, temperature,
                 top_p, turn_tokens, stops):
  model = Transformer(spec.config)
  P, C = spec.P, spec.C
  B = live_B.shape[0]
  n_B = jnp.sum(prompt_mask_BP, axis=1).astype(jnp.int32)
  sample = _chooser(spec, keys_B2, temperature, top_p)
  r_B = jnp.arange(B)
  one_B1 = jnp.ones((B, 1), jnp.int32)
  scratch_BX = jnp.concatenate([one_B1, jnp.zeros((B, spec.X - 1), jnp.int32)], axis=1)

  def body(carry):
    state, active_B, steps = carry
    f_B = state.filled_B
    # Feed each active row's pending token at position n + filled (scratch slot P + C),
    # then move its K/V to slot P + filled.
    prev_B = state.tokens_BC[r_B, f_B]
    logits_B1V, cache = model.apply(
        {"params": params}, prev_B[:, None], positions_BT=(n_B + f_B)[:, None],
        cache=state.cache, cache_index=P + C,
        kv_mask_BS=_kv_mask(spec, prompt_mask_BP, f_B, scratch_BX))
    cache = _shard_cache(_move_scratch(spec, cache, f_B, active_B.astype(jnp.int32), 1),
                         spec.mesh)
    token_B, logprob_B = sample(logits_B1V[:, 0], state.model_count_B)
    a = active_B.astype(jnp.int32)
    f_B = f_B + a
    idx_B = jnp.where(active_B, f_B, C)                      # C: dropped
    tokens_BC = state.tokens_BC.at[r_B, idx_B].set(token_B, mode="drop")
    logprobs_BC = state.logprobs_BC.at[r_B, idx_B].set(logprob_B, mode="drop")
    state = state._replace(cache=cache, tokens_BC=tokens_BC, logprobs_BC=logprobs_BC,
                           filled_B=f_B, model_count_B=state.model_count_B + a)
    return state, _continues(spec, state, active_B, turn_tokens, stops), steps + 1

  def cond(carry):
    return jnp.any(carry[1])

  carry = (state, _continues(spec, state, live_B, turn_tokens, stops), jnp.int32(0))
  state, _, steps = jax.lax.while_loop(cond, body, carry)
  return state, steps


@functools.partial(jax.jit, static_argnames=("spec",), donate_argnums=(1,))
def _extend(spec, state: TurnState, params, chunk_BX, count_B, done_B, prompt_mask_BP,
            keys_B2, temperature, top_p):
  """Feed chunk_BX[b, :count_B[b]] at row b's next positions; rows with done_B (their
  last chunk) get a sampled token as their new pending token, and a new turn starts."""
  model = Transformer(spec.config)
  P, C, X = spec.P, spec.C, spec.X
  B = count_B.shape[0]
  n_B = jnp.sum(prompt_mask_BP, axis=1).astype(jnp.int32)
  f_B = state.filled_B
  i_X = jnp.arange(X)[None, :]
  real_BX = i_X < count_B[:, None]
  h_BXD, cache = model.apply(
      {"params": params}, jnp.where(real_BX, chunk_BX, spec.pad_id),
      positions_BT=(n_B + f_B)[:, None] + i_X, cache=state.cache, cache_index=P + C,
      kv_mask_BS=_kv_mask(spec, prompt_mask_BP, f_B, real_BX), output="hidden")
  cache = _shard_cache(_move_scratch(spec, cache, f_B, count_B, X), spec.mesh)
  last_B = jnp.maximum(count_B - 1, 0)
  h_B1D = jnp.take_along_axis(h_BXD, last_B[:, None, None], axis=1)
  logits_BV = model.apply({"params": params}, h_B1D, method=Transformer.unembed)[:, 0]
  token_B, logprob_B = _chooser(spec, keys_B2, temperature, top_p)(logits_BV,
                                                                    state.model_count_B)
  f_B = f_B + count_B
  r_B = jnp.arange(B)
  idx_B = jnp.where(done_B, f_B, C)                          # C: dropped
  return state._replace(
      cache=cache, tokens_BC=state.tokens_BC.at[r_B, idx_B].set(token_B, mode="drop"),
      logprobs_BC=state.logprobs_BC.at[r_B, idx_B].set(logprob_B, mode="drop"),
      filled_B=f_B, turn_start_B=jnp.where(done_B, f_B, state.turn_start_B),
      model_count_B=state.model_count_B + done_B.astype(jnp.int32))


# ----------------------------------------------------------------------------
# Host-facing wrappers
# ----------------------------------------------------------------------------

class MultiTurnSampler:
  """The three jitted calls bound to one spec, parameters, prompts and rng (see the module
  docstring). Rows keep their noise ids row_offset + b."""

  def __init__(self, spec: MultiTurnSpec, params, prompt_tokens_BP, prompt_mask_BP, rng, *,
               max_tokens_per_turn: int, stop_seqs=(), temperature: float = 1.0,
               top_p: float = 1.0, row_offset: int = 0):
    B, P = np.shape(prompt_tokens_BP)
    if P != spec.P:
      raise ValueError(f"prompts have {P} columns, the spec {spec.P}")
    m = np.asarray(prompt_mask_BP).astype(bool)
    if not m[:, -1].all() or (m[:, :-1] & ~m[:, 1:]).any():
      raise ValueError("prompts must be left-padded with at least one real token per row")
    if len(stop_seqs) != spec.num_stops or any(
        not 0 < len(s) <= MAX_STOP_TOKENS for s in stop_seqs):
      raise ValueError(f"stop_seqs: expected {spec.num_stops} sequences of 1 to "
                       f"{MAX_STOP_TOKENS} token ids, got {stop_seqs!r}")
    ids = np.full((max(spec.num_stops, 1), MAX_STOP_TOKENS), -1, np.int32)
    for k, seq in enumerate(stop_seqs):
      ids[k, :len(seq)] = seq
    self.stops = (jnp.asarray(ids), jnp.asarray([len(x) for x in stop_seqs] or [1], jnp.int32))
    self.turn_tokens = jnp.int32(max_tokens_per_turn)
    self.spec = spec
    self.params = params
    self.prompt_mask_BP = jnp.asarray(prompt_mask_BP, jnp.int32)
    self.keys_B2 = (None if spec.greedy else
                    row_keys(rng, row_offset + jnp.arange(B, dtype=jnp.int32)))
    self.temperature = jnp.float32(1.0 if spec.greedy else temperature)
    self.top_p = jnp.float32(top_p)
    self.decode_steps = 0   # decode steps run (for FLOP counts)
    self.extend_calls = 0
    self.state = _start(spec, params, jnp.asarray(prompt_tokens_BP, jnp.int32),
                        self.prompt_mask_BP, self.keys_B2, self.temperature, self.top_p)

  def host(self) -> dict:
    """tokens_BC, logprobs_BC, filled_B, turn_start_B, model_count_B as numpy."""
    s = self.state
    return {k: np.asarray(getattr(s, k)) for k in
            ("tokens_BC", "logprobs_BC", "filled_B", "turn_start_B", "model_count_B")}

  def decode_turn(self, live_B) -> None:
    """Decode the rows with live_B until each ends its turn (module docstring)."""
    self.state, steps = _decode_turn(self.spec, self.state, self.params,
                                     jnp.asarray(live_B, bool), self.prompt_mask_BP,
                                     self.keys_B2, self.temperature, self.top_p,
                                     self.turn_tokens, self.stops)
    self.decode_steps += int(steps)

  def push(self, **arrays) -> None:
    """Replace host-side bookkeeping (`host`'s keys, numpy) on the device: e.g. a turn cut
    back at a stop string found in its text (a lower filled_B), observation tokens
    written after the pending token."""
    self.state = self.state._replace(**{
        k: jnp.asarray(v, jnp.float32 if k == "logprobs_BC" else jnp.int32)
        for k, v in arrays.items()})

  def feed(self, feed: dict) -> None:
    """Feed rows' token lists {b: [pending model token, env tokens ...]} (each must already
    sit at tokens_BC[b, filled_B[b]:]) in chunks of X; each such row then samples the
    first token of its next turn."""
    X = self.spec.X
    B = self.prompt_mask_BP.shape[0]
    pos = {b: 0 for b in feed}
    while any(pos[b] < len(ids) for b, ids in feed.items()):
      chunk = np.full((B, X), self.spec.pad_id, np.int32)
      count = np.zeros((B,), np.int32)
      done = np.zeros((B,), bool)
      for b, ids in feed.items():
        part = ids[pos[b]:pos[b] + X]
        chunk[b, :len(part)] = part
        count[b] = len(part)
        pos[b] += len(part)
        done[b] = len(part) > 0 and pos[b] == len(ids)
      self.state = _extend(self.spec, self.state, self.params, jnp.asarray(chunk),
                           jnp.asarray(count), jnp.asarray(done), self.prompt_mask_BP,
                           self.keys_B2, self.temperature, self.top_p)
      self.extend_calls += 1


def multiturn_generate_flops(c, rows: int, step_rows: int, prompt_len: int,
                             max_new_tokens: int, env_chunk: int, decode_steps: int,
                             extend_calls: int) -> int:
  """FLOPs of multi-turn sampling (`flops` module conventions): the prefill of `rows`
  prompts, then `decode_steps` decode steps and `extend_calls` extend calls of `step_rows`
  rows each (idle rows compute too), every query attending to the whole cache
  (P + C + X slots, masked)."""
  from rlhf_jax import flops as F
  P, C, X = prompt_len, max_new_tokens, env_chunk
  M, U, A = F.block_flops_per_token(c), F.unembed_flops(c), F.attention_flops_per_pair(c)
  S = P + C + X
  return (F.forward_flops(c, rows, P, 1) + decode_steps * step_rows * (M + U + A * S)
          + extend_calls * step_rows * (X * M + U + A * X * S))
