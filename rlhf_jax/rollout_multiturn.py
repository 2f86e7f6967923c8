"""Multi-turn rollouts: episodes against an environment, one sequence per sample.

`rollout.env` (a spec of `rlhf_jax.envs`, e.g. "guess_number") switches them on. Each of
the B = N * G rows is an episode: the prompt, then model turn -> environment turn ->
model turn ... up to `rollout.max_turns` model turns and `rollout.max_new_tokens`
completion tokens (model and environment tokens together), all in one sequence rendered
with the chat template:

    [prompt] model turn 1 (EOS) [close + observation message + generation prompt] model turn 2 ...

A model turn ends at EOS, at the tool-call end `</tool>` (`envs.tools.TOOL_CALL_END`: the
text the env receives ends there), or after `rollout.max_tokens_per_turn` tokens. The
env's observation is tokenized as the text between that turn and the next assistant
reply (`Renderer`, `data.conversation.between_text`: chatml "\\n<|im_start|>user\\nhigher
<|im_end|>\\n<|im_start|>assistant\\n" after the EOS <|im_end|>; the turn's closing text in
full when the turn did not end with EOS), exactly as multi-turn SFT rows write it
(`data.conversation.tokenize_conversation`), and appended to the KV cache without
recomputing the prefix (`sampling_multiturn`). An episode ends when the env says done, after max_turns,
or when the next observation and one more model token would not fit in the budget
(truncated: finished = False).

The result is an ordinary `rollout.Rollout` with:

    completion_mask_BC   1 on model-generated tokens only (0 on env tokens, padding)
    segment_ids_BS       1 on every real token (prompt, model and env tokens)
    sample/old/ref logps the model tokens' log-probs (0 elsewhere)
    lengths_B            model tokens of the episode
    finished_B           the env ended the episode (not cut by max_turns or the budget)
    rewards_B            sum of the env's per-turn rewards (+ config.reward.spec on the
                         last model turn's text, when set); reward_parts["env"] = the sum
    env_rewards_BC       each turn's env reward at that turn's last model token
    episodes             per-row counters (`EPISODE_KEYS`, the env's info counters)
    texts                the whole completion (model and env text, EOS left out)

Every consumer of completion_mask_BC then sees model tokens only: the policy losses, the
KL terms, advantages (GAE passes the value of the next model token across an env gap),
lengths and the `env/*` metrics (`episode_stats`).

Environments get `reset(row, seed)` with row = {"prompt": messages, "answer", ...} (the
prompt set's metadata) and a seed drawn from the rollout's rng per prompt: the G episodes
of a group share it (same secret, same task), so group baselines compare policies, not
environments. Same config + seed -> same episodes.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import numpy as np

from rlhf_jax import metrics as metrics_lib
from rlhf_jax import parallel
from rlhf_jax import sampling_multiturn as smt
from rlhf_jax.data import conversation

ENV_SEED_SALT = 0x5EED
# Per-row episode arrays of `Rollout.episodes` besides the env's own info counters.
EPISODE_KEYS = ("turns", "model_tokens", "env_tokens", "correct", "solved_turn", "truncated")


@dataclasses.dataclass(frozen=True)
class EpisodeConfig:
  """The multi-turn knobs of config.rollout (`episode_config`)."""
  env_factory: Callable
  max_turns: int
  max_tokens_per_turn: int   # resolved: 0 -> max_new_tokens
  env_chunk: int             # tokens fed per extend call (rollout.env_tokens_per_call)
  turn_rewards: str          # "sum" | "per_turn"
  stop_strings: tuple = ()


def enabled(rollout_cfg) -> bool:
  """rollout.env is set (multi-turn rollouts)."""
  return bool(getattr(rollout_cfg, "env", ""))


def episode_config(rollout_cfg) -> EpisodeConfig | None:
  """The EpisodeConfig of config.rollout, None when rollout.env is "" (single turn)."""
  if not enabled(rollout_cfg):
    return None
  from rlhf_jax import envs
  r = rollout_cfg
  return EpisodeConfig(
      env_factory=envs.make_env_factory(r.env), max_turns=int(r.max_turns),
      max_tokens_per_turn=int(r.max_tokens_per_turn or r.max_new_tokens),
      env_chunk=int(r.env_tokens_per_call), turn_rewards=str(r.turn_rewards),
      stop_strings=(envs.TOOL_CALL_END,))


def env_seeds(rng, num_prompts: int, group_size: int) -> np.ndarray:
  """int64 [N * G]: each prompt's env seed (from rng), repeated over its G rows."""
  s = jax.random.randint(jax.random.fold_in(rng, ENV_SEED_SALT), (num_prompts,), 0,
                         2 ** 31 - 1)
  return np.repeat(np.asarray(s, np.int64), group_size)


