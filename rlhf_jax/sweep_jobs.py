"""Running a sweep's jobs: one process per job into its workdir (log.txt, sweep_job.json),
the dependency-aware scheduler, SIGTERM to the children, and sweep.json.

A job that exits with EXIT_PREEMPTED (75: a trainer stopped by SIGTERM after saving a
checkpoint) is "interrupted", not "failed".
"""
from __future__ import annotations

import ctypes
import json
import os
import shlex
import signal
import subprocess
import time

from rlhf_jax import EXIT_PREEMPTED
from rlhf_jax.sweep_spec import Job

_OK, _BLOCKING = ("done", "cached"), ("failed", "skipped", "excluded", "interrupted")


# ------------------------------------------------------------------ job state

def _read_state(job: Job):
  try:
    with open(os.path.join(job.workdir, "sweep_job.json")) as f:
      return json.load(f)
  except (FileNotFoundError, json.JSONDecodeError):
    return None


def _disk_status(job: Job) -> str:
  """done | pending | interrupted (running/failed before) | changed (done, other argv)."""
  state = _read_state(job)
  if state is None:
    return "pending"
  if state.get("status") == "done":
    return "done" if state.get("argv") == job.argv else "changed"
  return "interrupted"


def _write_json(path, obj):
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, default=str)
  os.replace(tmp, path)


def _write_sweep_json(sweep, jobs, sweep_dir, status):
  cells = []
  for c in sweep["cells"]:
    entry = {k: c[k] for k in ("name", "config", "command") if c[k] is not None}
    entry.update(overrides=c["overrides"], depends=c["depends"], seeds=c["seeds"], jobs=[
        dict(seed=j.seed, workdir=os.path.relpath(j.workdir, sweep_dir), argv=j.argv,
             status=status.get(j.name)) for j in jobs if j.cell == c["name"]])
    cells.append(entry)
  _write_json(os.path.join(sweep_dir, "sweep.json"), dict(
      name=sweep["name"], definition=sweep["definition"], seeds=sweep["seeds"], cells=cells,
      report=sweep["report"]))


# ------------------------------------------------------------------ running

def _die_with_parent():
  """A preexec_fn giving the child SIGTERM when the sweep dies (Linux), else None."""
  try:
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork
  except (OSError, AttributeError):
    return None
  return lambda: prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


class _NotStarted:
  """Stands in for the Popen of a program that could not be started."""
  pid, returncode = None, 127

  def poll(self):
    return self.returncode


def _start(job: Job):
  state = _read_state(job) or {}
  os.makedirs(job.workdir, exist_ok=True)
  attempt = state.get("attempts", 0) + 1
  state = dict(argv=job.argv, status="running", attempts=attempt,
               started=time.strftime("%Y-%m-%dT%H:%M:%S"), finished=None,
               wall_s=state.get("wall_s", 0.0), rc=None)
  _write_json(os.path.join(job.workdir, "sweep_job.json"), state)
  log = open(os.path.join(job.workdir, "log.txt"), "a")
  log.write(f"===== rlhf-jax sweep: attempt {attempt} at {state['started']}: "
            f"{shlex.join(job.argv)}\n")
  log.flush()
  try:
    proc = subprocess.Popen(job.argv, stdout=log, stderr=subprocess.STDOUT, cwd=os.getcwd(),
                            env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            start_new_session=True, preexec_fn=_die_with_parent())
  except OSError as e:  # e.g. the command's program does not exist
    log.write(f"cannot start: {e}\n")
    proc = _NotStarted()
  return dict(proc=proc, log=log, t0=time.time(), state=state)


def _finish(job: Job, run: dict, interrupted: bool) -> str:
  run["log"].close()
  rc, state = run["proc"].returncode, run["state"]
  interrupted = interrupted or rc == EXIT_PREEMPTED  # preempted: checkpointed, resumable
  status = "interrupted" if interrupted else ("done" if rc == 0 else "failed")
  state.update(status="running" if interrupted else status, rc=rc, interrupted=interrupted,
               finished=time.strftime("%Y-%m-%dT%H:%M:%S"),
               wall_s=round(state["wall_s"] + time.time() - run["t0"], 3))
  _write_json(os.path.join(job.workdir, "sweep_job.json"), state)
  return status


def _log_tail(job: Job, n: int = 15) -> str:
  with open(os.path.join(job.workdir, "log.txt"), "rb") as f:
    f.seek(max(0, os.fstat(f.fileno()).st_size - 16384))
    return "\n".join(f.read().decode(errors="replace").splitlines()[-n:])


def _schedule(jobs, todo, status, parallel, stop):
  """Run `todo` jobs when their dependencies are done, `parallel` at a time; fills status."""
  from tqdm import tqdm
  tqdm.monitor_interval = 0  # no monitor thread: preexec_fn is unsafe with threads
  by_cell = {}
  for j in jobs:
    by_cell.setdefault(j.cell, []).append(j)
  total, running, n = len(todo), {}, 0
  bar = tqdm(total=total, unit="job", dynamic_ncols=True)

  def report(job, what):
    nonlocal n
    n += 1
    bar.update(1)
    bar.write(f"[{n}/{total}] {what}")

  try:
    while (todo or running) and not stop:
      for job in list(todo):
        deps = [d for c in job.depends for d in by_cell[c]]
        blocker = next((d for d in deps if status[d.name] in _BLOCKING), None)
        if blocker is not None:
          todo.remove(job)
          status[job.name] = "skipped"
          report(job, f"skipped {job.name} ({blocker.name} {status[blocker.name]})")
        elif len(running) < parallel and all(status[d.name] in _OK for d in deps):
          todo.remove(job)
          status[job.name] = "running"
          running[job.name] = (job, _start(job))
      for name, (job, run) in list(running.items()):
        if run["proc"].poll() is not None:
          del running[name]
          status[name] = _finish(job, run, interrupted=False)
          report(job, f"{status[name]} {name} in {time.time() - run['t0']:.0f} s"
                 + (f" (exit {EXIT_PREEMPTED}: preempted; re-run to resume)"
                    if status[name] == "interrupted" else ""))
          if status[name] == "failed":
            bar.write(f"--- last lines of {job.workdir}/log.txt:\n{_log_tail(job)}\n---")
      time.sleep(0.05)
  finally:  # interrupted (or a bug): stop the children; trainers checkpoint on SIGTERM
    live = {name for name, (job, run) in running.items() if run["proc"].poll() is None}
    for name in live:
      _signal_group(running[name][1]["proc"], signal.SIGTERM)
    for name, (job, run) in running.items():
      while run["proc"].poll() is None:
        if len(stop) > 1:  # a second signal: do not wait any longer
          _signal_group(run["proc"], signal.SIGKILL)
        time.sleep(0.05)
      status[name] = _finish(job, run, interrupted=name in live)
    bar.close()


def _signal_group(proc, sig):
  try:
    os.killpg(proc.pid, sig)
  except (ProcessLookupError, PermissionError):
    pass
