"""`rlhf-jax sweep SWEEP.py[:preset] --sweep_dir=DIR`: run an experiment's cells x seeds.

SWEEP.py's format (cells, grids, placeholders, dependencies): rlhf_jax.sweep_spec.

Each job (cell, seed) runs in its own process into DIR/<cell>/seed-<k>/ (log.txt,
sweep_job.json); finished jobs are skipped, interrupted ones re-run (trainers resume).
A job that exits with EXIT_PREEMPTED (75: a trainer stopped by SIGTERM after saving a
checkpoint) is "interrupted", not "failed". SIGTERM to the sweep is forwarded to the
running jobs (they checkpoint) and the sweep exits 75 too, as it does when a job was
preempted and nothing failed: a launcher re-queues it and the re-run resumes.
"""
from __future__ import annotations

import argparse
import fcntl
import fnmatch
import os
import shlex
import signal
import sys
import threading

from rlhf_jax import EXIT_PREEMPTED
from rlhf_jax.sweep_jobs import _OK, _disk_status, _read_state, _schedule, _write_sweep_json
from rlhf_jax.sweep_spec import SweepError, load_sweep, plan


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