def stop_sequences(tokenizer, strings) -> list[list[int]]:
  """Token ids of each stop string as the tokenizer writes it alone (the sampler's in-loop
  check); strings it cannot write without an unknown token, or in more than
  `sampling_multiturn.MAX_STOP_TOKENS` tokens, are left to the host's text check
  (`cut_at_stop`)."""
  out = []
  for s in strings:
    ids = tokenizer.encode(s)
    unk = getattr(tokenizer, "unk_id", None)
    if (ids and len(ids) <= smt.MAX_STOP_TOKENS and (unk is None or unk not in ids)
        and tokenizer.decode(ids) == s):
      out.append(ids)
  return out


def cut_at_stop(tokenizer, ids: list[int], strings) -> tuple[int, str]:
  """(k, text): a turn's tokens `ids` end at the first stop string of their decoded text:
  k = the fewest tokens whose text contains it (len(ids) when none does), text = the
  text of those k tokens up to the end of the stop string."""
  text = tokenizer.decode(ids)
  hits = [(text.find(s), s) for s in strings if s in text]
  if not hits:
    return len(ids), text
  at, s = min(hits)
  end = at + len(s)
  for k in range(1, len(ids) + 1):
    t = tokenizer.decode(ids[:k])
    if len(t) >= end and s in t:
      return k, t[:t.find(s) + len(s)]
  return len(ids), text[:end]


_REPLY = "\x00reply\x00"  # a stand-in model turn no template changes


class Renderer:
  """Observation text -> the tokens a rollout appends after a model turn: the text between
  that turn and the next assistant reply (`data.conversation.between_text`, as multi-turn
  SFT rows write it), without the EOS token's own text when the turn ended with EOS
  (`conversation.after_eos`)."""

  def __init__(self, tokenizer):
    self.tokenizer = tokenizer
    self.turn = [{"role": "user", "content": "q"}, {"role": "assistant", "content": _REPLY}]

  def tokens(self, role: str, content: str, after_eos: bool) -> list[int]:
    text = conversation.between_text(self.tokenizer, self.turn,
                                     [{"role": role, "content": content}])
    return self.tokenizer.encode(conversation.after_eos(self.tokenizer, text) if after_eos
                                 else text)


