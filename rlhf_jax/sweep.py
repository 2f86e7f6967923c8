"""`rlhf-jax sweep SWEEP.py[:preset] --sweep_dir=DIR`: run an experiment's cells x seeds.

SWEEP.py defines `get_sweep(preset)` returning a dict: `name`, `seeds` (default seeds of
every cell), `cells` (each: `name`, `config` "FILE.py:PRESET" + `overrides` {key: value}, or
`command` [argv]; optional `seeds`, `depends`), `grid` (each: `base` cell + `axes` {key:
[values]}, one cell per point of the product, named `<base>-<leaf>=<value>,...`) and
`report` (options copied to sweep.json for `rlhf_jax.report`). Override values and command
args may use `{sweep_dir}`, `{workdir}`, `{seed}`, `{python}` and `{cell:NAME}` (NAME's
workdir for this seed, else for NAME's first seed; implies a dependency on NAME).

Each job (cell, seed) runs in its own process into DIR/<cell>/seed-<k>/ (log.txt,
sweep_job.json); finished jobs are skipped, interrupted ones re-run (trainers resume).
A job that exits with EXIT_PREEMPTED (75: a trainer stopped by SIGTERM after saving a
checkpoint) is "interrupted", not "failed". SIGTERM to the sweep is forwarded to the
running jobs (they checkpoint) and the sweep exits 75 too, as it does when a job was
preempted and nothing failed: a launcher re-queues it and the re-run resumes.
"""
from __future__ import annotations

import argparse
import ctypes
import dataclasses
import fcntl
import fnmatch
import itertools
import json
import os
import re
import runpy
import shlex
import signal
import subprocess
import sys
import threading
import time

from rlhf_jax import EXIT_PREEMPTED

TOP_FIELDS = {"name", "seeds", "cells", "grid", "report"}
CELL_FIELDS = {"name", "config", "command", "overrides", "seeds", "depends"}
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.,=+-]*$")
_PLACEHOLDER = re.compile(r"\{(sweep_dir|workdir|seed|python)\}|\{cell:([^{}]*)\}")
_OK, _BLOCKING = ("done", "cached"), ("failed", "skipped", "excluded", "interrupted")


class SweepError(Exception):
  """A bad sweep definition or command line; the message names the cell/key/file."""


@dataclasses.dataclass
class Job:
  cell: str
  seed: int
  workdir: str          # absolute
  argv: list
  depends: tuple        # names of the cells whose jobs must be done first

  @property
  def name(self) -> str:
    return f"{self.cell}/seed-{self.seed}"


# ------------------------------------------------------------------ definition

def load_sweep(spec: str) -> dict:
  """`path.py[:preset]` -> the validated sweep with grid cells expanded."""
  path, _, preset = spec.partition(":")
  if not os.path.isfile(path):
    raise SweepError(f"sweep file not found: {path}")
  try:
    module = runpy.run_path(path)
    if "get_sweep" not in module:
      raise SweepError(f"{path} defines no get_sweep()")
    raw = module["get_sweep"](preset) if preset else module["get_sweep"]()
  except SweepError:
    raise
  except Exception as e:  # a bug or a bad preset in the user's sweep file
    raise SweepError(f"{spec}: {type(e).__name__}: {e}") from None
  return _validate(raw, spec)


def _validate(raw, spec: str) -> dict:
  if not isinstance(raw, dict):
    raise SweepError(f"{spec}: get_sweep() must return a dict, got {type(raw).__name__}")
  _no_unknown(raw, TOP_FIELDS, "sweep")
  seeds = _seeds(raw.get("seeds", [0]), "sweep")
  for field, kind in (("cells", list), ("grid", list), ("report", dict)):
    if not isinstance(raw.get(field, kind()), kind):
      raise SweepError(f"sweep: {field} must be a {kind.__name__}")
  cells = list(raw.get("cells", []))
  for i, g in enumerate(raw.get("grid", [])):
    cells.extend(_expand_grid(g, f"grid[{i}]"))
  if not cells:
    raise SweepError(f"{spec}: the sweep has no cells")
  names = set()
  for i, c in enumerate(cells):
    cells[i] = _normalize_cell(c, i, seeds, names)
  known = {c["name"]: c for c in cells}
  for c in cells:
    for d in c["depends"]:
      if d not in known:
        ref = "{cell:%s}" % d
        used = any(ref in s for s in _strings([c["command"] or [], list(c["overrides"].values())]))
        raise SweepError(f"cell {c['name']!r}: unknown cell {d!r} in "
                         + (f"placeholder {ref}" if used else "depends"))
  _check_config_keys(cells)
  return dict(name=str(raw.get("name", os.path.basename(spec))), definition=spec,
              seeds=seeds, cells=_topo_sort(cells), report=dict(raw.get("report", {})))


