"""Continuous batching: a fixed number of decode slots, each refilled as soon as its row stops.

`sampling.generate` decodes a batch until its *longest* row has stopped: with a long
tail of completion lengths (most rows stop early, a few run to max_new_tokens) most
decode steps compute finished rows. `generate_continuous` keeps `num_slots` rows in
flight instead; when a row stops (a stop id or its budget), its slot is refilled with
the next pending prompt, without waiting for the other slots:

    fill:    prefill rows 0..S-1 into the S slots (one batched call), sample token 0
    loop:    one decode step of every slot (each at its own step t and position)
             for every slot whose row stopped, while rows are pending:
               prefill the next row into that slot (one row), sample its token 0
    until    no slot is live and no row is pending

Same samples as `generate`: row b's noise for token t is a function of (rng, row id, t)
only (`sampling` module docstring, `sampling_choice.row_bits`), and a slot lays out its
row's cache exactly as `generate` does (prompt in cache slots 0..P-1, completion token t
in P+t; positions 0..n-1 on the n real prompt tokens, then n, n+1, ...). So for the same
rng the tokens, masks and lengths equal `generate`'s and the log-probs agree to float
rounding (the matmuls run on other batch sizes), whatever `num_slots`; the outputs are in
the original row order.

Design (slot-based KV cache): the cache is [L, num_slots, P + N, K, Dh], one
`generate`-sized cache row per slot plus one scratch column, the whole run one jitted
function (one compile per shape and static knobs, as `generate`; refills happen inside a
`lax.while_loop` and never recompile). A decode step is one batched cached model call
with the scratch column as its cache index (the model takes one index for all rows): each
slot's key mask admits its prompt and its first t - 1 completion tokens, and the new
K/V, written to the scratch column, then move to each slot's cache slot P + t - 1 (a
scatter of one column). The attention sums run over the same keys in the same order as
`generate`'s. (A `jax.vmap` of the cached call over slots, each with its own cache index,
cost 2x a static step on XLA:CPU.) Refill prefills one row at a time ([1, P]) into the
freed slot: cheap when refills are spread over the run (the usual case: lengths differ),
at worst B - S single-row prefills in place of B / S batched ones -- the price of never
waiting. A paged cache would share memory between slots of different lengths; slots are
simpler and use the memory of a `generate` micro-batch of S rows (+ 1 column).
Decode attention runs over the whole slot row (the `chunked` backend cannot skip the
unfilled blocks as it does for `generate`, whose rows share one fill level).

Not replicated from `generate`: the shared prefill of a group's equal prompts
(`group_size`; every row is prefilled on its own here -- the samples are the same) and
the per-step sharding constraint is applied to the slot cache as `generate` does
(`mesh`). Slots that are idle at the end (no row left to refill them) still compute a
(discarded) decode step until the last row stops.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.models.transformer import ModelConfig, Transformer, init_cache
from rlhf_jax.sampling import (SampleOutput, _shard_cache, _validate, resolve_kv_cache_dtype,
                               resolve_mesh, row_budgets)
from rlhf_jax.sampling_choice import _choose, row_bits, row_keys

Array = jax.Array


def generate_continuous(config: ModelConfig, params, prompt_tokens_BP, prompt_mask_BP, rng, *,
                        num_slots: int, max_new_tokens: int, temperature: float = 1.0,
                        top_k: int = 0, top_p: float = 1.0, greedy: bool = False,
                        eos_id: int | Sequence[int] | None, pad_id: int,
                        max_new_tokens_B=None, kv_cache_dtype: str = "auto", mesh="auto",
                        row_offset=0) -> SampleOutput:
  """`sampling.generate` by continuous batching in `num_slots` decode slots (module doc).

  Arguments as `sampling.generate` (no `group_size`), plus num_slots: rows decoded at
  once (static; min(num_slots, B) are used). Returns the SampleOutput `generate` returns
  for the same arguments (tokens exactly, log-probs to float rounding), rows in order.
  """
  if not isinstance(num_slots, (int, np.integer)) or isinstance(num_slots, bool) or (
      num_slots < 1):
    raise ValueError(f"num_slots={num_slots!r}: expected an int >= 1")
  prompt_tokens_BP = jnp.asarray(prompt_tokens_BP)
  prompt_mask_BP = (prompt_mask_BP if isinstance(prompt_mask_BP, jax.core.Tracer)
                    else np.asarray(prompt_mask_BP))
  eos_ids = _validate(config, prompt_tokens_BP, prompt_mask_BP, max_new_tokens, temperature,
                      top_k, top_p, greedy, eos_id, pad_id)
  B = prompt_tokens_BP.shape[0]
  budget_B = row_budgets(max_new_tokens_B, B, max_new_tokens)
  if budget_B is None:
    budget_B = jnp.full((B,), max_new_tokens, jnp.int32)
  mesh = resolve_mesh(mesh, params)
  return _continuous(
      config, params, prompt_tokens_BP.astype(jnp.int32),
      jnp.asarray(prompt_mask_BP).astype(jnp.int32), rng,
      jnp.float32(1.0 if greedy else temperature), jnp.float32(top_p), budget_B,
      jnp.asarray(row_offset, jnp.int32), num_slots=int(min(num_slots, B)),
      max_new_tokens=int(max_new_tokens), top_k=0 if greedy else int(top_k),
      use_top_p=(not greedy) and top_p < 1.0, greedy=bool(greedy), eos_ids=eos_ids,
      pad_id=int(pad_id), kv_cache_dtype=resolve_kv_cache_dtype(config, kv_cache_dtype),
      mesh=mesh)


@functools.partial(jax.jit, static_argnames=("config", "num_slots", "max_new_tokens", "top_k",
                                             "use_top_p", "greedy", "eos_ids", "pad_id",
                                             "kv_cache_dtype", "mesh"))
def _continuous(config, params, prompt_BP, prompt_mask_BP, rng, temperature, top_p, budget_B,
                row_offset, *, num_slots, max_new_tokens, top_k, use_top_p, greedy, eos_ids,
                pad_id, kv_cache_dtype, mesh):
  model = Transformer(config)
  variables = {"params": params}
  B, P = prompt_BP.shape
  N, R = max_new_tokens, num_slots
  S = P + N - 1                      # the last sampled token is never fed back
  V = config.vocab_size
  choose = functools.partial(_choose, temperature=temperature, top_p=top_p, greedy=greedy,
                             top_k=top_k, use_top_p=use_top_p)
  shard = functools.partial(_shard_cache, mesh=mesh)

  prompt_BP = jnp.where(prompt_mask_BP > 0, prompt_BP, pad_id)
  n_B = jnp.sum(prompt_mask_BP, axis=1).astype(jnp.int32)
  positions_BP = jnp.maximum(jnp.cumsum(prompt_mask_BP, axis=1) - 1, 0).astype(jnp.int32)
  # + one scratch column (index S) where every decode step writes its new K/V first
  kv_mask_BS = jnp.concatenate([prompt_mask_BP, jnp.ones((B, S + 1 - P), jnp.int32)], axis=1)
  keys_B2 = None if greedy else row_keys(rng, row_offset + jnp.arange(B, dtype=jnp.int32))

  def sample(logits_XV, rows_X, steps_X):
    bits = None if greedy else row_bits(keys_B2[rows_X], steps_X, V)
    return choose(logits_XV, bits)

  def stops(token_X, rows_X, steps_X):
    """Row stops after sampling token `steps_X`: a stop id or its budget reached."""
    stop_X = steps_X + 1 >= budget_B[rows_X]
    for e in eos_ids:
      stop_X = stop_X | (token_X == e)
    return stop_X

  def record(out, rows_X, steps_X, token_X, logprob_X, valid_X):
    tokens_BN, logprobs_BN, lengths_B = out
    rows_X = jnp.where(valid_X, rows_X, B)             # out of range: dropped
    tokens_BN = tokens_BN.at[rows_X, steps_X].set(token_X, mode="drop")
    logprobs_BN = logprobs_BN.at[rows_X, steps_X].set(logprob_X, mode="drop")
    lengths_B = lengths_B.at[rows_X].set(steps_X + 1, mode="drop")
    return tokens_BN, logprobs_BN, lengths_B

  def prefill(rows_X):
    """Cache rows [L, X, S, K, Dh] and last-position logits [X, V] of prompts rows_X."""
    cache = init_cache(config, rows_X.shape[0], S + 1, kv_cache_dtype)
    h_XPD, cache = model.apply(variables, prompt_BP[rows_X], positions_BT=positions_BP[rows_X],
                               cache=cache, cache_index=0, kv_mask_BS=kv_mask_BS[rows_X],
                               output="hidden")
    logits_XV = model.apply(variables, h_XPD[:, -1:], method=Transformer.unembed)[:, 0]
    return cache, logits_XV

  def decode(prev_R, pos_R, t_R, slot_row, cache):
    """One step of every slot, slot r at its own step t_R[r]: the model's cached call
    with the scratch column S as the (shared) cache index and a per-slot key mask that
    admits the slot's prompt and its first t - 1 completion tokens; then each slot's new
    K/V moves from the scratch column to its cache slot P + t - 1."""
    done_RN = jnp.arange(S + 1 - P)[None, :] < (t_R - 1)[:, None]
    kv_mask_RS = jnp.concatenate([prompt_mask_BP[slot_row], done_RN.astype(jnp.int32)], 1)
    kv_mask_RS = kv_mask_RS.at[:, S].set(1)
    logits_R1V, cache = model.apply(variables, prev_R[:, None], positions_BT=pos_R[:, None],
                                    cache=cache, cache_index=S, kv_mask_BS=kv_mask_RS)
    r = jnp.arange(R)
    cache = tuple(c.at[:, r, P + t_R - 1].set(c[:, :, S]) for c in cache)
    return logits_R1V[:, 0], cache

  # Fill: rows 0..R-1 into the R slots, token 0 of each.
  slot_row = jnp.arange(R, dtype=jnp.int32)
  zeros_R = jnp.zeros((R,), jnp.int32)
  cache, logits_RV = prefill(slot_row)
  cache = shard(cache)
  token_R, logprob_R = sample(logits_RV, slot_row, zeros_R)
  out = record((jnp.full((B, N), pad_id, jnp.int32), jnp.zeros((B, N), jnp.float32),
                jnp.zeros((B,), jnp.int32)), slot_row, zeros_R, token_R, logprob_R,
               jnp.ones((R,), bool))
  live_R = ~stops(token_R, slot_row, zeros_R)
  # slot state: row, next token index (tokens sampled so far), last token, live
  state = (cache, slot_row, jnp.ones((R,), jnp.int32), token_R, live_R, jnp.int32(R), out)

  def refill_cond(state):
    live_R, next_row = state[4], state[5]
    return (next_row < B) & ~jnp.all(live_R)

  def refill_body(state):
    cache, slot_row, step_R, prev_R, live_R, next_row, out = state
    s = jnp.argmin(live_R)                             # the first free slot
    row_1 = next_row[None]
    cache_1, logits_1V = prefill(row_1)
    cache = shard(tuple(jax.lax.dynamic_update_slice(c, c1, (0, s, 0, 0, 0))
                        for c, c1 in zip(cache, cache_1)))
    zero_1 = jnp.zeros((1,), jnp.int32)
    token_1, logprob_1 = sample(logits_1V, row_1, zero_1)
    out = record(out, row_1, zero_1, token_1, logprob_1, jnp.ones((1,), bool))
    return (cache, slot_row.at[s].set(next_row), step_R.at[s].set(1),
            prev_R.at[s].set(token_1[0]), live_R.at[s].set(~stops(token_1, row_1, zero_1)[0]),
            next_row + 1, out)

  def decode_step(state):
    cache, slot_row, step_R, prev_R, live_R, next_row, out = state
    # Feed token t-1 of each slot's row into cache slot P+t-1 at position n+t-1; sample
    # token t. Idle slots decode too (static shapes); their results are dropped.
    t_R = jnp.clip(step_R, 1, N - 1)
    logits_RV, cache = decode(prev_R, n_B[slot_row] + t_R - 1, t_R, slot_row, cache)
    cache = shard(cache)
    token_R, logprob_R = sample(logits_RV, slot_row, step_R)
    out = record(out, slot_row, step_R, token_R, logprob_R, live_R)
    live_R = live_R & ~stops(token_R, slot_row, step_R)
    return (cache, slot_row, step_R + 1, token_R, live_R, next_row, out)

  def cond(state):
    live_R, next_row = state[4], state[5]
    return jnp.any(live_R) | (next_row < B)

  def body(state):  # refill the free slots, then one decode step (if a row is live)
    state = jax.lax.while_loop(refill_cond, refill_body, state)
    return jax.lax.cond(jnp.any(state[4]), decode_step, lambda s: s, state)

  # (one refill loop and one decode step in the program: each traces the model once)
  state = jax.lax.while_loop(cond, body, state)
  tokens_BN, logprobs_BN, lengths_B = state[-1]
  mask_BN = (jnp.arange(N)[None, :] < lengths_B[:, None]).astype(jnp.int32)
  return SampleOutput(
      tokens_BN=tokens_BN, logprobs_BN=logprobs_BN, mask_BN=mask_BN, lengths_B=lengths_B,
      sequences_BS=jnp.concatenate([prompt_BP, tokens_BN], axis=1),
      sequence_mask_BS=jnp.concatenate([prompt_mask_BP, mask_BN], axis=1))


def decode_schedule(lengths_B, num_slots: int, max_new_tokens: int) -> list[list[int]]:
  """Host replay of `generate_continuous`'s schedule from the completion lengths: for each
  decode step, the step index t of every slot in it (idle slots included: they run at
  min(t, N - 1)). For FLOP accounting (`continuous_generate_flops`)."""
  lengths = [int(x) for x in lengths_B]
  B, R = len(lengths), min(num_slots, len(lengths))
  row, step = list(range(R)), [1] * R
  nxt = R

  def refill():
    nonlocal nxt
    for s in range(R):
      while step[s] >= lengths[row[s]] and nxt < B:
        row[s], step[s], nxt = nxt, 1, nxt + 1
  refill()
  steps = []
  while any(step[s] < lengths[row[s]] for s in range(R)):
    steps.append([min(t, max_new_tokens - 1) for t in step])
    step = [t + 1 for t in step]
    refill()
  return steps


def continuous_generate_flops(c, lengths_B, prompt_len: int, num_slots: int,
                              max_new_tokens: int) -> int:
  """FLOPs of one `generate_continuous` call (`flops` module conventions): the first
  min(S, B) prompts prefilled together, the others one by one, and every decode step of
  all S slots, a slot at step t attending to P + t keys (idle slots counted: they run)."""
  from rlhf_jax import flops as F
  B, R, P = len(lengths_B), min(num_slots, len(lengths_B)), prompt_len
  steps = decode_schedule(lengths_B, num_slots, max_new_tokens)
  M, U, A = F.block_flops_per_token(c), F.unembed_flops(c), F.attention_flops_per_pair(c)
  pre = F.forward_flops(c, R, P, 1) + (B - R) * F.forward_flops(c, 1, P, 1)
  return pre + sum(R * (M + U) + A * sum(P + t for t in ts) for ts in steps)
