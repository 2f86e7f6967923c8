"""Weighted sums of named reward functions.

    total_B = sum_k weight_k * r_k,B

`CombinedReward(prompts, completions, metadata)` returns `(total_B, parts)`:
the weighted total and every component's UNWEIGHTED values by label, which
trainers log as `reward/<label>` (`reward_metrics`); `total(...)` returns the
total alone (the plain reward-function interface). A combined reward can be a
component of another (its total is used).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from rlhf_jax.rewards.base import Metadata, RewardError, RewardFn, batch_size


class CombinedReward:
  """sum_k weight_k * fn_k(prompts, completions, metadata).

  components: [(label, fn, weight)] with unique labels (the names logged).
  """

  name = "combined"

  def __init__(self, components: Sequence[tuple[str, RewardFn, float]]):
    components = [(str(label), fn, float(w)) for label, fn, w in components]
    if not components:
      raise ValueError("combined reward: no components")
    labels = [c[0] for c in components]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
      raise ValueError(f"combined reward: duplicate component names {dup}; give each a "
                       f"distinct 'label'")
    self.components = components

  @property
  def labels(self) -> list[str]:
    return [c[0] for c in self.components]

  def score(self, prompts: Sequence, completions: Sequence[str], metadata: Metadata
            ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(total float32 [B], {label: unweighted component float32 [B]})."""
    B = batch_size(self.name, prompts, completions, metadata)
    total = np.zeros((B,), np.float64)
    parts = {}
    for label, fn, w in self.components:
      r = fn(prompts, completions, metadata)
      r = np.asarray(r[0] if isinstance(r, tuple) else r)  # a nested CombinedReward
      if r.shape != (B,):
        raise RewardError(f"reward {label!r} returned shape {r.shape}, expected ({B},)")
      if not np.all(np.isfinite(r)):
        raise RewardError(f"reward {label!r} returned non-finite values at rows "
                          f"{np.flatnonzero(~np.isfinite(r))[:10].tolist()}")
      parts[label] = r.astype(np.float32)
      total += w * r.astype(np.float64)
    return total.astype(np.float32), parts

  def __call__(self, prompts: Sequence, completions: Sequence[str], metadata: Metadata
               ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(total float32 [B], {label: unweighted component float32 [B]}); see `score`."""
    return self.score(prompts, completions, metadata)

  def total(self, prompts: Sequence, completions: Sequence[str],
            metadata: Metadata) -> np.ndarray:
    """The weighted total alone, float32 [B]."""
    return self.score(prompts, completions, metadata)[0]

  def __repr__(self):
    return "CombinedReward(" + ", ".join(f"{w:g}*{label}" for label, _, w in
                                         self.components) + ")"


def combine(*components) -> CombinedReward:
  """combine((fn, weight), ...) or combine((label, fn, weight), ...); label defaults to fn.name."""
  out = []
  for c in components:
    if len(c) == 2:
      fn, w = c
      out.append((fn.name, fn, w))
    else:
      out.append(tuple(c))
  return CombinedReward(out)


def reward_metrics(total: np.ndarray, parts: dict[str, np.ndarray],
                   prefix: str = "reward") -> dict[str, float]:
  """{"reward/total": mean, "reward/<label>": mean, ...} (means over the batch)."""
  out = {f"{prefix}/total": float(np.mean(total))}
  out.update({f"{prefix}/{k}": float(np.mean(v)) for k, v in parts.items()})
  return out
