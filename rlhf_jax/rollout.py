"""Rollouts for online RL: sample G completions per prompt, score them, log-probs.

    prompts [N, P] --repeat G--> [B = N*G, P] --sampler (KV cache)--> completions [B, C]
    sequences [B, P + C] = [left-padded prompt | right-padded completion]
    rewards [B]          = reward_fn(prompt texts, completion texts, metadata)
    old_logps, ref_logps [B, C] = per-token log-probs of the completion tokens
                                  under the sampling policy / the reference

The G samples of a prompt are contiguous rows (row b belongs to group b // G).
Log-probs use the sampling temperature: log softmax(logits / T)[token] (the
"N implementation details" convention), so the old-policy log-probs equal the
sampler's own (to float tolerance) and PPO/GRPO ratios start at 1.

Micro-batch sizes are separate for generation (`rollout.generate_micro_batch`)
and log-prob passes (`rollout.logprob_micro_batch`); every micro-batch has a
fixed shape, so each function compiles once. When the generation micro-batch
holds whole groups (a multiple of G, or >= B), the sampler prefills each prompt
once per group (`sampling.generate(group_size=G)`) instead of once per row; the
samples are the same either way (`generate_group_size`). rollout.sampler="continuous"
decodes all B rows in one call of `sampling_continuous.generate_continuous` with
rollout.decode_slots slots (0: generate_micro_batch), each refilled as soon as its row
stops; the samples equal the static sampler's (row noise is a function of (rng, row, step)).
"""
from __future__ import annotations

import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import flops as flops_lib
from rlhf_jax import metrics as metrics_lib
from rlhf_jax import parallel, sampling, sampling_continuous
from rlhf_jax.models import Transformer
from rlhf_jax.models.api import window_logprobs


class Rollout(NamedTuple):
  """One batch of experience (host numpy arrays; B = prompts * group_size)."""
  sequences_BS: np.ndarray         # int32 [prompt | completion]
  segment_ids_BS: np.ndarray       # int32 1 on real tokens (prompt and completion)
  completion_mask_BC: np.ndarray   # int32 1 on completion tokens (incl. EOS)
  sample_logps_BC: np.ndarray      # float32 sampler log-probs of the completion tokens
  old_logps_BC: np.ndarray         # float32 policy log-probs before the update
  ref_logps_BC: np.ndarray | None  # float32 reference log-probs (None when not needed)
  rewards_B: np.ndarray            # float32 total reward
  reward_parts: dict               # name -> float32 [B] reward components
  lengths_B: np.ndarray            # int32 completion lengths
  finished_B: np.ndarray           # bool: ended with EOS
  prompt_len: int                  # P
  texts: list                      # completion texts
  timings: dict                    # seconds: generate, reward, logprobs
  # Multi-turn rollouts (rollout.env; `rollout_multiturn`), None otherwise:
  env_rewards_BC: np.ndarray | None = None  # float32 each env turn's reward at its turn's
                                            # last model token
  episodes: dict | None = None     # name -> float32 [B] per-episode counters (turns, ...)
  generate_flops: int | None = None  # the multi-turn sampler's FLOPs (`flops` conventions)


def completion_logps_fn(model_config, prompt_len: int, temperature: float,
                        group_size: int = 1):
  """jitted f(params, sequences_BS, segment_ids_BS) -> log-probs [B, C] of the completion
  tokens (positions P..S-1) under softmax(logits / temperature).

  Only completion positions are unembedded, model_config.logits_chunk of them at a time
  when > 0 (no [B, C, V] logits); with group_size G > 1 every G consecutive
  rows must share their prompt (a GRPO group) and run as one packed row, the prompt
  once (`models.api.window_logprobs`); the batch passed in must then hold whole groups."""
  model = Transformer(model_config)

  @jax.jit
  def f(params, sequences_BS, segment_ids_BS):
    B, S = sequences_BS.shape
    logp_BC, _, _ = window_logprobs(
        model, params, sequences_BS, segment_ids_BS, jnp.full((B,), prompt_len, jnp.int32),
        group_size=group_size, window=S - prompt_len, chunk=model_config.logits_chunk,
        temperature=temperature)
    return logp_BC
  return f


