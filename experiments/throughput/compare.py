"""One command, the side-by-side table of issue #7: our trainers vs TRL and Tunix on the
workloads of spec.py, measured in one run, interleaved (ours, TRL, Tunix for each
workload, `--rounds` times), with the ratios and the targets (>= 1.2x TRL, >= 1.5x Tunix).

    bash experiments/throughput/setup_peers.sh            # once: the peers' own venvs
    .venv/bin/python experiments/throughput/compare.py [--workloads=sft,dpo,grpo]
        [--rounds=3] [--steps=10] [--warmup=3] [--out=runs/throughput]

Writes OUT/compare.json (every run's full result) and OUT/compare.md (the table). A peer
whose venv is missing is reported as such; our rows are still measured. Every figure
is a median over the timed steps of one run; the table shows the median over the
rounds (3 by default, interleaved so that drift hits every library alike) and the
spread (min-max over rounds) of each s/step and of each round's ratio. The verdict
uses the median ratio. The machine's 1-minute load average is printed next to each
row: figures taken on a loaded machine are not comparable.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
import bench  # noqa: E402
import peers  # noqa: E402
import spec  # noqa: E402

TARGETS = {"trl": 1.2, "tunix": 1.5}


def _s(r):
  return None if not r or r.get("error") else r.get("seconds_per_step", r.get("s_per_step"))


def render(runs, workloads, peer_names, extra):
  """(markdown table, [target met] per (workload, peer)) from the runs
  [{round, library, workload, result}]: medians over rounds, spreads, and the median of
  the per-round ratios."""
  def values(lib, w, key=_s):
    xs = [key(x["result"]) for x in runs if x["library"] == lib and x["workload"] == w]
    return [x for x in xs if x is not None]

  def med(lib, w, key=_s):
    xs = values(lib, w, key)
    return statistics.median(xs) if xs else None

  def spread(xs, fmt):
    return f" ({fmt.format(min(xs))}-{fmt.format(max(xs))})" if len(xs) > 1 else ""

  def round_ratios(peer, w):
    """theirs / ours of each round in which both ran."""
    by_round = {}
    for x in runs:
      if x["workload"] == w and x["library"] in ("ours", peer) and _s(x["result"]):
        by_round.setdefault(x["round"], {})[x["library"]] = _s(x["result"])
    return [r[peer] / r["ours"] for r in by_round.values() if len(r) == 2]

  head = ["workload", "ours s/step (spread)", "ours tok/s"] + [
      f"{e} s/step" for e in extra] + sum(
      ([f"{p} s/step (spread)", f"speed-up vs {p}: median of rounds (spread; target "
        f"{TARGETS.get(p, 1):.1f}x)"] for p in peer_names), [])
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  verdict = []
  for w in workloads:
    ours = med("ours", w)
    tok = med("ours", w, key=lambda r: None if r.get("error") else r.get("tokens_per_s"))
    cells = [w, f"{ours:.3f}{spread(values('ours', w), '{:.3f}')}" if ours else "FAILED",
             f"{tok:,.0f}" if tok else "-"]
    cells += [f"{med(e, w):.3f}" if med(e, w) else "FAILED" for e in extra]
    for p in peer_names:
      theirs = med(p, w)
      ratios = round_ratios(p, w)
      if ours and theirs and ratios:
        ratio = statistics.median(ratios)
        ok = ratio >= TARGETS.get(p, 1.0)
        verdict.append(ok)
        cells += [f"{theirs:.3f}{spread(values(p, w), '{:.3f}')}",
                  f"**{ratio:.2f}x**{spread(ratios, '{:.2f}x')}"
                  + ("" if ok else " (below target)")]
      else:
        cells += [f"{theirs:.3f}" if theirs else "n/a", "-"]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines), verdict


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--workloads", default=",".join(spec.WORKLOADS))
  ap.add_argument("--peers", default=",".join(peers.PEERS))
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--steps", type=int, default=spec.TIMED_STEPS)
  ap.add_argument("--warmup", type=int, default=spec.WARMUP_STEPS)
  ap.add_argument("--peers_dir", default=os.path.join(ROOT, ".peers"))
  ap.add_argument("--timeout", type=int, default=900)
  ap.add_argument("--out", default=os.path.join(ROOT, "runs", "throughput"))
  ap.add_argument("--tcmalloc", action="store_true",
                  help="also measure ours with LD_PRELOAD=libtcmalloc (row ours+tcmalloc)")
  ap.add_argument("--system_malloc", action="store_true",
                  help="also measure ours with glibc's default malloc settings (row "
                  "ours+system-malloc; `ours` runs as `rlhf-jax` does, rlhf_jax/allocator.py)")
  args = ap.parse_args(argv)
  workloads = args.workloads.split(",")
  peer_names = [p for p in args.peers.split(",") if p]
  for w in workloads:
    if w not in spec.WORKLOADS:
      raise SystemExit(f"--workloads: unknown {w!r}; expected some of {', '.join(spec.WORKLOADS)}")
  extra = (["ours+tcmalloc"] if args.tcmalloc else []) + (
      ["ours+system-malloc"] if args.system_malloc else [])
  runs = []  # (round, library, workload, result)
  for rnd in range(args.rounds):
    for w in workloads:
      for lib in ["ours"] + extra + peer_names:
        load = os.getloadavg()[0]
        if lib == "ours":
          r = bench.run_ours(w, args.steps, args.warmup, env=bench.allocator_env("library"))
        elif lib == "ours+tcmalloc":
          r = bench.run_ours(w, args.steps, args.warmup, env=bench.allocator_env("tcmalloc"))
        elif lib == "ours+system-malloc":
          r = bench.run_ours(w, args.steps, args.warmup, env=bench.allocator_env("system"))
        else:
          r = peers.run_one(lib, w, args.steps, args.warmup, args.peers_dir, args.timeout)
        r["load_before"] = load
        runs.append(dict(round=rnd, library=lib, workload=w, result=r))
        s = _s(r)
        print(f"[round {rnd + 1}/{args.rounds}] {w:<5} {lib:<6} "
              + (f"{s:.3f} s/step" if s else f"FAILED: {str(r.get('error'))[:300]}")
              + f"  (load {load:.1f})", flush=True)

  table, verdict = render(runs, workloads, peer_names, extra)
  loads = [x["result"]["load_before"] for x in runs]
  meta = (f"{datetime.date.today()}, {platform.machine()} {os.cpu_count()} cores, "
          f"load average before each run {min(loads):.1f}-{max(loads):.1f}; medians of "
          f"{args.steps} timed steps after {args.warmup} warm-up steps, {args.rounds} round(s)")
  print("\n" + table + "\n\n" + meta)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "compare.json"), "w") as f:
    json.dump(dict(meta=meta, runs=runs), f, indent=2)
  with open(os.path.join(args.out, "compare.md"), "w") as f:
    f.write(table + "\n\n" + meta + "\n")
  print(f"wrote {args.out}/compare.md and compare.json")
  return 0 if verdict and all(verdict) else 1


if __name__ == "__main__":
  sys.exit(main())
