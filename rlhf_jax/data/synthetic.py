"""Bundled synthetic tasks: small, learnable, generated deterministically from a seed.

They let the whole pipeline run end to end on a laptop CPU in minutes, with a
known-learnable target (so a falling eval loss means the plumbing works).
"""
from __future__ import annotations

import json
import os
import string

import numpy as np

TASKS = ("reverse", "sort", "add")


def make_example(task: str, rng: np.random.Generator, min_len: int = 3, max_len: int = 8) -> dict:
  """One {"prompt", "completion"} pair.

  reverse: "reverse: qwxe" -> "exwq";  sort: "sort: qwxe" -> "eqwx";
  add: "add: 47+158" -> "205".
  """
  if task in ("reverse", "sort"):
    n = int(rng.integers(min_len, max_len + 1))
    s = "".join(rng.choice(list(string.ascii_lowercase[:12]), size=n))
    out = s[::-1] if task == "reverse" else "".join(sorted(s))
    return {"prompt": f"{task}: {s}", "completion": out}
  if task == "add":
    a, b = (int(x) for x in rng.integers(0, 10 ** (max_len // 2), size=2))
    return {"prompt": f"add: {a}+{b}", "completion": str(a + b)}
  raise ValueError(f"unknown synthetic task {task!r}; expected one of {TASKS}")


def write_task(path: str, task: str, num_examples: int, seed: int, **kwargs) -> str:
  """Write `num_examples` rows of `task` as JSONL to `path` (atomic)."""
  rng = np.random.default_rng(seed)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    for _ in range(num_examples):
      f.write(json.dumps(make_example(task, rng, **kwargs)) + "\n")
  os.replace(tmp, path)
  return path