def generate_group_size(group_size: int, micro: int, rows: int) -> int:
  """The sampler's `group_size` for `rows` = N * G rollout rows generated `micro` rows per
  call: G (each group's prompt prefilled once) when every call holds whole groups, i.e.
  min(micro, rows) is a multiple of G; else 1 (per-row prefill: same samples, more
  prefill compute)."""
  return group_size if min(micro, rows) % group_size == 0 else 1


def decode_slots(rollout_cfg, rows: int) -> int:
  """rollout.sampler="continuous": the decode slots, rollout.decode_slots or (0) the
  generation micro-batch, at most `rows`."""
  return min(getattr(rollout_cfg, "decode_slots", 0) or rollout_cfg.generate_micro_batch, rows)


def micro_batched(fn: Callable, micro: int, *arrays):
  """Apply fn(*chunks) over leading-axis chunks of size `micro` (>= B: one chunk);
  concatenate on host."""
  B = arrays[0].shape[0]
  micro = min(micro, B)
  if B % micro:
    raise ValueError(f"batch of {B} rows is not divisible by the micro-batch size {micro}")
  outs = [fn(*(a[i:i + micro] for a in arrays)) for i in range(0, B, micro)]
  return jax.tree.map(lambda *xs: np.concatenate([parallel.to_host(x) for x in xs]), *outs)


