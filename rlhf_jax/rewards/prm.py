"""A trained process reward model (`rlhf_jax.trainers.prm`) as a reward for PPO/GRPO.

Process supervision (Uesato et al. 2022, "Solving math word problems with
process- and outcome-based feedback"; Lightman et al. 2023, "Let's Verify Step
by Step"): the completion is split into steps at `step_sep` (empty steps
dropped), tokenized exactly as the PRM was trained (`rlhf_jax.data.prm.tokenize_steps`:
chat-templated prompt, then each step encoded separately, joined by enc(step_sep)),
and p_i = sigmoid(PRM logit at step i's last token) is the probability that step
i is correct. The solution-level reward aggregates them:

    min    min_i p_i            (Lightman et al. use the product and the minimum)
    prod   prod_i p_i           (probability that every step is correct)
    last   p_{n-1}              (the final step's score)
    mean   (1/n) sum_i p_i

A completion with no scorable step (empty, or every step beyond the PRM's max_len)
gets `empty_reward` (default 0). Steps ending beyond the trained max_len are
not scored (the aggregate is over the steps that fit).

Per-step statistics for the trainer's logs (`stat`): one scoring pass is shared
by every PRMReward of the same workdir called on the same batch (a cache of the
last batch), so a reward spec can add weight-0 components whose values the
rollout logs as reward/<label> (batch means), with no change to the trainers:

    [{"name": "prm", "workdir": W, "aggregate": "min"},
     {"name": "prm", "workdir": W, "stat": "num_steps", "label": "prm_steps", "weight": 0},
     {"name": "prm", "workdir": W, "stat": "step_mean", "label": "prm_step_mean", "weight": 0},
     {"name": "prm", "workdir": W, "stat": "frac_wrong", "label": "prm_frac_wrong",
      "weight": 0}]

stat: "" (the aggregate, the reward), "num_steps" (scored steps), "step_mean" /
"step_min" / "step_max" (of p_i), "frac_wrong" (fraction of steps with p_i < 0.5),
"first_wrong" (index of the first step with p_i < 0.5, n if none).
`prm_step_stats(fn, prompts, completions)` gives all of them at once.

Dense per-step rewards (p_i placed at step-end tokens for PPO) are NOT
implemented: the reward-function interface returns one number per completion.
"""
from __future__ import annotations

import functools
import json
import os
from typing import Sequence

import numpy as np

from rlhf_jax.rewards.base import Metadata, RewardError, batch_size

AGGREGATES = ("min", "prod", "last", "mean")
STATS = ("", "num_steps", "step_mean", "step_min", "step_max", "frac_wrong", "first_wrong")
_LOADED: dict = {}  # workdir -> (model config, params, tokenizer, max_prompt_len, max_len)
_LAST: dict = {}    # workdir -> (key of the last batch, its per-step probabilities)


def split_completion(completion: str, step_sep: str = "\n") -> list[str]:
  """Non-empty, stripped steps of a completion; a trailing '#### N' answer line stays
  a step of its own only if it is not the '####' line (dropped, as in training)."""
  steps = [s.strip() for s in completion.split(step_sep)] if step_sep else [completion.strip()]
  return [s for s in steps if s and not s.startswith("####")]


def aggregate(probs: Sequence[float], how: str, empty: float = 0.0) -> float:
  """The solution-level score of per-step probabilities (module docstring)."""
  p = np.asarray(probs, np.float64)
  if p.size == 0:
    return float(empty)
  if how == "min":
    return float(p.min())
  if how == "prod":
    return float(np.prod(p))
  if how == "last":
    return float(p[-1])
  if how == "mean":
    return float(p.mean())
  raise ValueError(f"prm: aggregate={how!r}: expected one of {AGGREGATES}")


def step_stat(probs: Sequence[float], stat: str) -> float:
  p = np.asarray(probs, np.float64)
  if stat == "num_steps":
    return float(p.size)
  if p.size == 0:
    return 0.0
  if stat == "step_mean":
    return float(p.mean())
  if stat == "step_min":
    return float(p.min())
  if stat == "step_max":
    return float(p.max())
  if stat == "frac_wrong":
    return float((p < 0.5).mean())
  if stat == "first_wrong":
    wrong = np.flatnonzero(p < 0.5)
    return float(wrong[0] if wrong.size else p.size)
  raise ValueError(f"prm: stat={stat!r}: expected one of {STATS}")


@functools.lru_cache(maxsize=None)
def _logits_fn(model_config):
  import jax

  from rlhf_jax.models.heads import ScalarModel
  model = ScalarModel(model_config)
  return jax.jit(lambda p, t, s: model.apply({"params": p}, t, s))


