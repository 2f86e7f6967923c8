"""KV-cache generation: one prefill call, then a `lax.while_loop` of decode steps.

    prefill:  cache <- K/V of the whole (left-padded) prompt, one model call
    step t:   x_t ~ pi(. | prompt, x_<t),  cache <- K/V of x_t   (t = 0..N-1)

The whole of `generate` is one jitted function; it compiles once per
(prompt shape, model config, max_new_tokens, top_k, greedy, stop ids, pad id,
group size, cache dtype, mesh). Temperature and top_p are traced scalars, so
changing their values does not recompile (whether top-p is on at all, top_p < 1,
is static; top_p must be a Python float, temperature may itself be traced when
`generate` is called inside another jit). The cache is allocated once, with
P + N - 1 slots (the last sampled token is never fed back).

Decoding at scale (three switches of `generate`, none of which changes what is
sampled beyond float rounding):

* Shared prefill for groups (`group_size=G`): GRPO/PPO sample G completions per
  prompt, passed as B = N*G rows where every G consecutive rows hold the same
  prompt (row b belongs to group b // G, the `rollout` layout). The prompt is
  prefilled once per group (N rows), then the cache and the last-position logits
  are repeated to the B rows before decoding. The sampling noise is drawn per row
  as always, so the samples equal those of per-row prefill for the same rng
  (tokens exactly, log-probs to float rounding: the prefill's matmuls run on N
  instead of B rows). Rows of a group must be equal (checked when the prompts are
  concrete; under an outer jit each group's first row is used for the whole group).
* KV-cache dtype (`kv_cache_dtype`): "auto" (default) stores K/V in bfloat16 on
  GPU/TPU when the compute dtype is float32 (half the cache memory and decode
  bandwidth), and in the compute dtype otherwise -- on CPU always, so CPU results
  are unchanged; or name one: "float32" | "bfloat16" | "float16". Attention reads
  the cache back in the compute dtype; the token being fed attends to its own K/V
  unrounded.
* Sharded KV cache (`mesh`): on a mesh the cache [L, B, S, K, Dh] is constrained
  to `parallel.kv_cache_sharding` -- rows over ("data", "fsdp"), kv heads over
  "tensor" (each as far as the sizes divide) -- at allocation, after the prefill
  and in every decode step, so no device holds the whole cache. The default
  mesh="auto" takes the mesh of the parameters (`parallel.mesh_of`: a
  NamedSharding on > 1 device); single-device / host parameters: no constraint.

Prompts are a left-padded batch `prompt_tokens_BP` with `prompt_mask_BP`
(1 = real token). Row b with n_b real tokens gets positions 0..n_b-1 on its
real tokens, and its completion continues from n_b, exactly as if it had been
run alone without padding. Cache slots: prompt in 0..P-1, completion token t in
slot P+t; pad slots are never attended to. Every prompt must hold at least
one real token (e.g. BOS).

Sampling noise is per row: token t of row b is chosen by the Gumbel-max trick on
uniform bits `sampling_choice.row_bits(key_b, t)`, Threefry-2x32 of the counter (t, j)
under key_b = 2 random words of fold_in(rng, row_offset + b). It depends on
(rng, row id, step) only, not on the batch size or the other rows, so a row samples the
same tokens whether it is decoded alone, in any micro-batch (`row_offset`), or in a
slot of the continuous-batching sampler (`sampling_continuous`). (Until 2026-12 the
noise came from one XLA RngBitGenerator stream per batch, which tied a row's samples to
its batch; the same rng now gives other samples than before that change.)

Reported log-probabilities (float32) follow one convention:

    logprob_t = log softmax(logits_t / temperature)[x_t]      over the full vocab

top-k / top-p only restrict which token is *sampled*; they do not renormalise
the reported logprob, so it equals what `losses.logprobs.token_logprobs`
(with the same temperature) recomputes from a full forward pass over the
completed sequence -- the quantity PPO/GRPO ratios need. Greedy decoding
ignores temperature/top-k/top-p and reports log softmax(logits)[x_t]
(temperature 1).

Stopping: a row stops after it emits a stop id (`eos_id`, int or several
ids) or, given `max_new_tokens_B`, after its own budget of tokens; the stop token
itself is part of the completion (mask 1), later slots hold `pad_id` with mask 0 and
logprob 0. The loop ends when every row has stopped or after `max_new_tokens`.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import parallel
from rlhf_jax.models.transformer import ModelConfig, Transformer, init_cache
from rlhf_jax.sampling_choice import _choose, row_bits, row_keys

Array = jax.Array


def resolve_mesh(mesh, params):
  """The sampler's `mesh` argument: "auto" -> the parameters' mesh (`parallel.mesh_of`),
  a jax.sharding.Mesh as given, None; a one-device mesh is None (no constraint)."""
  if isinstance(mesh, str):
    if mesh != "auto":
      raise ValueError(f"mesh={mesh!r}: expected 'auto', a jax.sharding.Mesh or None")
    mesh = parallel.mesh_of(params)
  elif mesh is not None and not isinstance(mesh, jax.sharding.Mesh):
    raise ValueError(f"mesh={mesh!r}: expected 'auto', a jax.sharding.Mesh or None")
  return None if mesh is not None and mesh.size == 1 else mesh


class SampleOutput(NamedTuple):
  """Result of `generate` (a pytree; B batch, N = max_new_tokens, S = P + N).

  tokens_BN:        int32 completions, `pad_id` after the stop token.
  logprobs_BN:      float32 log softmax(logits / temperature)[token]; 0 where mask is 0.
  mask_BN:          int32 completion mask: 1 up to and including the stop token.
  lengths_B:        int32 number of completion tokens (= mask_BN.sum(1)).
  sequences_BS:     int32 [prompt | completion], prompt left-padded with `pad_id`.
  sequence_mask_BS: int32 [prompt_mask | mask_BN]; usable directly as segment ids.
  """

  tokens_BN: Array
  logprobs_BN: Array
  mask_BN: Array
  lengths_B: Array
  sequences_BS: Array
  sequence_mask_BS: Array


# ----------------------------------------------------------------------------
# generate
# ----------------------------------------------------------------------------

def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def _validate(config, prompt_tokens_BP, prompt_mask_BP, max_new_tokens, temperature,
              top_k, top_p, greedy, eos_id, pad_id):
  if not isinstance(config, ModelConfig):
    raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
  if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens!r}: expected an int >= 1")
  if not greedy:
    if _is_concrete(temperature) and (not np.isfinite(temperature) or temperature <= 0):
      raise ValueError(f"temperature={temperature!r} must be a finite number > 0; "
                       "use greedy=True for argmax decoding")
    if not isinstance(top_k, (int, np.integer)) or top_k < 0:
      raise ValueError(f"top_k={top_k!r}: expected an int >= 0 (0 disables top-k)")
    if not (0.0 < top_p <= 1.0):
      raise ValueError(f"top_p={top_p!r} must lie in (0, 1] (1 disables nucleus sampling)")
  V = config.vocab_size
  if eos_id is None:
    eos_ids = ()
  else:
    eos_ids = tuple(int(e) for e in np.atleast_1d(np.asarray(eos_id)))
  for e in eos_ids:
    if not 0 <= e < V:
      raise ValueError(f"eos_id={eos_id!r}: stop ids must lie in [0, vocab_size={V})")
  if not isinstance(pad_id, (int, np.integer)) or not 0 <= pad_id < V:
    raise ValueError(f"pad_id={pad_id!r}: expected an int in [0, vocab_size={V})")

  if prompt_tokens_BP.ndim != 2:
    raise ValueError(f"prompt_tokens must be [batch, prompt_len], got shape "
                     f"{prompt_tokens_BP.shape}")
  if prompt_mask_BP.shape != prompt_tokens_BP.shape:
    raise ValueError(f"prompt_mask shape {prompt_mask_BP.shape} != prompt_tokens shape "
                     f"{prompt_tokens_BP.shape}")
  B, P = prompt_tokens_BP.shape
  if P < 1 or B < 1:
    raise ValueError(f"empty prompt batch: shape {prompt_tokens_BP.shape}")
  if P + max_new_tokens > config.max_seq_len:
    raise ValueError(f"prompt_len {P} + max_new_tokens {max_new_tokens} exceeds "
                     f"model.max_seq_len={config.max_seq_len}")
  if _is_concrete(prompt_mask_BP):
    m = np.asarray(prompt_mask_BP).astype(bool)
    if not m[:, -1].all():
      bad = np.flatnonzero(~m[:, -1]).tolist()
      raise ValueError(f"prompt rows {bad[:8]} have no real last token: prompts must be "
                       "left-padded with at least one real token per row")
    if (m[:, :-1] & ~m[:, 1:]).any():
      bad = np.flatnonzero((m[:, :-1] & ~m[:, 1:]).any(1)).tolist()
      raise ValueError(f"prompt rows {bad[:8]} are not left-padded (mask must be 0...0 1...1)")
    if _is_concrete(prompt_tokens_BP):
      t = np.asarray(prompt_tokens_BP)
      bad_BP = m & ((t < 0) | (t >= V))
      if bad_BP.any():
        b, i = np.argwhere(bad_BP)[0]
        raise ValueError(f"prompt token {int(t[b, i])} at [{b}, {i}] is outside "
                         f"[0, vocab_size={V})")
  return eos_ids


KV_CACHE_DTYPES = ("auto", "float32", "bfloat16", "float16")


def resolve_kv_cache_dtype(config: ModelConfig, kv_cache_dtype="auto") -> str:
  """The KV-cache dtype name for `kv_cache_dtype` (see the module docstring): "auto" is
  bfloat16 on GPU/TPU when the compute dtype is float32, else the compute dtype."""
  name = kv_cache_dtype if isinstance(kv_cache_dtype, str) else None
  if name is None:
    try:
      name = jnp.dtype(kv_cache_dtype).name
    except TypeError:
      name = repr(kv_cache_dtype)
  if name not in KV_CACHE_DTYPES:
    raise ValueError(f"kv_cache_dtype={kv_cache_dtype!r}: expected one of "
                     f"{', '.join(KV_CACHE_DTYPES)}")
  if name != "auto":
    return name
  if config.dtype == "float32" and jax.default_backend() in ("gpu", "tpu"):
    return "bfloat16"
  return config.dtype


def _validate_groups(prompt_tokens_BP, prompt_mask_BP, group_size):
  """ValueError unless the B rows are whole groups of `group_size` equal prompts (the
  equality is checked where the prompts are concrete)."""
  if not isinstance(group_size, (int, np.integer)) or isinstance(group_size, bool) or (
      group_size < 1):
    raise ValueError(f"group_size={group_size!r}: expected an int >= 1")
  B = prompt_tokens_BP.shape[0]
  if B % group_size:
    raise ValueError(f"group_size={group_size}: the {B} prompt rows are not whole groups "
                     f"(B must be a multiple of group_size; rows b*G .. b*G+G-1 share a prompt)")
  if group_size == 1 or not (_is_concrete(prompt_mask_BP) and _is_concrete(prompt_tokens_BP)):
    return
  m_NGP = np.asarray(prompt_mask_BP).astype(bool).reshape(B // group_size, group_size, -1)
  t_NGP = np.where(m_NGP, np.asarray(prompt_tokens_BP).reshape(m_NGP.shape), 0)
  bad_NG = (m_NGP != m_NGP[:, :1]).any(-1) | (t_NGP != t_NGP[:, :1]).any(-1)
  if bad_NG.any():
    n, g = (int(i) for i in np.argwhere(bad_NG)[0])
    raise ValueError(f"group_size={group_size}: prompt row {n * group_size + g} differs from "
                     f"row {n * group_size}, the first row of its group {n}; every "
                     f"{group_size} consecutive rows must hold the same prompt")


def generate(config: ModelConfig, params, prompt_tokens_BP, prompt_mask_BP, rng, *,
             max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, greedy: bool = False,
             eos_id: int | Sequence[int] | None, pad_id: int, group_size: int = 1,
             kv_cache_dtype: str = "auto", mesh="auto", row_offset=0,
             max_new_tokens_B=None) -> SampleOutput:
  """Sample up to `max_new_tokens` tokens after each left-padded prompt.

  Args:
    config: model architecture (static).
    params: LM parameters (plain pytree, as from `init_params`).
    prompt_tokens_BP: int [B, P] left-padded prompts.
    prompt_mask_BP: [B, P] 1 on real prompt tokens (0...0 1...1 per row).
    rng: PRNG key; row b's noise at step t is a function of (rng, row_offset + b, t)
      only (module docstring), so the same key gives the same samples whatever the
      batch (micro-batch size, continuous batching) a row is decoded in.
    max_new_tokens: N, completion length budget (static).
    temperature: > 0; logits are divided by it before sampling and logprobs.
    top_k: keep the k most likely tokens (0 = off; static).
    top_p: nucleus mass in (0, 1] (1 = off).
    greedy: argmax decoding; temperature/top-k/top-p are ignored.
    eos_id: stop id or ids (None: never stop early).
    pad_id: id written after the stop token and on prompt padding.
    group_size: G (static): every G consecutive rows hold the same prompt, which is
      prefilled once per group (module docstring); B must be a multiple of G.
    kv_cache_dtype: "auto" | "float32" | "bfloat16" | "float16" (static; module
      docstring; `resolve_kv_cache_dtype`).
    mesh: "auto" (the mesh of `params`, if any), a `jax.sharding.Mesh` to shard the KV
      cache over (`parallel.kv_cache_sharding`), or None (no constraint). Pass the mesh
      explicitly when calling `generate` inside another jit (tracers carry no mesh).
    row_offset: int (may be traced: no recompile): row b's noise id is row_offset + b,
      so micro-batches of one batch, each passed the same rng and its first row's index,
      sample what one call on the whole batch would.
    max_new_tokens_B: optional int [B] per-row budgets in [1, max_new_tokens]: row b stops
      after max_new_tokens_B[b] tokens (or at a stop id before); None: max_new_tokens.

  Returns:
    SampleOutput (see its docstring and the module docstring for the logprob
    convention).
  """
  prompt_tokens_BP = jnp.asarray(prompt_tokens_BP)
  prompt_mask_BP = (prompt_mask_BP if isinstance(prompt_mask_BP, jax.core.Tracer)
                    else np.asarray(prompt_mask_BP))
  eos_ids = _validate(config, prompt_tokens_BP, prompt_mask_BP, max_new_tokens, temperature,
                      top_k, top_p, greedy, eos_id, pad_id)
  _validate_groups(prompt_tokens_BP, prompt_mask_BP, group_size)
  budget_B = row_budgets(max_new_tokens_B, prompt_tokens_BP.shape[0], max_new_tokens)
  cache_dtype = resolve_kv_cache_dtype(config, kv_cache_dtype)
  mesh = resolve_mesh(mesh, params)
  return _generate(
      config, params, prompt_tokens_BP.astype(jnp.int32),
      jnp.asarray(prompt_mask_BP).astype(jnp.int32), rng,
      jnp.float32(1.0 if greedy else temperature), jnp.float32(top_p),
      max_new_tokens=int(max_new_tokens), top_k=0 if greedy else int(top_k),
      use_top_p=(not greedy) and top_p < 1.0, greedy=bool(greedy), eos_ids=eos_ids,
      pad_id=int(pad_id), group_size=int(group_size), kv_cache_dtype=cache_dtype, mesh=mesh,
      row_offset=jnp.asarray(row_offset, jnp.int32), budget_B=budget_B)


def row_budgets(max_new_tokens_B, B: int, max_new_tokens: int):
  """int32 [B] per-row token budgets (None stays None); ValueError unless each lies in
  [1, max_new_tokens] (checked where concrete)."""
  if max_new_tokens_B is None:
    return None
  if _is_concrete(max_new_tokens_B):
    b = np.asarray(max_new_tokens_B)
    if b.shape != (B,) or not np.issubdtype(b.dtype, np.integer) or (
        b.size and (b.min() < 1 or b.max() > max_new_tokens)):
      raise ValueError(f"max_new_tokens_B: expected ints in [1, max_new_tokens="
                       f"{max_new_tokens}] of shape ({B},), got {b.dtype} {b.shape} "
                       f"{b.tolist()[:8]}")
  return jnp.asarray(max_new_tokens_B, jnp.int32)


def _shard_cache(cache, mesh):
  """The KV cache constrained to `parallel.kv_cache_sharding` (no-op without a mesh)."""
  if mesh is None:
    return cache
  return tuple(jax.lax.with_sharding_constraint(c, parallel.kv_cache_sharding(mesh, c.shape))
               for c in cache)


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "top_k", "use_top_p",
                                             "greedy", "eos_ids", "pad_id", "group_size",
                                             "kv_cache_dtype", "mesh"))
def _generate(config, params, prompt_BP, prompt_mask_BP, rng, temperature, top_p, *,
              max_new_tokens, top_k, use_top_p, greedy, eos_ids, pad_id, group_size=1,
              kv_cache_dtype=None, mesh=None, row_offset=0, budget_B=None):
  model = Transformer(config)
  variables = {"params": params}
  B, P = prompt_BP.shape
  N = max_new_tokens
  G = group_size
  S = P + N - 1                      # the last sampled token is never fed back
  choose = functools.partial(_choose, temperature=temperature, top_p=top_p, greedy=greedy,
                             top_k=top_k, use_top_p=use_top_p)
  shard = functools.partial(_shard_cache, mesh=mesh)

  # Pad slots get a valid id (out-of-range ids would embed as NaN) and are masked.
  prompt_BP = jnp.where(prompt_mask_BP > 0, prompt_BP, pad_id)
  n_B = jnp.sum(prompt_mask_BP, axis=1).astype(jnp.int32)
  positions_BP = jnp.maximum(jnp.cumsum(prompt_mask_BP, axis=1) - 1, 0).astype(jnp.int32)
  kv_mask_BS = jnp.concatenate([prompt_mask_BP, jnp.ones((B, S - P), jnp.int32)], axis=1)

  # Prefill: the whole prompt in one call, once per group (rows 0, G, 2G, ...: R = B / G
  # rows); unembed only the last position. Then repeat cache and logits to the B rows.
  first = (lambda x: x) if G == 1 else (lambda x: x[::G])
  expand = (lambda x, axis: x) if G == 1 else (lambda x, axis: jnp.repeat(x, G, axis=axis))
  cache = shard(init_cache(config, B // G, S, kv_cache_dtype))
  h_RPD, cache = model.apply(variables, first(prompt_BP), positions_BT=first(positions_BP),
                             cache=cache, cache_index=0, kv_mask_BS=first(kv_mask_BS),
                             output="hidden")
  logits_RV = model.apply(variables, h_RPD[:, -1:], method=Transformer.unembed)[:, 0]
  cache = shard(cache)
  if G > 1:
    cache = shard(tuple(expand(c_LRSKd, 1) for c_LRSKd in cache))
  logits_BV = expand(logits_RV, 0)
  def is_stop(token_B):
    stop_B = jnp.zeros(token_B.shape, bool)
    for e in eos_ids:
      stop_B = stop_B | (token_B == e)
    return stop_B

  def record(step, token_B, logprob_B, tokens_BN, logprobs_BN, done_B, lengths_B):
    live_B = ~done_B
    tokens_BN = jax.lax.dynamic_update_slice(
        tokens_BN, jnp.where(live_B, token_B, pad_id)[:, None], (0, step))
    logprobs_BN = jax.lax.dynamic_update_slice(
        logprobs_BN, jnp.where(live_B, logprob_B, 0.0)[:, None], (0, step))
    lengths_B = lengths_B + live_B.astype(jnp.int32)
    done_B = done_B | is_stop(token_B)
    if budget_B is not None:
      done_B = done_B | (lengths_B >= budget_B)
    return tokens_BN, logprobs_BN, done_B, lengths_B

  # Sampling noise: row b's bits for token t are Threefry-2x32 of (t, j) under the key
  # fold_in(rng, row_offset + b) (`sampling_choice.row_bits`): a function of the rng, the
  # row id and the step only, not of the batch the row is decoded in.
  keys_B2 = None if greedy else row_keys(rng, row_offset + jnp.arange(B, dtype=jnp.int32))

  def noise(step):
    if greedy:  # no noise needed: no random bits in the loop
      return None
    return row_bits(keys_B2, jnp.full((B,), step, jnp.int32), config.vocab_size)
  token_B, logprob_B = choose(logits_BV, noise(0))
  state = record(0, token_B, logprob_B, jnp.full((B, N), pad_id, jnp.int32),
                 jnp.zeros((B, N), jnp.float32), jnp.zeros((B,), bool),
                 jnp.zeros((B,), jnp.int32))
  state = (jnp.int32(1), cache, token_B) + state

  def cond(state):
    step, done_B = state[0], state[5]
    return (step < N) & ~jnp.all(done_B)

  def body(state):
    step, cache, prev_B, tokens_BN, logprobs_BN, done_B, lengths_B = state
    # Feed token step-1 into slot P+step-1 at position n_b+step-1; sample token `step`.
    logits_B1V, cache = model.apply(
        variables, prev_B[:, None], positions_BT=(n_B + step - 1)[:, None], cache=cache,
        cache_index=P + step - 1, kv_mask_BS=kv_mask_BS)
    cache = shard(cache)
    token_B, logprob_B = choose(logits_B1V[:, 0], noise(step))
    rec = record(step, token_B, logprob_B, tokens_BN, logprobs_BN, done_B, lengths_B)
    return (step + 1, cache, token_B) + rec

  if N > 1:
    state = jax.lax.while_loop(cond, body, state)
  _, _, _, tokens_BN, logprobs_BN, _, lengths_B = state
  mask_BN = (jnp.arange(N)[None, :] < lengths_B[:, None]).astype(jnp.int32)
  return SampleOutput(
      tokens_BN=tokens_BN, logprobs_BN=logprobs_BN, mask_BN=mask_BN, lengths_B=lengths_B,
      sequences_BS=jnp.concatenate([prompt_BP, tokens_BN], axis=1),
      sequence_mask_BS=jnp.concatenate([prompt_mask_BP, mask_BN], axis=1))
