"""Run outputs: metrics.jsonl, TensorBoard events (tensorboardX, no TensorFlow),
samples.jsonl, and a terminal progress bar with ETA (tqdm).

metrics.jsonl holds one JSON object per logged step (`step` first). When a run
resumes from step S, lines with step > S (logged after the checkpoint the run
resumed from) are dropped, so the file reads like one uninterrupted run; a run
that starts again from scratch (killed before its first checkpoint) drops them all,
its step-0 evaluation row included.
"""
from __future__ import annotations

import json
import math
import os
import time

import numpy as np
import tqdm
from tensorboardX import SummaryWriter


def _to_python(v):
  v = np.asarray(v)
  if v.size != 1:
    return v.tolist()
  v = v.item()
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)
  return v


def _truncate_jsonl(path: str, max_step: int) -> None:
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = f.readlines()
  kept = []
  for line in lines:
    try:
      if json.loads(line).get("step", 0) <= max_step:
        kept.append(line)
    except json.JSONDecodeError:
      continue  # a line cut by a kill mid-write
  if len(kept) != len(lines):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
      f.writelines(kept)
    os.replace(tmp, path)


def read_jsonl(path: str) -> list[dict]:
  """The JSON-object rows of a metrics/samples JSONL file; malformed lines (a run killed
  mid-write) are skipped; [] when the file does not exist."""
  rows = []
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        try:
          row = json.loads(line)
        except json.JSONDecodeError:
          continue
        if isinstance(row, dict):
          rows.append(row)
  return rows


def _last_value(path: str, key: str) -> float:
  """The last row's `key` in a JSONL file (0.0 when absent)."""
  value = 0.0
  for row in read_jsonl(path):
    try:
      value = float(row.get(key, value))
    except (TypeError, ValueError):
      continue
  return value


def append_jsonl(path: str, step: int, rows: list[dict]) -> None:
  """Append rows (e.g. samples) tagged with `step` to a JSONL file."""
  with open(path, "a") as f:
    for r in rows:
      f.write(json.dumps({"step": int(step), **r}) + "\n")


class MetricsWriter:
  """Writes scalars to metrics.jsonl and TensorBoard (and trims samples.jsonl on resume)."""

  def __init__(self, workdir: str, start_step: int = 0, enabled: bool = True):
    """enabled=False (processes other than 0 in a multi-host run): write nothing."""
    self.workdir, self.enabled = workdir, enabled
    self.metrics_path = os.path.join(workdir, "metrics.jsonl")
    self.samples_path = os.path.join(workdir, "samples.jsonl")
    self.prior_elapsed, self._tb = 0.0, None
    if not enabled:
      return
    for p in (self.metrics_path, self.samples_path):  # rows after the resumed checkpoint
      _truncate_jsonl(p, start_step if start_step else -1)  # (from scratch: all of them)
    self.prior_elapsed = _last_value(self.metrics_path, "elapsed_s") if start_step else 0.0
    self._tb = SummaryWriter(os.path.join(workdir, "events"), purge_step=start_step)

  def write(self, step: int, metrics: dict) -> dict:
    row = {"step": int(step)}
    row.update({k: _to_python(v) for k, v in metrics.items()})
    if not self.enabled:
      return row
    with open(self.metrics_path, "a") as f:
      f.write(json.dumps(row) + "\n")
    for k, v in row.items():
      if k != "step" and isinstance(v, (int, float)):
        self._tb.add_scalar(k, v, step)
    return row

  def close(self):
    if self._tb is not None:
      self._tb.flush()
      self._tb.close()


class Progress:
  """tqdm bar over training steps (ETA from the steps done in this process)."""

  def __init__(self, start: int, total: int, desc: str = "train", enabled: bool = True):
    self._bar = tqdm.tqdm(total=total, initial=start, desc=desc, unit="step",
                          dynamic_ncols=True, smoothing=0.1, disable=not enabled)

  def update(self, n: int = 1, **postfix):
    if postfix:
      self._bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v)
                             for k, v in postfix.items()}, refresh=False)
    self._bar.update(n)

  def write(self, msg: str):
    self._bar.write(msg)

  def close(self):
    self._bar.close()


class Throughput:
  """Tokens per second between two log points."""

  def __init__(self):
    self._t, self._tokens = time.perf_counter(), 0.0

  def add(self, tokens: float):
    self._tokens += float(tokens)

  def restart(self):
    self._t, self._tokens = time.perf_counter(), 0.0

  def rate(self) -> float:
    now = time.perf_counter()
    r = self._tokens / max(now - self._t, 1e-9)
    self._t, self._tokens = now, 0.0
    return r