def run_episodes(*, model_config, params, prompt_tokens_BP, prompt_mask_BP, rng, row_offset: int,
                 envs_B: list, episode: EpisodeConfig, tokenizer, max_new_tokens: int,
                 temperature: float, top_k: int, top_p: float, greedy: bool) -> dict:
  """Play the B episodes of one micro-batch (module docstring); envs_B are reset.

  Returns tokens_BC, logprobs_BC, model_BC (bool), lengths_B (completion tokens, model and
  env), turns (per row: [{"text", "reward", "end", "info"}]), finished_B, truncated_B and
  the sampler's decode_steps / extend_calls."""
  B, P = np.shape(prompt_tokens_BP)
  C = max_new_tokens
  eos = tokenizer.eos_id
  stops = stop_sequences(tokenizer, episode.stop_strings)
  spec = smt.make_spec(
      model_config, prompt_len=P, max_new_tokens=C, env_chunk=episode.env_chunk, eos_id=eos,
      num_stops=len(stops), pad_id=tokenizer.pad_id, top_k=top_k, top_p=top_p, greedy=greedy,
      mesh=None)
  sampler = smt.MultiTurnSampler(
      spec, params, prompt_tokens_BP, prompt_mask_BP, rng,
      max_tokens_per_turn=episode.max_tokens_per_turn, stop_seqs=stops,
      temperature=temperature, top_p=top_p, row_offset=row_offset)
  render = Renderer(tokenizer)
  model_BC = np.zeros((B, C), bool)
  turns = [[] for _ in range(B)]
  finished_B, truncated_B = np.zeros(B, bool), np.zeros(B, bool)
  live_B = np.ones(B, bool)
  for turn in range(episode.max_turns):
    sampler.decode_turn(live_B)
    h = sampler.host()
    tk, lp, filled = h["tokens_BC"].copy(), h["logprobs_BC"].copy(), h["filled_B"].copy()
    feed = {}
    for b in np.flatnonzero(live_B):
      start, end = int(h["turn_start_B"][b]), int(filled[b])
      ids = [int(t) for t in tk[b, start:end + 1]]
      body = ids[:-1] if ids and ids[-1] == eos else ids
      k, text = cut_at_stop(tokenizer, body, episode.stop_strings)
      if k < len(body):  # a stop string the in-loop check missed: take the rest back
        end = start + k - 1
        tk[b, end + 1:], lp[b, end + 1:], filled[b] = tokenizer.pad_id, 0.0, end
        ids = ids[:k]
      model_BC[b, start:end + 1] = True
      step = envs_B[b].step(text)
      turns[b].append({"text": text, "reward": float(step.reward), "end": end,
                       "info": dict(step.info)})
      if step.done or turn + 1 == episode.max_turns:
        live_B[b], finished_B[b] = False, bool(step.done)
        continue
      obs = render.tokens(envs_B[b].observation_role, step.observation or "",
                          after_eos=ids[-1] == eos)
      if end + 1 + len(obs) >= C:  # the observation and one more model token do not fit
        live_B[b], truncated_B[b] = False, True
        continue
      tk[b, end + 1:end + 1 + len(obs)] = obs
      feed[int(b)] = [int(t) for t in tk[b, end:end + 1 + len(obs)]]
    sampler.push(tokens_BC=tk, logprobs_BC=lp, filled_B=filled)
    if not feed:
      break
    sampler.feed(feed)
  truncated_B |= ~finished_B & ~truncated_B & np.array([len(t) < episode.max_turns
                                                         for t in turns])
  h = sampler.host()
  lengths_B = h["filled_B"] + 1
  tokens_BC = np.where(np.arange(C)[None] < lengths_B[:, None], h["tokens_BC"], tokenizer.pad_id)
  logprobs_BC = np.where(model_BC, h["logprobs_BC"], 0.0).astype(np.float32)
  return {"tokens_BC": tokens_BC.astype(np.int32), "logprobs_BC": logprobs_BC,
          "model_BC": model_BC, "lengths_B": lengths_B.astype(np.int32), "turns": turns,
          "finished_B": finished_B, "truncated_B": truncated_B,
          "decode_steps": sampler.decode_steps, "extend_calls": sampler.extend_calls}


def episode_arrays(turns: list, model_BC: np.ndarray, lengths_B: np.ndarray,
                   truncated_B: np.ndarray) -> dict[str, np.ndarray]:
  """Per-row float arrays [B]: `EPISODE_KEYS` and every numeric entry of the episode's info
  (`envs.episode_info`: int counters summed over the turns, bools such as "correct" and
  floats as the last step says; "turn" left out: `turns` counts the rollout's turns);
  0 for a row whose info lacks a key."""
  from rlhf_jax.envs import episode_info
  B = len(turns)
  out = {"turns": np.array([len(t) for t in turns], np.float32),
         "model_tokens": model_BC.sum(1).astype(np.float32),
         "env_tokens": (lengths_B - model_BC.sum(1)).astype(np.float32),
         "truncated": truncated_B.astype(np.float32)}
  infos = [episode_info([s["info"] for s in t]) for t in turns]
  keys = sorted({k for info in infos for k, v in info.items()
                 if isinstance(v, (int, float, np.number))} - {"turn"})
  for k in keys:
    out[k] = np.array([float(info.get(k, 0)) for info in infos], np.float32)
  out.setdefault("correct", np.zeros(B, np.float32))
  # the turn at which the episode was solved (0: not solved)
  out["solved_turn"] = np.where(out["correct"] > 0, out["turns"], 0).astype(np.float32)
  return out


