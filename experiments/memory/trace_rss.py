"""Where a trainer's peak RSS comes from: resident memory over time, by phase.

Runs `rlhf-jax train` in a child process (the same glibc malloc settings as the CLI,
`rlhf_jax.allocator`, unless --malloc=system) with

  * a thread reading /proc/self/status (VmRSS, RssAnon, RssFile) every 20 ms;
  * phase labels: the trainer's steps wrapped (load = `setup.policy_init`, state =
    `state_lib.create_train_state`, sample = `sampling.generate`, logprob = the rollout's
    log-prob passes, values = PPO's value pass, update = the jitted update, checkpoint);
  * XLA compiles (jax.monitoring's backend-compile durations), each interval labelled;
  * at every phase end the bytes of the live jax arrays (`jax.live_arrays`).

Prints, per phase: calls, RSS at its first start, the largest RSS inside it and how much
above its start that is, and the same for the compile intervals inside it; writes the
samples to OUT/rss.jsonl. Usage (one trainer at a time; a real-model run takes minutes):

  .venv/bin/python experiments/memory/trace_rss.py grpo [--steps=3] [--malloc=tuned|system]
      [--out=DIR] [-- --config.KEY=VALUE ...]
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))


def read_status() -> dict:
  out = {}
  with open("/proc/self/status") as f:
    for line in f:
      k, _, v = line.partition(":")
      if k in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
        out[k] = int(v.split()[0]) * 1024
  return out


class Tracer:
  def __init__(self, path: str, every: float = 0.02):
    self.t0 = time.perf_counter()
    self.phase = ["init"]
    self.samples = []   # (t, rss, anon, file, phase)
    self.events = []    # (kind, name, t_start, t_end, extra)
    self.every = every
    self.path = path
    self._stop = False
    self.lock = threading.Lock()
    threading.Thread(target=self._run, daemon=True).start()

  def now(self):
    return time.perf_counter() - self.t0

  def _run(self):
    while not self._stop:
      s = read_status()
      self.samples.append((self.now(), s["VmRSS"], s["RssAnon"], s["RssFile"], self.phase[-1]))
      time.sleep(self.every)

  @contextlib.contextmanager
  def span(self, name):
    import jax
    t = self.now()
    self.phase.append(name)
    try:
      yield
    finally:
      self.phase.pop()
      live = sum(a.nbytes for a in jax.live_arrays())
      self.events.append(("phase", name, t, self.now(), {"live_arrays": live}))

  def wrap(self, name, fn, block=True):
    @functools.wraps(fn)
    def f(*a, **k):
      import jax
      with self.span(name):
        out = fn(*a, **k)
        if block:
          jax.block_until_ready(out)
        return out
    for attr in ("lower",):
      if hasattr(fn, attr):
        setattr(f, attr, getattr(fn, attr))
    return f

  def dump(self):
    self._stop = True
    with open(self.path, "w") as g:
      for s in self.samples:
        g.write(json.dumps({"t": s[0], "rss": s[1], "anon": s[2], "file": s[3],
                            "phase": s[4]}) + "\n")
      for e in self.events:
        g.write(json.dumps({"event": e[0], "name": e[1], "t0": e[2], "t1": e[3], **e[4]})
                + "\n")


def install(tr: Tracer):
  import jax
  from rlhf_jax import rollout, sampling
  from rlhf_jax.trainers import grpo, loop, ppo, setup
  from rlhf_jax.trainers import state as state_lib

  def on_duration(event, secs, **kw):
    if "backend_compile" in event or event.endswith("compile_time") or "jaxpr_to_mlir" in event:
      t1 = tr.now()
      tr.events.append(("compile", event.rsplit("/", 1)[-1], t1 - secs, t1,
                        {"in": tr.phase[-1]}))
  jax.monitoring.register_event_duration_secs_listener(on_duration)

  setup.policy_init = tr.wrap("load", setup.policy_init, block=False)
  state_lib.create_train_state = tr.wrap("state", state_lib.create_train_state)
  sampling.generate = tr.wrap("sample", sampling.generate)
  orig_lp = rollout.completion_logps_fn
  rollout.completion_logps_fn = lambda *a, **k: tr.wrap("logprob", orig_lp(*a, **k))
  for mod in (grpo, ppo):
    orig = mod.make_update
    mod.make_update = (lambda o: lambda *a, **k: tr.wrap("update", o(*a, **k)))(orig)
  orig_loop = loop.train_loop

  def train_loop(config, workdir, **kw):
    ck = kw["checkpointer"]
    ck.maybe_save = tr.wrap("checkpoint", ck.maybe_save, block=False)
    ck.close = tr.wrap("checkpoint", ck.close, block=False)
    return orig_loop(config, workdir, **kw)
  loop.train_loop = train_loop
  orig_jit = ppo.jax.jit

  class _Jax:  # ppo's values_fn = jax.jit(lambda ...): label it "values"
    def __getattr__(self, k):
      return getattr(jax, k)

    @staticmethod
    def jit(fn, *a, **k):
      j = orig_jit(fn, *a, **k)
      return tr.wrap("values", j) if getattr(fn, "__name__", "") == "<lambda>" else j
  ppo.jax = _Jax()


def report(path: str):
  rows = [json.loads(x) for x in open(path)]
  samples = [r for r in rows if "rss" in r]
  events = [r for r in rows if "event" in r]
  GB = 1e9
  peak = max(samples, key=lambda s: s["rss"])
  print(f"peak RSS {peak['rss'] / GB:.2f} GB at t={peak['t']:.0f}s in phase {peak['phase']!r} "
        f"(anon {peak['anon'] / GB:.2f}, file {peak['file'] / GB:.2f})")

  def max_in(t0, t1):
    xs = [s["rss"] for s in samples if t0 <= s["t"] <= t1]
    return max(xs) if xs else 0

  def at(t):
    xs = [s for s in samples if s["t"] <= t]
    return xs[-1]["rss"] if xs else 0
  by = collections.OrderedDict()
  for e in events:
    if e["event"] != "phase":
      continue
    d = by.setdefault(e["name"], {"calls": 0, "first_start": at(e["t0"]), "max": 0, "rise": 0,
                                  "live": 0, "first_max": max_in(e["t0"], e["t1"]), "secs": 0.0})
    d["calls"] += 1
    m = max_in(e["t0"], e["t1"])
    d["max"] = max(d["max"], m)
    d["rise"] = max(d["rise"], m - at(e["t0"]))
    d["live"] = max(d["live"], e["live_arrays"])
    d["secs"] += e["t1"] - e["t0"]
  print("| phase | calls | s | RSS at 1st start | max RSS, 1st call | max RSS | max rise in a "
        "call | live jax arrays at end |")
  print("|---|---|---|---|---|---|---|---|")
  for k, d in by.items():
    print(f"| {k} | {d['calls']} | {d['secs']:.0f} | {d['first_start'] / GB:.2f} | "
          f"{d['first_max'] / GB:.2f} | {d['max'] / GB:.2f} | {d['rise'] / GB:.2f} | "
          f"{d['live'] / GB:.2f} |")
  comp = [e for e in events if e["event"] == "compile" and e["t1"] - e["t0"] > 0.5]
  print("| compile (> 0.5 s) | in phase | s | RSS before | max RSS during | rise |")
  print("|---|---|---|---|---|---|")
  for e in comp:
    b, m = at(e["t0"]), max_in(e["t0"], e["t1"])
    print(f"| {e['name']} | {e['in']} | {e['t1'] - e['t0']:.1f} | {b / GB:.2f} | {m / GB:.2f} | "
          f"{(m - b) / GB:.2f} |")


def child(argv):
  path = os.environ["TRACE_RSS_OUT"]
  tr = Tracer(path)
  install(tr)
  from rlhf_jax import launch
  try:
    launch.train_command(argv)
  finally:
    tr.dump()


def main():
  if os.environ.get("TRACE_RSS_OUT"):
    return child(sys.argv[1:])
  ap = argparse.ArgumentParser()
  ap.add_argument("trainer")
  ap.add_argument("--steps", type=int, default=3)
  ap.add_argument("--malloc", default="tuned")
  ap.add_argument("--out", default="")
  ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
  ap.add_argument("--report", default="", help="only print the report of this rss.jsonl")
  a, extra = ap.parse_known_args()
  if a.report:
    return report(a.report)
  import real_model
  from rlhf_jax import allocator
  data = Path(a.data)
  out = Path(a.out or f"/tmp/trace_rss_{a.trainer}_{a.malloc}")
  out.mkdir(parents=True, exist_ok=True)
  sft_file = out / "gsm8k_sft.jsonl"
  if a.trainer == "sft":
    real_model.write_gsm8k_sft(data / "gsm8k_train.jsonl", sft_file)
  per, common = real_model.commands(data, real_model.smollm2_gguf(), sft_file, a.steps, 0)
  workdir = out / "run"
  args = [f"--config={REPO / 'configs' / (a.trainer + '.py')}:smollm2_laptop",
          f"--workdir={workdir}", *per[a.trainer], *common,
          *[x for x in extra if x != "--"]]
  env = dict(os.environ)
  if a.malloc == "tuned":
    env = allocator.tuned_env(env) or env
  else:
    env["RLHF_JAX_MALLOC"] = "system"
  env["TRACE_RSS_OUT"] = str(out / "rss.jsonl")
  env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
  t = time.perf_counter()
  p = subprocess.Popen([sys.executable, __file__, *args], cwd=REPO, env=env)
  _, status, usage = os.wait4(p.pid, 0)
  print(f"rc={os.waitstatus_to_exitcode(status)} wall={time.perf_counter() - t:.0f}s "
        f"ru_maxrss={usage.ru_maxrss * 1024 / 1e9:.2f} GB")
  report(str(out / "rss.jsonl"))


if __name__ == "__main__":
  main()