def _no_unknown(d, fields, where):
  if not isinstance(d, dict):
    raise SweepError(f"{where}: expected a dict, got {d!r}")
  unknown = sorted(set(d) - fields)
  if unknown:
    raise SweepError(f"{where}: unknown field {unknown[0]!r} (expected {sorted(fields)})")


def _seeds(seeds, where):
  if (not isinstance(seeds, (list, tuple)) or not seeds or len(set(seeds)) != len(seeds)
      or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
    raise SweepError(f"{where}: seeds must be a non-empty list of distinct ints, got {seeds!r}")
  return list(seeds)


def _name_value(v) -> str:
  """A grid value as it appears in a cell name (filesystem-safe)."""
  return re.sub(r"[^\w.+-]+", "_", str(v)).strip("_") or "_"


def _expand_grid(g, where) -> list:
  """One cell per point of the product of g["axes"], overrides merged over the base's."""
  _no_unknown(g, {"base", "axes"}, where)
  base, axes = g.get("base"), g.get("axes")
  _no_unknown(base, CELL_FIELDS, f"{where}.base")
  if not isinstance(base.get("name"), str):
    raise SweepError(f"{where}.base: needs a name")
  if not isinstance(axes, dict) or not axes or not all(
      isinstance(v, (list, tuple)) and v for v in axes.values()):
    raise SweepError(f"{where} ({base.get('name')!r}): axes must map keys to non-empty lists")
  cells = []
  for point in itertools.product(*axes.values()):
    tag = ",".join(f"{k.rpartition('.')[2]}={_name_value(v)}" for k, v in zip(axes, point))
    overrides = {**base.get("overrides", {}), **dict(zip(axes, point))}
    cells.append({**base, "name": f"{base.get('name')}-{tag}", "overrides": overrides})
  return cells


def _normalize_cell(c, i, seeds, names) -> dict:
  """Check one cell's fields; fill defaults; add the dependencies implied by {cell:X}."""
  name = c.get("name") if isinstance(c, dict) else None
  where = f"cell {name!r}" if isinstance(name, str) else f"cells[{i}]"
  _no_unknown(c, CELL_FIELDS, where)
  if not isinstance(name, str) or not _SAFE_NAME.match(name):
    raise SweepError(f"{where}: name {name!r} must be a filesystem-safe string "
                     f"(letters, digits, _ . , = + -)")
  if name in names:
    raise SweepError(f"duplicate cell name {name!r}")
  names.add(name)
  if ("config" in c) == ("command" in c):
    raise SweepError(f"{where}: needs exactly one of 'config' or 'command'")
  if "command" in c:
    cmd = c["command"]
    if not isinstance(cmd, (list, tuple)) or not cmd or not all(isinstance(a, str) for a in cmd):
      raise SweepError(f"{where}: command must be a non-empty list of strings")
    if c.get("overrides"):
      raise SweepError(f"{where}: overrides are for config cells; put args in the command")
  elif not isinstance(c["config"], str):
    raise SweepError(f"{where}: config must be 'FILE.py[:preset]', got {c['config']!r}")
  overrides = c.get("overrides", {})
  if not isinstance(overrides, dict) or not all(isinstance(k, str) for k in overrides):
    raise SweepError(f"{where}: overrides must be a dict of 'dotted.key': value")
  if "seed" in overrides:
    raise SweepError(f"{where}: do not override 'seed'; use the cell's seeds list")
  depends = c.get("depends", [])
  if not isinstance(depends, (list, tuple)) or not all(isinstance(d, str) for d in depends):
    raise SweepError(f"{where}: depends must be a list of cell names")
  refs = [m.group(2) for s in _strings([c.get("command", []), list(overrides.values())])
          for m in _PLACEHOLDER.finditer(s) if m.group(2) is not None]
  return dict(name=name, config=c.get("config"), command=list(c.get("command", [])) or None,
              overrides=dict(overrides), seeds=_seeds(c.get("seeds", seeds), where),
              depends=list(dict.fromkeys([*depends, *refs])))


def _strings(x):
  """Every str inside nested lists/tuples."""
  if isinstance(x, str):
    yield x
  elif isinstance(x, (list, tuple)):
    for y in x:
      yield from _strings(y)


def _topo_sort(cells) -> list:
  """Cells in dependency order (definition order otherwise); a cycle is an error."""
  by_name, out, state = {c["name"]: c for c in cells}, [], {}

  def visit(name, path):
    if state.get(name) == "done":
      return
    if state.get(name) == "visiting":
      cycle = path[path.index(name):] + [name]
      raise SweepError(f"dependency cycle: {' -> '.join(cycle)}")
    state[name] = "visiting"
    for d in by_name[name]["depends"]:
      visit(d, path + [name])
    state[name] = "done"
    out.append(by_name[name])

  for c in cells:
    visit(c["name"], [])
  return out


def _check_config_keys(cells):
  """Load each config once; every override key must exist (did-you-mean error otherwise)."""
  if all(c["config"] is None for c in cells):
    return  # command cells only: no need to import the library (and jax)
  from rlhf_jax import config as config_lib
  loaded = {}
  for c in cells:
    if c["config"] is None:
      continue
    spec = c["config"]
    if spec not in loaded:
      if not os.path.isfile(spec.partition(":")[0]):
        raise SweepError(f"cell {c['name']!r}: config file not found: {spec.partition(':')[0]}")
      try:
        loaded[spec] = config_lib.load_config(spec)
      except Exception as e:
        raise SweepError(f"cell {c['name']!r}: cannot load config {spec} ({e})") from None
    for key in c["overrides"]:
      try:
        config_lib.check_key(loaded[spec], key)
      except config_lib.ConfigError as e:
        raise SweepError(f"cell {c['name']!r}: {e}") from None


# ------------------------------------------------------------------ planning

def _flag_value(v) -> str:
  """A Python value as a --config.KEY=VALUE string."""
  if isinstance(v, (bool, str)):
    return str(v)
  if isinstance(v, (list, tuple)):
    items = [repr(x) if isinstance(x, str) else _flag_value(x) for x in v]
    return f"({items[0]},)" if len(items) == 1 else f"({', '.join(items)})"
  return repr(v)


def _substitute(value, ctx):
  """Replace the exact placeholders in str values (recursing into lists); others untouched."""
  if isinstance(value, (list, tuple)):
    return type(value)(_substitute(v, ctx) for v in value)
  if not isinstance(value, str):
    return value
  return _PLACEHOLDER.sub(lambda m: ctx[m.group(1)] if m.group(1) else ctx["cell"](m.group(2)),
                          value)


def plan(sweep: dict, sweep_dir: str) -> list:
  """The jobs of every cell x seed, in dependency order."""
  sweep_dir = os.path.abspath(sweep_dir)
  seeds_of = {c["name"]: c["seeds"] for c in sweep["cells"]}

  def wd(cell, seed):
    return os.path.join(sweep_dir, cell, f"seed-{seed}")

  jobs = []
  for c in sweep["cells"]:
    for seed in c["seeds"]:
      ctx = dict(sweep_dir=sweep_dir, workdir=wd(c["name"], seed), seed=str(seed),
                 python=sys.executable,
                 cell=lambda n, s=seed: wd(n, s if s in seeds_of[n] else seeds_of[n][0]))
      if c["command"]:
        argv = _substitute(c["command"], ctx)
      else:
        argv = [sys.executable, "-m", "rlhf_jax.launch", "train", f"--config={c['config']}",
                f"--workdir={ctx['workdir']}", f"--config.seed={seed}"] + [
                    f"--config.{k}={_flag_value(_substitute(v, ctx))}"
                    for k, v in c["overrides"].items()]
      jobs.append(Job(c["name"], seed, ctx["workdir"], list(argv), tuple(c["depends"])))
  return jobs


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


def _lock(sweep_dir: str):
  f = open(os.path.join(sweep_dir, "sweep.lock"), "w")
  try:
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    f.close()
    raise SweepError(f"another sweep is running on {sweep_dir} ({sweep_dir}/sweep.lock "
                     f"is locked); wait for it or use another --sweep_dir") from None
  return f


def write_report(sweep_dir: str) -> None:
  """The comparison report of this sweep into SWEEP_DIR/report (rlhf_jax.report)."""
  try:
    from rlhf_jax import report
  except ImportError as e:
    print(f"no report: cannot import rlhf_jax.report ({e}); run it later on {sweep_dir}")
    return
  report.write_report([sweep_dir], os.path.join(sweep_dir, "report"))
  print(f"report: {os.path.join(sweep_dir, 'report')}")


def run_sweep(spec, sweep_dir, parallel=1, dry_run=False, report=True, only=None) -> int:
  """Run (or with dry_run, list) the sweep's jobs; 0 if all done, 1 if any failed/skipped."""
  if parallel < 1:
    raise SweepError(f"--parallel must be >= 1, got {parallel}")
  sweep, sweep_dir = load_sweep(spec), os.path.abspath(sweep_dir)
  jobs = plan(sweep, sweep_dir)
  only = None if only is None else _select(only, [c["name"] for c in sweep["cells"]])
  selected = [j for j in jobs if only is None or j.cell in only]
  disk = {j.name: _disk_status(j) for j in jobs}
  if dry_run:
    for j in selected:
      print(f"{j.name}  [{disk[j.name]}]  {shlex.join(j.argv)}")
  changed = [j for j in selected if disk[j.name] == "changed"]
  if changed:
    raise SweepError(
        f"{changed[0].name} is already done with a different command (in "
        f"{changed[0].workdir}); use another --sweep_dir or move that workdir away")
  if dry_run:
    return 0
  os.makedirs(sweep_dir, exist_ok=True)
  lock = _lock(sweep_dir)
  status = {j.name: "cached" if disk[j.name] == "done" else "excluded" for j in jobs}
  status.update({j.name: "cached" if disk[j.name] == "done" else "pending" for j in selected})
  todo = [j for j in selected if status[j.name] == "pending"]
  print(f"sweep {sweep['name']}: {len(selected)} jobs, {len(selected) - len(todo)} already "
        f"done, running {len(todo)} ({parallel} at a time) in {sweep_dir}", flush=True)
  _write_sweep_json(sweep, jobs, sweep_dir, disk)
  stop = []  # signals received: the scheduler stops its children and returns
  main_thread = threading.current_thread() is threading.main_thread()
  old = {s: signal.signal(s, lambda signum, _: stop.append(signum))
         for s in (signal.SIGTERM, signal.SIGINT) if main_thread}
  try:
    _schedule(jobs, todo, status, parallel, stop)
  finally:
    for s, h in old.items():
      signal.signal(s, h)
    _write_sweep_json(sweep, jobs, sweep_dir, status)
    lock.close()
  _print_summary(selected, status)
  if stop:
    print(f"interrupted by signal {stop[0]}; re-run the same command to resume")
    return EXIT_PREEMPTED if stop[0] == signal.SIGTERM else 128 + stop[0]
  if any(status[j.name] not in _OK for j in selected):
    if all(status[j.name] in (*_OK, "interrupted", "skipped") for j in selected) and any(
        status[j.name] == "interrupted" for j in selected):
      print(f"some jobs were preempted (exit {EXIT_PREEMPTED}); re-run the same command to "
            f"resume them")
      return EXIT_PREEMPTED
    return 1
  if report:
    try:
      write_report(sweep_dir)
    except Exception as e:  # the runs are fine; only the report failed
      if os.environ.get("RLHF_JAX_DEBUG"):
        raise
      print(f"error: report failed: {type(e).__name__}: {e}", file=sys.stderr)
      return 1
  return 0


def _select(only, cells) -> set:
  """--only: "a,b" (names may contain commas, as grid cells do) or globs like "grpo-*"."""
  parts = only.split(",") if isinstance(only, str) else list(only)
  chosen, i = set(), 0
  while i < len(parts):
    if any(ch in parts[i] for ch in "*?["):
      matched = fnmatch.filter(cells, parts[i])
      j = i + 1 if matched else None
    else:
      j = next((j for j in range(len(parts), i, -1) if ",".join(parts[i:j]) in cells), None)
      matched = [",".join(parts[i:j])] if j else []
    if not matched:
      raise SweepError(f"--only: unknown cell {parts[i]!r} (cells: {', '.join(cells)})")
    chosen.update(matched)
    i = j
  return chosen


def _print_summary(jobs, status):
  rows = [("cell", "seed", "status", "wall s", "log")]
  for j in jobs:
    wall = (_read_state(j) or {}).get("wall_s")
    rows.append((j.cell, str(j.seed), status[j.name], "" if wall is None else f"{wall:.1f}",
                 os.path.join(j.workdir, "log.txt")))
  widths = [max(len(r[i]) for r in rows) for i in range(4)]
  for r in rows:
    print("  ".join(x.ljust(w) for x, w in zip(r, widths)) + "  " + r[4])


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="rlhf-jax sweep", description=__doc__.split("\n")[0])
  p.add_argument("sweep", help="SWEEP.py[:preset] defining get_sweep(preset)")
  p.add_argument("--sweep_dir", required=True, help="one workdir per job under it")
  p.add_argument("--parallel", type=int, default=1, help="jobs run at once")
  p.add_argument("--dry_run", action="store_true", help="list jobs and commands; run nothing")
  p.add_argument("--no_report", action="store_true", help="no report after a successful run")
  p.add_argument("--only", default=None, help="comma-separated cells (or globs) to run")
  args = p.parse_args(argv)
  try:
    return run_sweep(args.sweep, args.sweep_dir, parallel=args.parallel,
                     dry_run=args.dry_run, report=not args.no_report,
                     only=args.only)
  except SweepError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