def _load(workdir: str):
  if workdir not in _LOADED:
    import jax

    from rlhf_jax.trainers.reward_model import load_reward_model
    if not os.path.isdir(workdir):
      raise RewardError(f"prm: workdir {workdir} does not exist")
    try:
      with open(os.path.join(workdir, "config.json")) as f:
        data = json.load(f)["data"]
      lens = int(data["max_prompt_len"]), int(data["max_len"])
    except (OSError, KeyError, TypeError, ValueError):
      raise RewardError(f"prm: {workdir}/config.json has no data.max_prompt_len / "
                        f"data.max_len: not a PRM run (rlhf_jax.trainers.prm)") from None
    mcfg, params, tokenizer = load_reward_model(workdir)
    _LOADED[workdir] = (mcfg, jax.device_put(params), tokenizer) + lens
  return _LOADED[workdir]


class PRMReward:
  """Reward = an aggregate of a trained PRM's per-step probabilities (module docstring).

  workdir: a PRM run directory. aggregate: min | prod | last | mean. step_sep: the
  step separator in completions. stat: "" = the aggregate, else a per-step
  statistic for logging (weight 0). batch_size: rows per jitted forward pass.
  """

  name = "prm"

  def __init__(self, workdir: str, aggregate: str = "min", step_sep: str = "\n",
               stat: str = "", batch_size: int = 32, empty_reward: float = 0.0):
    if aggregate not in AGGREGATES:
      raise ValueError(f"prm: aggregate={aggregate!r}: expected one of {AGGREGATES}")
    if stat not in STATS:
      raise ValueError(f"prm: stat={stat!r}: expected one of {STATS}")
    if batch_size < 1:
      raise ValueError(f"prm: batch_size={batch_size} must be >= 1")
    self.workdir, self.aggregate, self.step_sep, self.stat = workdir, aggregate, step_sep, stat
    self.batch_size, self.empty_reward = int(batch_size), float(empty_reward)
    (self.model_config, self.params, self.tokenizer, self.max_prompt_len,
     self.max_len) = _load(workdir)

  def step_probs(self, prompts: Sequence, completions: Sequence[str],
                 metadata: Metadata | None = None) -> list[np.ndarray]:
    """Per completion, p(correct) float64 [n_steps] of the steps that fit."""
    from rlhf_jax.data.prm import tokenize_steps
    metadata = metadata or {}
    prompts = list(metadata.get("prompt_messages", prompts))
    key = (self.step_sep, tuple(map(str, prompts)), tuple(completions))
    cached = _LAST.get(self.workdir)
    if cached is not None and cached[0] == key:
      return cached[1]
    B = len(completions)
    if B == 0:
      return []
    rows = [tokenize_steps(p, split_completion(c, self.step_sep), self.tokenizer,
                           self.max_prompt_len, self.max_len, self.step_sep)
            for p, c in zip(prompts, completions)]
    tokens = np.stack([r[0] for r in rows])
    seg = np.stack([r[1] for r in rows])
    pad = (-B) % self.batch_size
    if pad:
      tokens = np.concatenate([tokens, np.repeat(tokens[:1], pad, 0)])
      seg = np.concatenate([seg, np.repeat(seg[:1], pad, 0)])
    fn = _logits_fn(self.model_config)
    logits = np.concatenate([np.asarray(fn(self.params, tokens[i:i + self.batch_size],
                                           seg[i:i + self.batch_size]))
                             for i in range(0, B + pad, self.batch_size)])[:B]
    out = [1.0 / (1.0 + np.exp(-logits[b, r[2]].astype(np.float64))) for b, r in
           enumerate(rows)]
    _LAST[self.workdir] = (key, out)
    return out

  def __call__(self, prompts: Sequence, completions: Sequence[str],
               metadata: Metadata) -> np.ndarray:
    batch_size(self.name, prompts, completions, metadata)
    probs = self.step_probs(prompts, completions, metadata)
    if self.stat:
      return np.asarray([step_stat(p, self.stat) for p in probs], np.float32)
    return np.asarray([aggregate(p, self.aggregate, self.empty_reward) for p in probs],
                      np.float32)

  def __repr__(self):
    return (f"PRMReward({self.workdir!r}, aggregate={self.aggregate!r}"
            + (f", stat={self.stat!r}" if self.stat else "") + ")")


def prm_step_stats(fn: PRMReward, prompts, completions, metadata=None) -> dict[str, float]:
  """Batch means of every per-step statistic (and the aggregate) of `fn`."""
  probs = fn.step_probs(prompts, completions, metadata)
  out = {s: float(np.mean([step_stat(p, s) for p in probs])) for s in STATS if s}
  out[fn.aggregate] = float(np.mean([aggregate(p, fn.aggregate, fn.empty_reward)
                                     for p in probs]))
  return out