def episode_stats(episodes: dict, max_turns: int, prefix: str = "env/") -> dict[str, float]:
  """Metrics of a batch of episodes: means of every per-row array (turns, model_tokens,
  env_tokens, truncated, correct -> `success`, the env's counters e.g. tool_calls), the
  tool-call rate (share of episodes with >= 1 tool call), and success_by_turn_k (share of
  episodes solved within k model turns, k = 1 .. max_turns)."""
  out = {}
  for k, v in episodes.items():
    if k == "solved_turn":
      continue
    out[f"{prefix}{'success' if k == 'correct' else k}"] = float(np.mean(v))
  if "tool_calls" in episodes:
    out[f"{prefix}tool_call_rate"] = float(np.mean(episodes["tool_calls"] > 0))
  solved = episodes["solved_turn"]
  for k in range(1, max_turns + 1):
    out[f"{prefix}success_by_turn_{k}"] = float(np.mean((solved > 0) & (solved <= k)))
  return out


def generate_episodes(*, model_config, params, prompt_tokens_BP, prompt_mask_BP, rng,
                      rollout_cfg, tokenizer, episode: EpisodeConfig, metadata: dict,
                      group_size: int, progress: str = "") -> dict:
  """Every row's episode, `rollout_cfg.generate_micro_batch` rows per sampler (rows keep
  their noise ids): the `run_episodes` arrays for all B rows, plus per-row env rewards
  env_rewards_BC (each turn's reward at its last model token), env_return_B, texts (the
  whole completion), final_texts (the last model turn), episodes (`episode_arrays`) and
  the sampler's counts."""
  r = rollout_cfg
  B, P = np.shape(prompt_tokens_BP)
  greedy = r.temperature <= 0
  seeds = env_seeds(rng, B // group_size, group_size)
  rows = []
  for b in range(B):
    row = {k: v[b] for k, v in metadata.items()}
    if "prompt_messages" in row:
      row["prompt"] = row["prompt_messages"]
    rows.append(row)
  envs_B = []
  for b in range(B):
    env = episode.env_factory()
    env.reset(rows[b], int(seeds[b]))
    envs_B.append(env)
  micro = min(r.generate_micro_batch, B)
  calls = -(-B // micro)
  bar = metrics_lib.Progress(0, calls, desc=progress, unit="batch", leave=False,
                             enabled=bool(progress) and calls > 1 and parallel.is_primary())
  parts = []
  for i in range(0, B, micro):
    sl = slice(i, i + micro)
    parts.append(run_episodes(
        model_config=model_config, params=params, prompt_tokens_BP=prompt_tokens_BP[sl],
        prompt_mask_BP=prompt_mask_BP[sl], rng=rng, row_offset=i, envs_B=envs_B[sl],
        episode=episode, tokenizer=tokenizer, max_new_tokens=r.max_new_tokens,
        temperature=1.0 if greedy else r.temperature, top_k=r.top_k, top_p=r.top_p,
        greedy=greedy))
    bar.update(1)
  bar.close()
  cat = lambda k: np.concatenate([p[k] for p in parts])
  out = {k: cat(k) for k in ("tokens_BC", "logprobs_BC", "model_BC", "lengths_B",
                             "finished_B", "truncated_B")}
  turns = [t for p in parts for t in p["turns"]]
  C = r.max_new_tokens
  env_rewards_BC = np.zeros((B, C), np.float32)
  for b, t in enumerate(turns):
    for s in t:
      env_rewards_BC[b, s["end"]] += s["reward"]
  eos = tokenizer.eos_id
  out.update(
      turns=turns, env_rewards_BC=env_rewards_BC,
      env_return_B=np.array([sum(s["reward"] for s in t) for t in turns], np.float32),
      texts=[tokenizer.decode([int(x) for x in row[:n] if x != eos])
             for row, n in zip(out["tokens_BC"], out["lengths_B"])],
      final_texts=[t[-1]["text"] if t else "" for t in turns],
      episodes=episode_arrays(turns, out["model_BC"], out["lengths_B"], out["truncated_B"]),
      decode_steps=sum(p["decode_steps"] for p in parts),
      extend_calls=sum(p["extend_calls"] for p in parts), micro=micro,
      env_chunk=episode.env_chunk)
  return out


def generate_flops(mcfg, prompt_len: int, rollout_cfg, ep: dict, rows: int) -> int:
  """`sampling_multiturn.multiturn_generate_flops` of a `generate_episodes` result (its
  decode steps and extend calls summed over micro-batches of ep["micro"] rows)."""
  return smt.multiturn_generate_flops(
      mcfg, rows, ep["micro"], prompt_len, rollout_cfg.max_new_tokens, ep["env_chunk"],
      ep["decode_steps"], ep["extend_calls"])
