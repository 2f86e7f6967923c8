"""Rule-based shaping rewards on completion length and termination.

All read per-row metadata (see `rlhf_jax.rewards.base`): L = metadata
["completion_lengths"] (tokens generated, EOS included when generated),
metadata["finished"] (the completion ended with EOS).

  length_penalty  r = -coef * max(0, L - target)                 (per token beyond target)
  missing_eos     r = penalty if not finished else 0             (penalty < 0, e.g. -1)
  overlong        DAPO's soft overlong punishment (Yu et al. 2025, eq. 13):
                  r = 0                                   if L <= max_len - cache_len
                      (max_len - cache_len - L) / cache_len  if max_len - cache_len < L <= max_len
                      -1                                  if L > max_len
                  times `scale` (default 1). max_len: the generation limit; cache_len:
                  the length of the soft-punishment interval before it. Computed by
                  `rlhf_jax.losses.grpo.overlong_penalty` (one implementation).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from rlhf_jax.rewards.base import Metadata, batch_size, column

LENGTHS, FINISHED = "completion_lengths", "finished"


class LengthPenalty:
  """-coef per completion token beyond `target` (0 at or below it)."""

  name = "length_penalty"

  def __init__(self, target: int, coef: float = 0.01):
    if target < 0 or coef < 0:
      raise ValueError(f"length_penalty: target={target} and coef={coef} must be >= 0")
    self.target, self.coef = int(target), float(coef)

  def __call__(self, prompts: Sequence, completions: Sequence[str],
               metadata: Metadata) -> np.ndarray:
    batch_size(self.name, prompts, completions, metadata, (LENGTHS,))
    L = column(self.name, metadata, LENGTHS, np.float64)
    return (-self.coef * np.maximum(0.0, L - self.target)).astype(np.float32)


class MissingEosPenalty:
  """`penalty` for completions that did not end with EOS (cut at the length limit)."""

  name = "missing_eos"

  def __init__(self, penalty: float = -1.0):
    self.penalty = float(penalty)

  def __call__(self, prompts: Sequence, completions: Sequence[str],
               metadata: Metadata) -> np.ndarray:
    batch_size(self.name, prompts, completions, metadata, (FINISHED,))
    finished = column(self.name, metadata, FINISHED, bool)
    return np.where(finished, 0.0, self.penalty).astype(np.float32)


class OverlongPenalty:
  """DAPO soft overlong punishment (see the module docstring)."""

  name = "overlong"

  def __init__(self, max_len: int, cache_len: int, scale: float = 1.0):
    if not 0 < cache_len <= max_len:
      raise ValueError(f"overlong: need 0 < cache_len <= max_len, got cache_len={cache_len}, "
                       f"max_len={max_len}")
    self.max_len, self.cache_len, self.scale = int(max_len), int(cache_len), float(scale)

  def __call__(self, prompts: Sequence, completions: Sequence[str],
               metadata: Metadata) -> np.ndarray:
    from rlhf_jax.losses.grpo import overlong_penalty  # the one implementation of the formula
    batch_size(self.name, prompts, completions, metadata, (LENGTHS,))
    L = column(self.name, metadata, LENGTHS, np.float32)
    r = np.asarray(overlong_penalty(L, self.max_len, self.cache_len), np.float32)
    return (np.float32(self.scale) * r).astype(np.float32)