def generate_rollout(*, model_config, params, ref_params, prompt_tokens_NP, prompt_mask_NP,
                     group_size: int, rng, rollout_cfg, tokenizer, reward_fn,
                     metadata: dict[str, list], logps_fn=None, need_ref: bool,
                     need_old: bool = True, progress: str = "", episode=None) -> Rollout:
  """Sample, score and compute log-probs for one batch of prompts (see module doc).

  episode: a `rollout_multiturn.EpisodeConfig` (rollout.env): every row is an episode
  against the environment (`generate_episodes`); reward_fn may then be None (the env's
  rewards alone).

  need_old=False skips the old-policy log-prob pass: old_logps_BC are then the
  sampler's own log-probs (equal to a recomputation up to float tolerance), for
  trainers whose update is fully on-policy (one update per rollout).
  rollout_cfg.stop_at_eos=False (absent: True) samples every completion to
  max_new_tokens; EOS tokens are then ordinary tokens (left out of the texts, as always).
  progress: a description: a progress bar (ETA, primary process, gone when done) over the
  sampler calls when there are several, e.g. a long evaluation's."""
  r = rollout_cfg
  G = group_size
  tokens = np.repeat(np.asarray(prompt_tokens_NP), G, axis=0)
  pmask = np.repeat(np.asarray(prompt_mask_NP), G, axis=0)
  meta = {k: [v for v in vals for _ in range(G)] for k, vals in metadata.items()}
  if episode is not None:
    return generate_episodes(
        model_config=model_config, params=params, ref_params=ref_params, tokens=tokens,
        pmask=pmask, meta=meta, group_size=G, rng=rng, rollout_cfg=r, tokenizer=tokenizer,
        reward_fn=reward_fn, logps_fn=logps_fn, need_ref=need_ref, need_old=need_old,
        progress=progress, episode=episode)
  B, P = tokens.shape
  greedy = r.temperature <= 0
  # rollout.stop_at_eos=False: no stop id, every completion runs to max_new_tokens
  eos_id = tokenizer.eos_id if getattr(r, "stop_at_eos", True) else None
  timings = {}

  t0 = time.perf_counter()
  kw = dict(max_new_tokens=r.max_new_tokens, greedy=greedy,
            temperature=1.0 if greedy else r.temperature, top_k=r.top_k, top_p=r.top_p,
            eos_id=eos_id, pad_id=tokenizer.pad_id)
  micro = r.generate_micro_batch
  if getattr(r, "sampler", "static") == "continuous":  # one call, slots refilled as rows stop
    chunks = [sampling_continuous.generate_continuous(
        model_config, params, tokens, pmask, rng, num_slots=decode_slots(r, B), **kw)]
  else:
    chunks = []
    calls = -(-B // micro)
    bar = metrics_lib.Progress(0, calls, desc=progress, unit="batch", leave=False,
                               enabled=bool(progress) and calls > 1 and parallel.is_primary())
    for i in range(0, B, micro):   # row_offset: the rows' noise as in one call on all B
      chunks.append(sampling.generate(
          model_config, params, tokens[i:i + micro], pmask[i:i + micro], rng, row_offset=i,
          group_size=generate_group_size(G, micro, B), **kw))
      bar.update(1)
    bar.close()
  host = parallel.to_host  # multi-host: the sampler's outputs may be sharded over processes
  comp = np.concatenate([host(o.tokens_BN) for o in chunks])
  cmask = np.concatenate([host(o.mask_BN) for o in chunks]).astype(np.int32)
  slogp = np.concatenate([host(o.logprobs_BN) for o in chunks]).astype(np.float32)
  timings["generate"] = time.perf_counter() - t0

  t0 = time.perf_counter()
  lengths = cmask.sum(1).astype(np.int32)
  finished = np.array([bool(m.any()) and int(t[m.sum() - 1]) == tokenizer.eos_id
                       for t, m in zip(comp, cmask)])
  texts = [tokenizer.decode([int(t) for t, k in zip(row, m) if k and t != tokenizer.eos_id])
           for row, m in zip(comp, cmask)]
  prompts = [tokenizer.decode([int(t) for t, k in zip(row, m) if k]) for row, m in
             zip(tokens, pmask)]
  meta.update(completion_lengths=list(lengths), finished=list(finished))
  total, parts = reward_fn(prompts, texts, meta)
  timings["reward"] = time.perf_counter() - t0

  t0 = time.perf_counter()
  sequences = np.concatenate([tokens, comp], axis=1).astype(np.int32)
  seg = np.concatenate([pmask, cmask], axis=1).astype(np.int32)
  logps_fn = logps_fn or completion_logps_fn(model_config, P, 1.0 if greedy else r.temperature)
  old, ref = logprob_passes(logps_fn, params, ref_params, sequences, seg, cmask,
                            r.logprob_micro_batch, slogp if not need_old else None, need_ref)
  mask_f = cmask.astype(np.float32)
  timings["logprobs"] = time.perf_counter() - t0
  return Rollout(sequences, seg, cmask, slogp * mask_f, old, ref,
                 np.asarray(total, np.float32), {k: np.asarray(v, np.float32)
                                                 for k, v in parts.items()},
                 lengths, finished, P, texts, timings)


def logprob_passes(logps_fn, params, ref_params, sequences_BS, segment_ids_BS, mask_BC,
                   micro: int, sample_logps_BC, need_ref: bool):
  """(old_logps_BC, ref_logps_BC or None), float32, 0 where mask_BC is 0: the policy's
  log-prob pass (skipped when sample_logps_BC is given: the sampler's own are used) and
  the reference's (need_ref), `micro` rows a call."""
  old = (micro_batched(lambda s, g: logps_fn(params, s, g), micro, sequences_BS,
                       segment_ids_BS) if sample_logps_BC is None else sample_logps_BC)
  ref = (micro_batched(lambda s, g: logps_fn(ref_params, s, g), micro, sequences_BS,
                       segment_ids_BS) if need_ref else None)
  mask_f = mask_BC.astype(np.float32)
  old = (old * mask_f).astype(np.float32)
  ref = None if ref is None else (ref * mask_f).astype(np.float32)
  return old, ref


def generate_episodes(*, model_config, params, ref_params, tokens, pmask, meta, group_size,
                      rng, rollout_cfg, tokenizer, reward_fn, logps_fn, need_ref, need_old,
                      progress, episode) -> Rollout:
  """`generate_rollout` with rollout.env: B = N * G episodes (`rollout_multiturn`), scored
  by the env's rewards (+ reward_fn on each episode's last model turn), then the log-prob
  passes over the whole sequences (model tokens kept)."""
  from rlhf_jax import rollout_multiturn as mt
  r = rollout_cfg
  B, P = tokens.shape
  greedy = r.temperature <= 0
  timings = {}
  t0 = time.perf_counter()
  ep = mt.generate_episodes(model_config=model_config, params=params, prompt_tokens_BP=tokens,
                            prompt_mask_BP=pmask, rng=rng, rollout_cfg=r, tokenizer=tokenizer,
                            episode=episode, metadata=meta, group_size=group_size,
                            progress=progress)
  timings["generate"] = time.perf_counter() - t0

  t0 = time.perf_counter()
  cmask = ep["model_BC"].astype(np.int32)
  lengths = cmask.sum(1).astype(np.int32)   # model tokens
  parts = {"env": ep["env_return_B"]}
  total = ep["env_return_B"].astype(np.float64)
  if reward_fn is not None:
    prompts = [tokenizer.decode([int(t) for t, k in zip(row, m) if k]) for row, m in
               zip(tokens, pmask)]
    meta = dict(meta, completion_lengths=list(lengths), finished=list(ep["finished_B"]),
                turns=list(ep["episodes"]["turns"]))
    spec_total, spec_parts = reward_fn(prompts, ep["final_texts"], meta)
    total = total + np.asarray(spec_total, np.float64)
    parts.update(spec_parts)
  timings["reward"] = time.perf_counter() - t0

  t0 = time.perf_counter()
  C = r.max_new_tokens
  seg_c = (np.arange(C)[None] < ep["lengths_B"][:, None]).astype(np.int32)
  sequences = np.concatenate([tokens, ep["tokens_BC"]], axis=1).astype(np.int32)
  seg = np.concatenate([pmask, seg_c], axis=1).astype(np.int32)
  logps_fn = logps_fn or completion_logps_fn(model_config, P, 1.0 if greedy else r.temperature)
  slogp = ep["logprobs_BC"]
  old, ref = logprob_passes(logps_fn, params, ref_params, sequences, seg, cmask,
                            r.logprob_micro_batch, slogp if not need_old else None, need_ref)
  timings["logprobs"] = time.perf_counter() - t0
  return Rollout(sequences, seg, cmask, slogp * cmask, old, ref,
                 total.astype(np.float32), {k: np.asarray(v, np.float32)
                                            for k, v in parts.items()},
                 lengths, ep["finished_B"], P, ep["texts"], timings,
                 env_rewards_BC=ep["env_rewards_BC"], episodes=ep["episodes"],
                 generate_flops=mt.generate_flops(model_config, P, r, ep, B))


def group_view(x_B: np.ndarray, group_size: int) -> np.ndarray:
  """[B] -> [B / G, G] (rows of one prompt together)."""
  return np.asarray(x_B).reshape(-1, group_size)


def zero_variance_groups(rewards_B: np.ndarray, group_size: int) -> np.ndarray:
  """bool [B / G]: groups whose G rewards are all equal (no learning signal)."""
  g = group_view(rewards_B, group_size)
  return np.all(g == g[:, :1], axis=1)


def replace_groups(ro: Rollout, extra: Rollout, dead_P: np.ndarray, group_size: int) -> Rollout:
  """Rollout `ro` with its dead groups (dead_P[p] True) replaced, in order, by the groups
  of `extra` that have reward variance (DAPO dynamic sampling); shapes stay fixed."""
  alive_extra = np.flatnonzero(~zero_variance_groups(extra.rewards_B, group_size))
  targets = np.flatnonzero(dead_P)[:len(alive_extra)]
  if not len(targets):
    return ro
  G = group_size
  dst = np.concatenate([np.arange(t * G, (t + 1) * G) for t in targets])
  src = np.concatenate([np.arange(s * G, (s + 1) * G) for s in alive_extra[:len(targets)]])

  def put(a, b):
    if a is None:
      return None
    a = np.array(a, copy=True)
    a[dst] = np.asarray(b)[src]
    return a
  texts = list(ro.texts)
  for d, s_ in zip(dst, src):
    texts[d] = extra.texts[s_]
  if ro.episodes is not None:  # multi-turn: the per-episode arrays follow their rows
    ro = ro._replace(env_rewards_BC=put(ro.env_rewards_BC, extra.env_rewards_BC),
                     episodes={k: put(v, extra.episodes.get(k, np.zeros_like(v)))
                               for k, v in ro.episodes.items()},
                     generate_flops=ro.generate_flops + extra.generate_flops)
  return ro._replace(
      sequences_BS=put(ro.sequences_BS, extra.sequences_BS),
      segment_ids_BS=put(ro.segment_ids_BS, extra.segment_ids_BS),
      completion_mask_BC=put(ro.completion_mask_BC, extra.completion_mask_BC),
      sample_logps_BC=put(ro.sample_logps_BC, extra.sample_logps_BC),
      old_logps_BC=put(ro.old_logps_BC, extra.old_logps_BC),
      ref_logps_BC=put(ro.ref_logps_BC, extra.ref_logps_BC),
      rewards_B=put(ro.rewards_B, extra.rewards_B),
      reward_parts={k: put(v, extra.reward_parts[k]) for k, v in ro.reward_parts.items()},
      lengths_B=put(ro.lengths_B, extra.lengths_B), finished_B=put(ro.finished_B, extra.finished_B),
      texts=texts, timings={k: ro.timings[k] + extra.timings[k] for k in ro.timings})


# ----------------------------------------------------------------------------
# Reward-hacking monitors (pure numpy; logged every step and at every eval)
# ----------------------------------------------------------------------------

def repetition_rate(tokens_BC: np.ndarray, mask_BC: np.ndarray, n: int = 2) -> np.ndarray:
  """float [B]: the share of a completion's token n-grams that already occurred earlier in
  it, (count - distinct) / count over its count = L - n + 1 n-grams (0 when count <= 0).
  Degenerate repetition ("the the the ...") is a classic symptom of over-optimising a
  learned reward."""
  out = np.zeros(len(tokens_BC), np.float64)
  for b, (row, m) in enumerate(zip(np.asarray(tokens_BC), np.asarray(mask_BC))):
    toks = [int(t) for t, k in zip(row, m) if k]
    grams = [tuple(toks[i:i + n]) for i in range(len(toks) - n + 1)]
    if grams:
      out[b] = (len(grams) - len(set(grams))) / len(grams)
  return out


def order_disagreement(a_B: np.ndarray, b_B: np.ndarray, group_size: int) -> float | None:
  """Among pairs (i < j) of completions of the same prompt that both rewards tell apart
  (a_i != a_j and b_i != b_j), the share they rank in opposite orders; None without such
  pairs. E.g. a judge vs a reward model, or a proxy RM vs the gold reward."""
  a, b = group_view(a_B, group_size).astype(np.float64), group_view(b_B, group_size).astype(
      np.float64)
  i, j = np.triu_indices(group_size, k=1)
  da, db = np.sign(a[:, i] - a[:, j]), np.sign(b[:, i] - b[:, j])
  both = (da != 0) & (db != 0)
  return float((da != db)[both].mean()) if both.any() else None


def hacking_monitors(ro: Rollout, group_size: int, prefix: str = "") -> dict[str, float]:
  """repetition_rate, and for every two reward components a, b (sorted labels):
  reward_disagreement/a_vs_b (`order_disagreement`) and, for labels gold and proxy,
  proxy_gold_gap = mean proxy - mean gold."""
  C = ro.completion_mask_BC.shape[1]
  out = {f"{prefix}repetition_rate": float(repetition_rate(
      ro.sequences_BS[:, -C:], ro.completion_mask_BC).mean())}
  labels = sorted(ro.reward_parts)
  for x, k in enumerate(labels):
    for y in labels[x + 1:]:
      d = order_disagreement(ro.reward_parts[k], ro.reward_parts[y], group_size)
      if d is not None:
        out[f"{prefix}reward_disagreement/{k}_vs_{y}"] = d
  if "gold" in ro.reward_parts and "proxy" in ro.reward_parts:
    out[f"{prefix}proxy_gold_gap"] = float(np.mean(ro.reward_parts["proxy"])
                                           - np.mean(ro.reward_parts["gold"]))
  return out


def rollout_stats(ro: Rollout, group_size: int, max_turns: int = 1) -> dict[str, Any]:
  """Per-step rollout metrics: rewards (total and per component), lengths, EOS rate,
  the reward-hacking monitors (`hacking_monitors`)... and for multi-turn rollouts the
  episode metrics env/* (`rollout_multiturn.episode_stats`, success_by_turn_k for
  k <= max_turns). response_length counts model tokens only."""
  out = {"reward_mean": float(ro.rewards_B.mean()), "reward_std": float(ro.rewards_B.std()),
         "response_length": float(ro.lengths_B.mean()),
         "finished_frac": float(ro.finished_B.mean()),
         "zero_variance_group_frac": float(zero_variance_groups(ro.rewards_B, group_size).mean())}
  for k, v in ro.reward_parts.items():
    out[f"reward/{k}"] = float(np.mean(v))
  out.update(hacking_monitors(ro, group_size))
  if ro.episodes is not None:
    from rlhf_jax.rollout_multiturn import episode_stats
    out.update(episode_stats(ro.episodes, max_turns))
  if ro.ref_logps_BC is not None:
    m = ro.completion_mask_BC.astype(np.float32)
    out["kl_ref_k1"] = float(((ro.old_logps_BC - ro.ref_logps_BC) * m).sum() /
                             max(m.sum(), 1.0))
  return out


def compute_counts(mcfg, prompt_len: int, rollout_cfg, group_size: int, logprob_group: int,
                   ro: Rollout, passes: int) -> dict:
  """FLOPs and tokens of one `generate_rollout` (shared by GRPO and PPO):
  the sampler calls (`flops.rollout_generate_flops`: generate_micro_batch rows a call,
  each decoding until its longest row stopped), `passes` log-prob passes over the padded
  completion window (old and / or reference: `flops.window_flops`, groups packed when
  `logprob_group` > 1) and the real sampled tokens."""
  B = len(ro.lengths_B)
  micro = rollout_cfg.generate_micro_batch
  if ro.generate_flops is not None:  # multi-turn (`rollout_multiturn.generate_flops`)
    gen = ro.generate_flops
  elif getattr(rollout_cfg, "sampler", "static") == "continuous":
    gen = sampling_continuous.continuous_generate_flops(
        mcfg, ro.lengths_B, prompt_len, decode_slots(rollout_cfg, B), rollout_cfg.max_new_tokens)
  else:
    gen = flops_lib.rollout_generate_flops(
        mcfg, ro.lengths_B, prompt_len, micro, generate_group_size(group_size, micro, B))
  lp = passes * flops_lib.window_flops(mcfg, B, prompt_len, rollout_cfg.max_new_tokens,
                                       logprob_group)
  return {"flops/generate": gen, "flops/logprob_passes": lp,
          "tokens/sampled": int(np.sum(ro.lengths_B)), "samples/completions": B}

