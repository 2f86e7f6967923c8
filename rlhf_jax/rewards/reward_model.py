"""A trained reward model (`rlhf_jax.trainers.reward_model`) as a reward function.

    r = (score(prompt, completion) - mean) / std          (mean 0, std 1 by default)

score = the RM's scalar at the last real token of the sequence, tokenized the
way the RM was trained (`rlhf_jax.data.preferences.tokenize_preference`):

    tokens = prompt_ids + completion_ids + [EOS]    right-padded to T = max_prompt_len
                                                     + max_completion_len

prompt_ids = `encode_prompt` (the RM tokenizer's chat template with the
generation prompt) LEFT-truncated to max_prompt_len; the completion (+ EOS)
RIGHT-truncated to max_completion_len. The lengths default to the ones the RM
was trained with (the workdir's config.json, data section). The completion is
re-tokenized from text with the RM's own tokenizer, so the policy may use
another tokenizer.

EOS: the RM only ever saw replies ending in EOS (unless truncated), so by
default (`add_eos="always"`) EOS is appended to every completion, including
ones the policy did not finish -- penalise those with the `missing_eos` rule.
`add_eos="if_finished"` appends it only where metadata["finished"] is true
(an unfinished reply is then scored at its last token).

Scoring runs in jitted micro-batches of a fixed `batch_size` x T (the last
batch padded with copies of a real row whose scores are dropped), so the
function compiles once and never again whatever B is (`compilations` counts
traces; the jitted function is shared by instances with the same model config).

Normalisation (optional): `normalize=True` uses the mean / std of the RM's
scores on its held-out pairs (both replies), logged by the RM trainer as
`eval_score_mean` / `eval_score_std` at its last eval -- with on-policy pairs
that is the SFT policy's distribution; or fixed `mean` / `std` (e.g. the RM's scores on
reference completions, as Ziegler et al. 2019 and Ouyang et al. 2022
normalise their reward models so the reference policy scores mean 0, std 1);
`calibrate(prompts, completions, metadata)` measures and sets them. With
`whiten=True` each call's rewards are additionally standardised over the
batch ((r - mean_B) / (std_B + 1e-6)); GRPO's group normalisation makes this
unnecessary there.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Sequence

import numpy as np

from rlhf_jax.data.preferences import truncate_prompt
from rlhf_jax.data.sft import encode_prompt
from rlhf_jax.rewards.base import Metadata, RewardError, batch_size, column

ADD_EOS = ("always", "if_finished")


def _messages(prompt) -> list[dict]:
  return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def tokenize_for_scoring(prompt, completion: str, tokenizer, max_prompt_len: int,
                         max_completion_len: int, add_eos: bool = True
                         ) -> tuple[np.ndarray, np.ndarray]:
  """(tokens_T, segment_ids_T) int32, T = max_prompt_len + max_completion_len: the
  'chosen' side of `tokenize_preference` for (prompt, completion)."""
  T = max_prompt_len + max_completion_len
  prompt_ids = truncate_prompt(encode_prompt(tokenizer, _messages(prompt)), max_prompt_len,
                               tokenizer.bos_id)
  completion_ids = tokenizer.encode(completion) + ([tokenizer.eos_id] if add_eos else [])
  ids = prompt_ids + completion_ids[:max_completion_len]
  tokens = np.full((T,), tokenizer.pad_id, np.int32)
  seg = np.zeros((T,), np.int32)
  tokens[:len(ids)] = ids
  seg[:len(ids)] = 1
  return tokens, seg


@functools.lru_cache(maxsize=None)
def _scoring_fn(model_config):
  """(jit(params, tokens_BT, segment_ids_BT) -> scores_B, [trace count]) for one model config;
  cached so instances with the same config share compilations."""
  import jax

  from rlhf_jax.models.heads import ScalarModel, last_token_score
  model = ScalarModel(model_config)
  traces = [0]

  def score(params, tokens_BT, seg_BT):
    traces[0] += 1  # runs only while tracing
    return last_token_score(model.apply({"params": params}, tokens_BT, seg_BT), seg_BT)

  return jax.jit(score), traces


class RewardModelReward:
  """Reward = a trained reward model's score (see the module docstring).

  workdir: a reward-model run directory (model_config.json, tokenizer,
  checkpoints/). max_prompt_len / max_completion_len: default from the
  workdir's config.json. batch_size: rows per jitted forward pass. dtype:
  override the compute dtype (e.g. "bfloat16" on accelerators).
  """

  name = "reward_model"

  def __init__(self, workdir: str, max_prompt_len: int | None = None,
               max_completion_len: int | None = None, batch_size: int = 32,
               add_eos: str = "always", mean: float = 0.0, std: float = 1.0,
               whiten: bool = False, dtype: str | None = None, normalize: bool = False):
    import jax

    from rlhf_jax.trainers.reward_model import load_reward_model
    if add_eos not in ADD_EOS:
      raise ValueError(f"reward_model: add_eos={add_eos!r}: expected one of {ADD_EOS}")
    if batch_size < 1 or not std > 0:
      raise ValueError(f"reward_model: batch_size={batch_size} must be >= 1 and std={std} > 0")
    if not os.path.isdir(workdir):
      raise RewardError(f"reward_model: workdir {workdir} does not exist")
    if max_prompt_len is None or max_completion_len is None:
      trained = self._trained_lengths(workdir)
      max_prompt_len = trained[0] if max_prompt_len is None else max_prompt_len
      max_completion_len = trained[1] if max_completion_len is None else max_completion_len
    self.workdir = workdir
    self.max_prompt_len, self.max_completion_len = int(max_prompt_len), int(max_completion_len)
    self.batch_size, self.add_eos, self.whiten = int(batch_size), add_eos, bool(whiten)
    self.mean, self.std = float(mean), float(std)
    if normalize:
      self.mean, self.std = self._eval_score_stats(workdir)
    self.model_config, params, self.tokenizer = load_reward_model(workdir)
    if dtype is not None:
      self.model_config = dataclasses.replace(self.model_config, dtype=dtype)
    self.params = jax.device_put(params)
    self._score, self._traces = _scoring_fn(self.model_config)

  @property
  def compilations(self) -> int:
    """Traces of the jitted scoring function (shared by every instance with this model
    config): one per distinct [batch_size, T] shape."""
    return self._traces[0]

  @staticmethod
  def _eval_score_stats(workdir: str) -> tuple[float, float]:
    """(eval_score_mean, eval_score_std) of the RM run's last eval row."""
    from rlhf_jax.metrics import read_jsonl
    path = os.path.join(workdir, "metrics.jsonl")
    stats = None
    for row in read_jsonl(path):
      if "eval_score_mean" in row and "eval_score_std" in row:
        stats = float(row["eval_score_mean"]), max(float(row["eval_score_std"]), 1e-6)
    if stats is None:
      raise RewardError(f"reward_model: normalize=True needs eval_score_mean / eval_score_std "
                        f"in {path} (train the RM with held-out pairs, data.eval_path)")
    return stats

  @staticmethod
  def _trained_lengths(workdir: str) -> tuple[int, int]:
    path = os.path.join(workdir, "config.json")
    try:
      with open(path) as f:
        data = json.load(f)["data"]
      return int(data["max_prompt_len"]), int(data["max_completion_len"])
    except (OSError, KeyError, TypeError, ValueError):
      raise RewardError(f"reward_model: cannot read data.max_prompt_len / max_completion_len "
                        f"from {path}; pass max_prompt_len and max_completion_len") from None

  def tokenize(self, prompts: Sequence, completions: Sequence[str],
               metadata: Metadata | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(tokens_BT, segment_ids_BT) the RM scores; prompts may be overridden by
    metadata["prompt_messages"]."""
    metadata = metadata or {}
    prompts = metadata.get("prompt_messages", prompts)
    if self.add_eos == "always":
      eos = np.ones((len(completions),), bool)
    else:
      eos = column(self.name, metadata, "finished", bool)
    rows = [tokenize_for_scoring(p, c, self.tokenizer, self.max_prompt_len,
                                 self.max_completion_len, bool(e))
            for p, c, e in zip(prompts, completions, eos)]
    return np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])

  def raw_scores(self, prompts: Sequence, completions: Sequence[str],
                 metadata: Metadata | None = None) -> np.ndarray:
    """The RM's scores float32 [B], before normalisation."""
    B = batch_size(self.name, prompts, completions, metadata)
    if B == 0:
      return np.zeros((0,), np.float32)
    tokens, seg = self.tokenize(prompts, completions, metadata)
    pad = (-B) % self.batch_size
    if pad:
      tokens = np.concatenate([tokens, np.repeat(tokens[:1], pad, 0)])
      seg = np.concatenate([seg, np.repeat(seg[:1], pad, 0)])
    out = [np.asarray(self._score(self.params, tokens[i:i + self.batch_size],
                                  seg[i:i + self.batch_size]))
           for i in range(0, B + pad, self.batch_size)]
    return np.concatenate(out)[:B].astype(np.float32)

  def calibrate(self, prompts: Sequence, completions: Sequence[str],
                metadata: Metadata | None = None) -> tuple[float, float]:
    """Set mean/std to the raw scores' mean and std on these (reference) completions."""
    r = self.raw_scores(prompts, completions, metadata).astype(np.float64)
    self.mean, self.std = float(r.mean()), float(max(r.std(), 1e-6))
    return self.mean, self.std

  def __call__(self, prompts: Sequence, completions: Sequence[str],
               metadata: Metadata) -> np.ndarray:
    r = (self.raw_scores(prompts, completions, metadata).astype(np.float64) - self.mean) / self.std
    if self.whiten and len(r) > 1:
      r = (r - r.mean()) / (r.std() + 1e-6)
    return r.astype(np.float32)

  def __repr__(self):
    return (f"RewardModelReward({self.workdir!r}, T={self.max_prompt_len}+"
            f"{self.max_completion_len}, batch_size={self.batch_size}, mean={self.mean}, "
            f"std={self.std})")
