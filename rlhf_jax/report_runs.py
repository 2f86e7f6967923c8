"""Runs for the comparison report: every directory holding a `metrics.jsonl`, grouped
(algorithm / sweep cell) with one run per seed, and its metric rows.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

import numpy as np

NAN = float("nan")
_SEED_DIR = re.compile(r"seed[-_]?(\d+)")
_NAME_SEED = re.compile(r"(.+?)[-_]seed[-_]?(\d+)")
_SKIP_DIRS = {"checkpoints", "events", "tfds"}


class ReportError(Exception):
  """A user error; main() prints it as one line `error: ...` and exits 2."""


@dataclass
class Run:
  group: str
  seed: int
  workdir: str
  rows: list = field(default_factory=list)
  finished: bool | None = None  # last step >= config.json num_steps; None when unknown

  @property
  def last_step(self) -> int:
    return max((r["step"] for r in self.rows), default=-1)

  def series(self, metric: str):
    """(steps, values) of the rows logging `metric` as a number, by step."""
    by_step = {r["step"]: float(r[metric]) for r in self.rows
               if isinstance(r.get(metric), (int, float)) and not isinstance(r[metric], bool)}
    steps = sorted(by_step)
    return np.array(steps, dtype=np.int64), np.array([by_step[s] for s in steps], dtype=np.float64)

  def final(self, metric: str) -> float:
    """Value in the last row that logs `metric` (nan if none)."""
    values = self.series(metric)[1]
    return float(values[-1]) if values.size else NAN


# ----------------------------------------------------------------------------- loading

def _read_json(path: str, strict: bool = False) -> dict:
  try:
    with open(path) as f:
      obj = json.load(f)
  except FileNotFoundError:
    return {}
  except (OSError, json.JSONDecodeError) as e:
    if strict:
      raise ReportError(f"cannot read {path}: {e}") from None
    return {}
  return obj if isinstance(obj, dict) else {}


def _number(v):
  """The strings metrics.py writes for non-finite floats ("nan", "inf", "-inf") -> float."""
  if isinstance(v, str) and v.strip().lower() in ("nan", "inf", "-inf", "+inf", "infinity",
                                                  "-infinity"):
    return float(v)
  return v


def read_metrics(path: str) -> list[dict]:
  """Rows of a metrics.jsonl; malformed lines (a run killed mid-write) are skipped."""
  from rlhf_jax.metrics import read_jsonl
  return [{k: _number(v) for k, v in row.items()} for row in read_jsonl(path)
          if isinstance(row.get("step"), int)]


def _group_seed(run_dir: str, root: str, config: dict) -> tuple[str, int]:
  """seed-<k>/ -> (parent relative to root, k); grpo_seed2 -> ("grpo", 2); else (name, config seed)."""
  name = os.path.basename(run_dir)
  if m := _SEED_DIR.fullmatch(name):
    parent = os.path.dirname(run_dir)
    rel = os.path.relpath(parent, root)
    group = os.path.basename(parent) if rel == "." or rel.startswith("..") else rel
    return group.replace(os.sep, "/"), int(m[1])
  if m := _NAME_SEED.fullmatch(name):
    return m[1], int(m[2])
  try:
    return name, int(config.get("seed", 0))
  except (TypeError, ValueError):
    return name, 0


def discover(paths: list[str]) -> list[Run]:
  """Every directory under `paths` (recursively) with a metrics.jsonl, as a Run."""
  runs, seen = [], set()
  for root in paths:
    if not os.path.isdir(root):
      raise ReportError(f"not a directory: {root}")
    root = os.path.abspath(root)
    for d, subdirs, files in os.walk(root):
      subdirs[:] = sorted(s for s in subdirs if s not in _SKIP_DIRS)
      if "metrics.jsonl" not in files or os.path.realpath(d) in seen:
        continue
      seen.add(os.path.realpath(d))
      config = _read_json(os.path.join(d, "config.json"))
      run = Run(*_group_seed(d, root, config), d, read_metrics(os.path.join(d, "metrics.jsonl")))
      if isinstance(config.get("num_steps"), int) and run.rows:
        run.finished = run.last_step >= config["num_steps"]
      runs.append(run)
  return sorted(runs, key=lambda r: (r.group, r.seed, r.workdir))
