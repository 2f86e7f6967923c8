"""Run outputs: metrics.jsonl, TensorBoard events (tensorboardX, no TensorFlow), optional
Weights & Biases, samples.jsonl, and a terminal progress bar with ETA (tqdm).

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
import secrets
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


class JsonlSink:
  """metrics.jsonl: one JSON object per logged step (the run's record)."""

  def __init__(self, path: str):
    self.path = path

  def write(self, step: int, row: dict) -> None:
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")

  def close(self) -> None:
    pass


class TensorBoardSink:
  """TensorBoard event files (tensorboardX) under WORKDIR/events; numeric values only."""

  def __init__(self, logdir: str, purge_step: int = 0):
    self._tb = SummaryWriter(logdir, purge_step=purge_step)

  def write(self, step: int, row: dict) -> None:
    for k, v in row.items():
      if k != "step" and isinstance(v, (int, float)):
        self._tb.add_scalar(k, v, step)

  def close(self) -> None:
    self._tb.flush()
    self._tb.close()


WANDB_ID_FILE = "wandb_run_id"


class WandbSink:
  """Weights & Biases (optional: `pip install 'rlhf_jax[wandb]'`): numeric values of every
  row, logged at their step. One W&B run per workdir: its id is kept in
  WORKDIR/wandb_run_id and a resumed run continues it (W&B keeps the first value of a
  step that a killed run had already logged; metrics.jsonl stays the record).
  mode: "online", "offline" (files under WORKDIR/wandb, `wandb sync` later) or
  "disabled"; the WANDB_* environment variables apply as usual."""

  def __init__(self, workdir: str, project: str, entity: str = "", name: str = "",
               mode: str = "online", config: dict | None = None):
    try:
      import wandb
    except ImportError:
      raise RuntimeError(f"logging.wandb_project={project!r} needs the wandb package: pip "
                         f"install 'rlhf_jax[wandb]' (or set logging.wandb_project='')") from None
    id_path = os.path.join(workdir, WANDB_ID_FILE)
    if os.path.exists(id_path):
      with open(id_path) as f:
        run_id = f.read().strip()
    else:
      run_id = secrets.token_hex(6)  # W&B run ids: lowercase letters and digits
      with open(id_path, "w") as f:
        f.write(run_id + "\n")
    self.run_id = run_id
    self._run = wandb.init(project=project, entity=entity or None,
                           name=name or os.path.basename(os.path.abspath(workdir)), id=run_id,
                           resume="allow", dir=workdir, mode=mode, config=config)

  def write(self, step: int, row: dict) -> None:
    self._run.log({k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))},
                  step=step)

  def close(self) -> None:
    self._run.finish()


def config_sinks(config, workdir: str) -> list:
  """The optional sinks a run's config asks for (config.logging): W&B when
  logging.wandb_project is set."""
  lg = config.get("logging")
  if lg is None or not lg.get("wandb_project"):
    return []
  return [WandbSink(workdir, lg.wandb_project, lg.get("wandb_entity", ""),
                    lg.get("wandb_name", ""), lg.get("wandb_mode", "online"),
                    config=config.to_dict())]


class MetricsWriter:
  """Writes each logged row to its sinks: metrics.jsonl and TensorBoard always, plus
  `extra_sinks` (e.g. `WandbSink`, see `config_sinks`); trims samples.jsonl on resume.
  A sink is any object with write(step, row) and close()."""

  def __init__(self, workdir: str, start_step: int = 0, enabled: bool = True,
               extra_sinks=()):
    """enabled=False (processes other than 0 in a multi-host run): write nothing."""
    self.workdir, self.enabled = workdir, enabled
    self.metrics_path = os.path.join(workdir, "metrics.jsonl")
    self.samples_path = os.path.join(workdir, "samples.jsonl")
    self.prior_elapsed, self.sinks = 0.0, []
    if not enabled:
      return
    for p in (self.metrics_path, self.samples_path):  # rows after the resumed checkpoint
      _truncate_jsonl(p, start_step if start_step else -1)  # (from scratch: all of them)
    self.prior_elapsed = _last_value(self.metrics_path, "elapsed_s") if start_step else 0.0
    self.sinks = [JsonlSink(self.metrics_path),
                  TensorBoardSink(os.path.join(workdir, "events"), purge_step=start_step),
                  *extra_sinks]

  def write(self, step: int, metrics: dict) -> dict:
    row = {"step": int(step)}
    row.update({k: _to_python(v) for k, v in metrics.items()})
    if not self.enabled:
      return row
    for sink in self.sinks:
      sink.write(step, row)
    return row

  def close(self):
    for sink in self.sinks:
      sink.close()


class Progress:
  """tqdm bar over training steps (ETA from the steps done in this process), or over any
  other long loop's `unit`s (leave=False: the bar goes when closed, e.g. an eval's bar
  inside the training bar)."""

  def __init__(self, start: int, total: int, desc: str = "train", enabled: bool = True,
               unit: str = "step", leave: bool = True):
    self._bar = tqdm.tqdm(total=total, initial=start, desc=desc, unit=unit,
                          dynamic_ncols=True, smoothing=0.1, disable=not enabled, leave=leave)

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


def peak_memory(devices=None) -> dict[str, float]:
  """This process's peak memory, bytes: host_rss (the largest resident set so far,
  getrusage's ru_maxrss: KiB on Linux, bytes on macOS) and, where the backend reports it
  (GPU, TPU; not XLA:CPU, whose arrays live in host_rss), device_peak: the largest
  peak_bytes_in_use over `devices` (default: this process's local devices)."""
  import resource
  import sys
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  out = {"host_rss": float(rss if sys.platform == "darwin" else rss * 1024)}
  if devices is None:
    import jax
    devices = jax.local_devices()
  peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in devices]
  peaks = [p for p in peaks if p is not None]
  if peaks:
    out["device_peak"] = float(max(peaks))
  return out


def peak_memory_line(peaks: dict[str, float]) -> str:
  """One line for a run's summary from `peak_memory()`, in GB (1e9 bytes)."""
  line = f"peak memory: host RSS {peaks['host_rss'] / 1e9:.2f} GB"
  if "device_peak" in peaks:
    line += f", device {peaks['device_peak'] / 1e9:.2f} GB (largest peak_bytes_in_use)"
  return line
