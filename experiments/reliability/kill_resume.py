"""Reliability harness (issue #9): kill-and-resume, NaN injection, determinism.

For every trainer (sft, rm, dpo, ppo, grpo) on its tiny preset, shortened (few steps,
frequent checkpoints, async checkpoint writes as in real runs), through the real CLI:

  reference    one uninterrupted `rlhf-jax train` run.
  determinism  a second uninterrupted run of the same command into another workdir:
               metrics.jsonl (timing keys excluded) and every leaf of the final
               checkpoint must be bitwise equal to the reference's.
  kills        the same command on a third workdir, SIGKILLed again and again and
               relaunched until it finishes: first at a random moment of its start-up
               (data, tokenizer and TFDS writing, compilation), then *during a
               checkpoint write* (RLHF_JAX_FAULT=STEP:KILL:save at one of the first
               checkpoint steps; the harness checks that the step's orbax temporary
               directory was left unfinished), then at random wall-clock delays after
               each start, uniform in [start-up / 2, start-up + 0.9 x the remaining
               steps' time] (timings measured on the uninterrupted runs): start-up,
               training steps, evaluation, metrics and checkpoint writes.
               The final checkpoint (params, optimizer state, step, loop counters, KL
               controller) must be bitwise equal to the reference's, metrics.jsonl
               (timing keys excluded) and samples.jsonl identical: no step duplicated
               or missing.
  nan          RLHF_JAX_NAN_STEPS makes the loss NaN at chosen steps (checkpoint every
               step): two isolated random steps in one run (each must be skipped:
               skipped_update=1, parameters and optimizer state bitwise equal to the
               previous step's and finite, the run goes on to num_steps, skipped_updates
               counts them) and a burst of max_bad_steps=3 in a row in another (the first
               two skipped as above, then the run stops with the max_bad_steps message).

Usage (about 10 minutes on a 2-core CPU; --kills random kills per trainer):
  .venv/bin/python experiments/reliability/kill_resume.py --out=runs/reliability \\
      [--kills=4] [--seed=0] [--trainers=sft,rm,dpo,ppo,grpo] [--no_determinism] [--no_nan]
Prints the tables and writes OUT/results.json (OUT/<trainer>/ keeps every workdir and
every launch's log). tests/test_reliability.py runs a fast subset through the same
functions.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Shortened tiny presets (config overrides): a few seconds of training each on a CPU.
RL_REWARD = '[{"name": "math"}, {"name": "length_penalty", "target": 2, "coef": 0.1}]'
COMMON = {"log_every": 1, "checkpoint.keep": 3}
TRAINERS = {
    "sft": ("configs/sft.py:tiny", {
        "num_steps": 40, "checkpoint.every": 5, "eval_every": 10, "eval_batches": 2,
        "sample.every": 20, "optimizer.warmup_steps": 4, "eval_kl": False,
        "data.synthetic_train_examples": 640, "data.synthetic_eval_examples": 64}),
    "rm": ("configs/rm.py:tiny", {
        "num_steps": 40, "checkpoint.every": 5, "eval_every": 10, "optimizer.warmup_steps": 4,
        "data.synthetic_train_examples": 640, "data.synthetic_eval_examples": 64}),
    "dpo": ("configs/dpo.py:tiny", {
        "num_steps": 40, "checkpoint.every": 5, "eval_every": 10, "sample.every": 20,
        "optimizer.warmup_steps": 4, "eval_kl": False,
        "data.synthetic_train_examples": 640, "data.synthetic_eval_examples": 64}),
    "ppo": ("configs/ppo.py:tiny", {
        "num_steps": 10, "checkpoint.every": 2, "eval_every": 5, "eval_prompts": 8,
        "eval_samples": 2, "reward.spec": RL_REWARD,
        "data.synthetic_train_examples": 256, "data.synthetic_eval_examples": 32}),
    "grpo": ("configs/grpo.py:tiny", {
        "num_steps": 10, "checkpoint.every": 2, "eval_every": 5, "eval_prompts": 8,
        "eval_samples": 2, "reward.spec": RL_REWARD,
        "data.synthetic_train_examples": 256, "data.synthetic_eval_examples": 32}),
}
ALL = tuple(TRAINERS)


def is_timing_key(key: str) -> bool:
  """Metrics that measure wall-clock time (excluded from equality): time/*, elapsed_s,
  *tokens_per_second."""
  return key.startswith("time/") or key == "elapsed_s" or key.endswith("tokens_per_second")


def overrides(trainer: str, **extra) -> dict:
  return {**COMMON, **TRAINERS[trainer][1], **extra}


def _flag(v) -> str:
  return str(v) if isinstance(v, (bool, str)) else repr(v)


def cli_argv(trainer: str, workdir: str, **extra) -> list[str]:
  spec, _ = TRAINERS[trainer]
  return [sys.executable, "-m", "rlhf_jax.faults", "train", f"--config={spec}",
          f"--workdir={workdir}"] + [f"--config.{k}={_flag(v)}"
                                     for k, v in overrides(trainer, **extra).items()]


def config(trainer: str, **extra):
  """The same run as `cli_argv` as a ConfigDict, for in-process `trainer.run`."""
  from rlhf_jax.launch import load_config
  c = load_config(os.path.join(REPO, TRAINERS[trainer][0]))
  for key, value in overrides(trainer, **extra).items():
    node, *path = c, *key.split(".")
    for p in path[:-1]:
      node = node[p]
    node[path[-1]] = value
  return c


def env(**extra) -> dict:
  e = {k: v for k, v in os.environ.items()
       if k not in ("RLHF_JAX_FAULT", "RLHF_JAX_NAN_STEPS")}
  e.update(JAX_PLATFORMS=e.get("JAX_PLATFORMS", "cpu"), PYTHONUNBUFFERED="1")
  # A persistent compilation cache makes every relaunch compile nothing (same executables).
  e.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(REPO, ".cache", "jax-reliability"))
  e.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  e.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
  e.update(extra)
  return e


def launch(trainer: str, workdir: str, log: str, extra_env=None, **extra) -> subprocess.Popen:
  f = open(log, "w")
  return subprocess.Popen(cli_argv(trainer, workdir, **extra), cwd=REPO, stdout=f,
                          stderr=subprocess.STDOUT, env=env(**(extra_env or {})))


def run_to_end(trainer, workdir, log, extra_env=None, timeout=900, **extra):
  """(returncode, wall seconds) of one launch run to its end."""
  t0 = time.time()
  p = launch(trainer, workdir, log, extra_env, **extra)
  try:
    p.wait(timeout=timeout)
  except subprocess.TimeoutExpired:
    p.kill()
    p.wait()
  return p.returncode, time.time() - t0


# ---------------------------------------------------------------------------- comparing

def read_rows(path: str) -> list[dict]:
  from rlhf_jax.metrics import read_jsonl
  return read_jsonl(path)


def final_checkpoint(workdir: str):
  """(step, {path: host array}) of the workdir's newest finished checkpoint."""
  import jax
  from rlhf_jax.checkpoint import read_checkpoint
  step, state = read_checkpoint(os.path.join(workdir, "checkpoints"))
  flat = jax.tree_util.tree_flatten_with_path(state)[0]
  return step, {jax.tree_util.keystr(p): np.asarray(v) for p, v in flat}


def checkpoint_at(workdir: str, step: int) -> dict:
  import jax
  from rlhf_jax.checkpoint import read_checkpoint
  _, state = read_checkpoint(os.path.join(workdir, "checkpoints"), step)
  return {jax.tree_util.keystr(p): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(state)[0]}


def trees_equal(a: dict, b: dict) -> bool:
  return a.keys() == b.keys() and all(
      a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and np.array_equal(a[k], b[k])
      for k in a)


def compare(ref: str, other: str) -> dict:
  """How `other` matches the uninterrupted `ref`: bitwise final checkpoint, metrics rows
  (timing keys excluded), steps, samples."""
  out = {}
  (sa, a), (sb, b) = final_checkpoint(ref), final_checkpoint(other)
  out["final_step"] = [sa, sb]
  out["bitwise_params"] = sa == sb and trees_equal(a, b)
  out["leaves"] = len(a)
  ra, rb = (read_rows(os.path.join(w, "metrics.jsonl")) for w in (ref, other))
  strip = lambda rows: [{k: v for k, v in r.items() if not is_timing_key(k)} for r in rows]
  steps_a, steps_b = [r["step"] for r in ra], [r["step"] for r in rb]
  out["steps_ok"] = steps_a == steps_b and len(set(steps_b)) == len(steps_b)
  out["metrics_rows_ok"] = strip(ra) == strip(rb)
  out["rows"] = len(rb)
  if not out["metrics_rows_ok"]:
    diffs = [(x.get("step"), sorted(k for k in set(x) | set(y) if x.get(k) != y.get(k)))
             for x, y in zip(strip(ra), strip(rb)) if x != y]
    out["metrics_diff"] = (diffs[:3], f"steps ref {steps_a} vs {steps_b}"
                           if steps_a != steps_b else "")
  sa_rows, sb_rows = (read_rows(os.path.join(w, "samples.jsonl")) for w in (ref, other))
  out["samples_ok"] = sa_rows == sb_rows
  out["ok"] = all(out[k] for k in ("bitwise_params", "steps_ok", "metrics_rows_ok",
                                   "samples_ok"))
  return out


# ---------------------------------------------------------------------------- kills

def _tmp_dirs(workdir: str) -> dict[str, float]:
  """Unfinished orbax checkpoint directories {name: mtime}."""
  d = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(d):
    return {}
  return {n: os.path.getmtime(os.path.join(d, n)) for n in sorted(os.listdir(d))
          if n.endswith(".orbax-checkpoint-tmp")}


def _finished_steps(workdir: str) -> list[int]:
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def _last_row_step(workdir: str):
  rows = read_rows(os.path.join(workdir, "metrics.jsonl"))
  return rows[-1]["step"] if rows else None


def _mtime(path: str) -> float:
  return os.path.getmtime(path) if os.path.exists(path) else 0.0


def kill_during_save(trainer: str, workdir: str, step: int, log: str) -> dict:
  """One launch SIGKILLed by itself while writing the checkpoint of `step`."""
  rc, wall = run_to_end(trainer, workdir, log, {"RLHF_JAX_FAULT": f"{step}:KILL:save"})
  tmp = _tmp_dirs(workdir)
  return {"kind": "during checkpoint write", "target_step": step, "rc": rc,
          "wall_s": round(wall, 2), "killed": rc == -signal.SIGKILL,
          "mid_write": f"{step}.orbax-checkpoint-tmp" in tmp
                       and step not in _finished_steps(workdir),
          "checkpoints_after": _finished_steps(workdir)}


def kill_at(trainer: str, workdir: str, delay: float, log: str) -> dict:
  """One launch SIGKILLed `delay` seconds after its start (if still running)."""
  metrics = os.path.join(workdir, "metrics.jsonl")
  written, tmp_before = _mtime(metrics), _tmp_dirs(workdir)
  t0 = time.time()
  p = launch(trainer, workdir, log)
  try:
    p.wait(timeout=delay)
  except subprocess.TimeoutExpired:
    p.send_signal(signal.SIGKILL)
    p.wait()
  killed = p.returncode == -signal.SIGKILL
  writing = [n.split(".")[0] for n, m in _tmp_dirs(workdir).items() if tmp_before.get(n) != m]
  phase = (f"the write of checkpoint {writing[0]}" if writing else
           "start-up (metrics.jsonl untouched)" if _mtime(metrics) == written else
           f"the training loop (last metrics row: step {_last_row_step(workdir)})")
  return {"kind": "random", "delay_s": round(delay, 2), "rc": p.returncode, "killed": killed,
          "wall_s": round(time.time() - t0, 2), "phase": phase if killed else "finished",
          "checkpoints_after": _finished_steps(workdir)}


def timings(workdir: str, wall: float) -> tuple[float, float]:
  """(start-up seconds, seconds per step) of a finished uninterrupted run: the training
  loop's elapsed_s (last metrics row) vs the launch's wall time."""
  rows = read_rows(os.path.join(workdir, "metrics.jsonl"))
  loop = float(rows[-1]["elapsed_s"])
  return max(wall - loop, 0.5), loop / max(rows[-1]["step"], 1)


def _chain(trainer: str, root: str, name: str, startup_s: float, step_s: float,
           kills: int, save_kill: bool, rng, say) -> tuple[str, list[dict]]:
  """One workdir killed and relaunched until it finishes: at a random moment of its
  start-up, (save_kill) during a checkpoint write, then after random delays until `kills`
  random kills (or until a launch finishes before its kill); a last launch to the end."""
  wd = os.path.join(root, name)
  shutil.rmtree(wd, ignore_errors=True)
  os.makedirs(wd)
  c = overrides(trainer)
  n_steps, every = c["num_steps"], c["checkpoint.every"]
  events = []
  log = lambda n: os.path.join(root, f"{name}-launch-{n:02d}.log")

  def log_kill(n, e):
    say(f"[{trainer}] {name} launch {n}: " + (
        f"SIGKILL after {e['delay_s']:.1f} s during {e['phase']}; checkpoints "
        f"{e['checkpoints_after']}" if e["killed"] else f"finished first (rc {e['rc']})"))

  e = kill_at(trainer, wd, float(rng.uniform(0.2, 1.0)) * startup_s, log(0))
  events.append(e)
  log_kill(0, e)
  n = 1
  if save_kill:
    save_step = int(rng.choice([every, 2 * every] if 2 * every < n_steps else [every]))
    e = kill_during_save(trainer, wd, save_step, log(n))
    events.append(e)
    say(f"[{trainer}] {name} launch {n}: SIGKILL during the write of checkpoint {save_step}: "
        f"{'killed' if e['killed'] else 'NOT killed (rc %s)' % e['rc']}, "
        f"{'unfinished temporary directory left' if e['mid_write'] else 'write had finished'}"
        f"; finished checkpoints {e['checkpoints_after']}")
    n += 1
  while events[-1]["killed"] and sum(
      x["killed"] and x["kind"] == "random" for x in events) < kills and n < 4 * kills + 2:
    done = (_finished_steps(wd) or [0])[-1]
    # (a resumed launch starts faster than a fresh one: no data, tokenizer, TFDS to build)
    delay = float(rng.uniform(0.3 * startup_s, 0.7 * startup_s + 0.9 * (n_steps - done) * step_s))
    e = kill_at(trainer, wd, delay, log(n))
    events.append(e)
    log_kill(n, e)
    n += 1
  if events[-1]["killed"] or events[-1]["rc"] != 0:
    rc, wall = run_to_end(trainer, wd, log(n))
    events.append({"kind": "final", "rc": rc, "killed": False, "wall_s": round(wall, 2)})
    say(f"[{trainer}] {name} launch {n}: resumed to the end (rc {rc}, {wall:.1f} s)")
  return wd, events


def kill_chain(trainer: str, root: str, ref: str, startup_s: float, step_s: float,
               kills: int, rng, say=print) -> dict:
  """`kills` random SIGKILLs (each chain's first during its start-up) and one during a
  checkpoint write, each followed by a relaunch of the same command; every finished
  workdir compared with `ref`. When a launch finishes before its kill, the next kills go
  to a new workdir (at most 3)."""
  chains, events = [], []
  while len(chains) < 3 and (not chains or sum(
      e["killed"] and e["kind"] == "random" for e in events) < kills):
    left = kills - sum(e["killed"] and e["kind"] == "random" for e in events)
    wd, ev = _chain(trainer, root, "killed" if not chains else f"killed{len(chains) + 1}",
                    startup_s, step_s, left, not chains, rng, say)
    events += ev
    chain = {"workdir": wd, "launches": len(ev), "finished": ev[-1]["rc"] == 0}
    chain.update(compare(ref, wd) if chain["finished"] else {"ok": False})
    chains.append(chain)
  killed = [e for e in events if e["killed"]]
  result = {"events": events, "chains": chains, "kills": len(killed),
            "mid_write_kills": sum(e.get("mid_write", False) for e in events),
            "phases": {
                "start-up": sum(e.get("phase", "").startswith("start-up") for e in killed),
                "training": sum(e.get("phase", "").startswith("the training") for e in killed),
                "checkpoint write": sum(e.get("mid_write", False)
                                        or e.get("phase", "").startswith("the write")
                                        for e in killed)}}
  for k in ("finished", "ok", "bitwise_params", "steps_ok", "metrics_rows_ok", "samples_ok"):
    result[k] = all(c.get(k, False) for c in chains)
  result["survived"] = result["kills"] if result["ok"] else 0
  return result


# ---------------------------------------------------------------------------- NaN

MAX_BAD = 3


NAN_STEPS = 10  # num_steps of the NaN runs (a checkpoint every step)


def nan_overrides(n: int = NAN_STEPS) -> dict:
  return {"num_steps": n, "checkpoint.every": 1, "checkpoint.keep": n + 1,
          "max_bad_steps": MAX_BAD, "eval_every": 0}


def updates_per_step(trainer: str) -> int:
  """Optimizer updates in one training step of `trainer`'s run here (PPO / GRPO: epochs x
  minibatches; the others: 1): what the guard's skipped_updates counter adds per NaN step."""
  c = config(trainer)
  if trainer == "grpo":
    from rlhf_jax.losses.grpo import resolve
    algo = resolve(c.grpo)
    return algo["epochs"] * algo["minibatches"]
  return c.ppo.epochs * c.ppo.minibatches if trainer == "ppo" else 1


GUARD_COUNTER = "['opt_state']['skipped_updates']"  # optim.skip_nonfinite's, checkpointed


def nan_handled(workdir: str, steps: list[int], n: int, finished: bool, message: str,
                updates: int = 1):
  """Per injected step, whether the guard handled it. Isolated steps: skipped_update = 1 in
  its metrics row, every checkpointed float (params, optimizer state) bitwise equal to the
  previous step's and finite, the guard's skipped_updates counter (`updates` per step,
  `updates_per_step`) counts it, and the run went on to step `n` (`finished`) with every
  other step updating. A burst of MAX_BAD in a row: the first ones as above, then the run
  stopped at the last with the max_bad_steps `message`."""
  rows = {r["step"]: r for r in read_rows(os.path.join(workdir, "metrics.jsonl"))}
  saved = _finished_steps(workdir)
  burst = len(steps) >= MAX_BAD and steps == list(range(steps[0], steps[0] + len(steps)))
  handled = []
  for i, s in enumerate(steps):
    if burst and i == MAX_BAD - 1:  # the run must stop here, with the message
      m = re.search(r"(\d+) consecutive non-finite updates \(steps (\d+)-(\d+), "
                    r"config.max_bad_steps=(\d+)\)", message)
      handled.append(not finished and m is not None and m.groups() == (
          str(MAX_BAD), str(steps[0]), str(s), str(MAX_BAD)) and s not in saved)
      continue
    ok = rows.get(s, {}).get("skipped_update") == 1.0 and s in saved and s - 1 in saved
    if ok:
      before, after = checkpoint_at(workdir, s - 1), checkpoint_at(workdir, s)
      kept = [k for k in after if k.startswith(("['params']", "['opt_state']"))
              and k not in (GUARD_COUNTER, "['opt_state']['bad_run']")]
      ok = (len(kept) > 1 and all(np.array_equal(before[k], after[k]) for k in kept)
            and all(np.all(np.isfinite(after[k])) for k in kept
                    if np.issubdtype(after[k].dtype, np.floating))
            and int(after[GUARD_COUNTER]) == (i + 1) * updates)
    handled.append(bool(ok))
  if not burst:  # the run went on to the end, and the other steps did update
    others = [s for s in rows if s > 0 and s not in steps]
    handled = [h and finished and max(rows) == n
               and rows[n]["skipped_updates"] == len(steps) * updates
               and all(rows[s]["skipped_update"] == 0.0 for s in others) for h in handled]
  return handled


def nan_run(trainer: str, workdir: str, steps: list[int], log: str) -> dict:
  """A CLI run with a NaN loss at `steps` (checkpoint every step); how each was handled."""
  shutil.rmtree(workdir, ignore_errors=True)
  os.makedirs(workdir)
  rc, _ = run_to_end(trainer, workdir, log, {"RLHF_JAX_NAN_STEPS": ",".join(map(str, steps))},
                     **nan_overrides())
  burst = len(steps) >= MAX_BAD
  handled = nan_handled(workdir, steps, NAN_STEPS, rc == 0, open(log).read() if rc == 1 else "",
                        updates_per_step(trainer))
  return {"steps": steps, "burst": burst, "rc": rc, "handled": handled}


def nan_injection(trainer: str, root: str, rng, say=print) -> dict:
  n = NAN_STEPS
  a, b = sorted(int(x) for x in rng.choice(np.arange(2, n + 1), 2, replace=False))
  while b - a < 2:  # isolated: not two in a row
    a, b = sorted(int(x) for x in rng.choice(np.arange(2, n + 1), 2, replace=False))
  start = int(rng.integers(2, n - MAX_BAD + 2))
  runs = [nan_run(trainer, os.path.join(root, "nan_isolated"), [a, b],
                  os.path.join(root, "nan_isolated.log")),
          nan_run(trainer, os.path.join(root, "nan_burst"), list(range(start, start + MAX_BAD)),
                  os.path.join(root, "nan_burst.log"))]
  for r in runs:
    say(f"[{trainer}] NaN at steps {r['steps']} ({'burst' if r['burst'] else 'isolated'}): "
        f"handled {sum(r['handled'])}/{len(r['handled'])} (rc {r['rc']})")
  return {"runs": runs, "injections": sum(len(r["handled"]) for r in runs),
          "handled": sum(sum(r["handled"]) for r in runs)}


# ---------------------------------------------------------------------------- main

def table(rows: list[list], header: list[str]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(x) for x in r) + " |" for r in rows]
  return "\n".join(lines)


def yes(b) -> str:
  return "yes" if b else "NO"


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", default=os.path.join(REPO, "runs", "reliability"))
  p.add_argument("--kills", type=int, default=4, help="random kills per trainer (plus one "
                 "during a checkpoint write)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--trainers", default=",".join(ALL))
  p.add_argument("--no_determinism", action="store_true")
  p.add_argument("--no_nan", action="store_true")
  args = p.parse_args(argv)
  sys.path.insert(0, REPO)
  trainers = [t.strip() for t in args.trainers.split(",") if t.strip()]
  unknown = [t for t in trainers if t not in TRAINERS]
  if unknown:
    p.error(f"--trainers: unknown {unknown}; expected some of {list(TRAINERS)}")
  rng = np.random.default_rng(args.seed)
  # This harness deletes and re-creates its own sub-directories of --out: refuse a
  # non-empty directory it did not make (never delete a user's files).
  marker = os.path.join(args.out, ".kill_resume_harness")
  if os.path.isdir(args.out) and os.listdir(args.out) and not os.path.exists(marker):
    p.error(f"--out={args.out} is a non-empty directory not made by this harness; "
            f"choose a new or empty directory")
  os.makedirs(args.out, exist_ok=True)
  open(marker, "w").close()
  t_all = time.time()
  results = {}
  for t in trainers:
    root = os.path.join(args.out, t)
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    r = results[t] = {}
    ref = os.path.join(root, "ref")
    rc, t_ref = run_to_end(t, ref, os.path.join(root, "ref.log"))
    print(f"[{t}] reference run: rc {rc}, {t_ref:.1f} s", flush=True)
    if rc != 0:
      print(open(os.path.join(root, "ref.log")).read()[-3000:])
      return 1
    r["ref_wall_s"] = round(t_ref, 2)
    startup_s, step_s = timings(ref, t_ref)
    if not args.no_determinism:
      again = os.path.join(root, "again")
      rc, wall = run_to_end(t, again, os.path.join(root, "again.log"))
      r["determinism"] = compare(ref, again) if rc == 0 else {"ok": False}
      print(f"[{t}] second uninterrupted run: rc {rc}, {wall:.1f} s, bitwise identical: "
            f"{yes(r['determinism']['ok'])}", flush=True)
      if rc == 0:  # (its compilations came from the cache, like a resumed launch's)
        startup_s, step_s = timings(again, wall)
    r["timing"] = {"startup_s": round(startup_s, 2), "step_s": round(step_s, 3)}
    r["kill"] = kill_chain(t, root, ref, startup_s, step_s, args.kills, rng,
                           say=lambda s: print(s, flush=True))
    k = r["kill"]
    print(f"[{t}] after {k['kills']} kills: bitwise params {yes(k.get('bitwise_params'))}, "
          f"metrics rows {yes(k.get('metrics_rows_ok'))}, samples {yes(k.get('samples_ok'))}",
          flush=True)
    if not args.no_nan:
      r["nan"] = nan_injection(t, root, rng, say=lambda s: print(s, flush=True))
  wall = time.time() - t_all

  kill_rows = [[t, r["kill"]["kills"], r["kill"]["phases"]["start-up"],
                r["kill"]["phases"]["training"], r["kill"]["phases"]["checkpoint write"],
                r["kill"]["survived"],
                yes(r["kill"].get("bitwise_params")),
                yes(r["kill"].get("metrics_rows_ok") and r["kill"].get("steps_ok")),
                yes(r["kill"].get("samples_ok"))] for t, r in results.items()]
  total_kills = sum(r["kill"]["kills"] for r in results.values())
  survived = sum(r["kill"]["survived"] for r in results.values())
  print("\nKill and resume (SIGKILL, then the same command again):")
  print(table(kill_rows, ["trainer", "kills", "in start-up", "in the training loop",
                          "in a checkpoint write", "survived", "bitwise params",
                          "metrics rows ok", "samples ok"]))
  print(f"total: {survived}/{total_kills} kills survived")
  summary = {"kills": total_kills, "kills_survived": survived}
  if not args.no_nan:
    nan_rows = [[t, r["nan"]["injections"], r["nan"]["handled"]] for t, r in results.items()]
    print("\nNaN injection (loss x NaN at random steps; max_bad_steps=3):")
    print(table(nan_rows, ["trainer", "injections", "handled"]))
    summary["nan_injections"] = sum(r["nan"]["injections"] for r in results.values())
    summary["nan_handled"] = sum(r["nan"]["handled"] for r in results.values())
    print(f"total: {summary['nan_handled']}/{summary['nan_injections']} NaN injections handled")
  if not args.no_determinism:
    print("\nDeterminism (two uninterrupted runs, same config and seed):")
    print(table([[t, yes(r["determinism"]["ok"]), r["determinism"].get("rows", ""),
                  r["determinism"].get("leaves", "")] for t, r in results.items()],
                ["trainer", "bitwise identical", "metrics rows", "checkpoint leaves"]))
    summary["deterministic"] = {t: r["determinism"]["ok"] for t, r in results.items()}
  import jax
  summary.update(wall_s=round(wall, 1), date=time.strftime("%Y-%m-%d"),
                 machine=f"{platform.machine()}, {os.cpu_count()} CPU cores",
                 jax=jax.__version__, seed=args.seed, kills_per_trainer=args.kills)
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump({"summary": summary, "trainers": results}, f, indent=2, default=str)
  print(f"\nwall time {wall / 60:.1f} min; results: {os.path.join(args.out, 'results.json')}")
  ok = survived == total_kills and summary.get("nan_handled") == summary.get("nan_injections")
  ok = ok and all(summary.get("deterministic", {}).values())
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
