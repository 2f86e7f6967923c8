"""The reward-function interface shared by every reward in `rlhf_jax.rewards`.

A reward function is a callable with a `name`:

    fn(prompts: list[str | messages], completions: list[str], metadata: dict[str, list])
        -> np.ndarray float32 [B]

prompts: the prompt of each row (a string is one user turn; a list of
{"role", "content"} messages is taken as is). completions: the decoded
completion text (special tokens removed). metadata: per-row lists of length
B; the keys the trainers fill in are

    answer              str   reference final answer ("" when none)  (prompt data)
    completion_lengths  int   completion tokens generated, EOS included when generated
    finished            bool  the completion ended with EOS (not cut at the length limit)

and any other per-row field a reward needs (e.g. "solution", "source").
Rewards are pure functions of their inputs (no hidden state changes between
calls); a reward that needs a key names it in its error.
"""
from __future__ import annotations

from typing import Any, Protocol, Sequence

import numpy as np

Metadata = dict[str, Sequence[Any]]


class RewardFn(Protocol):
  name: str

  def __call__(self, prompts: Sequence, completions: Sequence[str],
               metadata: Metadata) -> np.ndarray:
    ...


class RewardError(ValueError):
  """Reward inputs that do not fit: the message names the reward and what was expected."""


def batch_size(name: str, prompts: Sequence, completions: Sequence[str],
               metadata: Metadata | None, required: Sequence[str] = ()) -> int:
  """B after checking that prompts, completions and every metadata list have B rows
  and that the `required` metadata keys are present."""
  B = len(completions)
  if len(prompts) != B:
    raise RewardError(f"reward {name!r}: {len(prompts)} prompts but {B} completions")
  metadata = metadata or {}
  for key in required:
    if key not in metadata:
      raise RewardError(f"reward {name!r} needs metadata[{key!r}] (one value per row); "
                        f"metadata has {sorted(metadata)}")
  for key, values in metadata.items():
    if len(values) != B:
      raise RewardError(f"reward {name!r}: metadata[{key!r}] has {len(values)} rows, "
                        f"expected {B}")
  return B


def column(name: str, metadata: Metadata, key: str, dtype) -> np.ndarray:
  """metadata[key] as a 1-D numpy array of `dtype` (clear error when absent)."""
  if key not in (metadata or {}):
    raise RewardError(f"reward {name!r} needs metadata[{key!r}] (one value per row); "
                      f"metadata has {sorted(metadata or {})}")
  return np.asarray(metadata[key], dtype=dtype).reshape(-1)
