"""Peer throughput harness (issue #7): TRL (PyTorch) and Tunix (JAX) doing the workloads
of `spec.py`, each in its own virtual environment.

  python experiments/throughput/peers.py [--peers=trl,tunix] [--workloads=sft,dpo,grpo]
      [--steps=10] [--warmup=3] [--peers_dir=.peers] [--out=peers.json] [--timeout=900]

Run it with the project's python; it runs `peer_<peer>.py --workload=W` with the peer's
python (`PEERS_DIR/<peer>/bin/python`, made by `bash experiments/throughput/setup_peers.sh`)
in a subprocess, one at a time (the machine has two cores), collects each JSON result and
prints a table. A missing peer venv, a timeout or a crash fills that row with the error;
the other rows still run. --out writes every row (the peer scripts' full JSON) to a file.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
import spec  # noqa: E402

PEERS = ("trl", "tunix")
SETUP_HINT = "bash experiments/throughput/setup_peers.sh"


def peer_python(peers_dir, peer):
  return os.path.join(peers_dir, peer, "bin", "python")


def check_peer(peers_dir, peer):
  """None when the peer venv is usable, else the reason it is not."""
  py = peer_python(peers_dir, peer)
  if not os.path.exists(py):
    return f"peer venv missing ({py}): run `{SETUP_HINT}`"
  if not os.path.exists(os.path.join(peers_dir, peer, ".installed")):
    return f"peer venv incomplete ({os.path.join(peers_dir, peer)} has no .installed): run `{SETUP_HINT}`"
  return None


def run_one(peer, workload, steps, warmup, peers_dir, timeout, log_dir=None, env=None):
  """Runs one peer x workload; returns its result dict (with `error` set on failure)."""
  row = dict(peer=peer, workload=workload, error=None, peer_env=dict(env or {}))
  bad = check_peer(peers_dir, peer)
  if bad:
    row["error"] = bad
    return row
  with tempfile.TemporaryDirectory(prefix="peers_") as tmp:
    out = os.path.join(tmp, "result.json")
    cmd = [peer_python(peers_dir, peer), os.path.join(HERE, f"peer_{peer}.py"),
           f"--workload={workload}", f"--steps={steps}", f"--warmup={warmup}", f"--out={out}"]
    t0 = time.time()
    try:
      p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired as e:
      row["error"] = f"timeout after {timeout}s"
      _save_log(log_dir, peer, workload, e.stdout, e.stderr)
      return row
    row["run_wall_s"] = time.time() - t0
    _save_log(log_dir, peer, workload, p.stdout, p.stderr)
    if p.returncode != 0 or not os.path.exists(out):
      tail = [ln for ln in (p.stderr or p.stdout or "").strip().splitlines() if ln.strip()]
      row["error"] = f"exit {p.returncode}: " + (tail[-1][:300] if tail else "(no output)")
      return row
    with open(out) as f:
      row.update(json.load(f))
  row["error"] = None
  return row


def _save_log(log_dir, peer, workload, stdout, stderr):
  if not log_dir:
    return
  os.makedirs(log_dir, exist_ok=True)
  with open(os.path.join(log_dir, f"{peer}_{workload}.log"), "w") as f:
    for s in (stdout, stderr):
      if s:
        f.write(s if isinstance(s, str) else s.decode(errors="replace"))


def _fmt(x, spec_="{:.3f}"):
  return "-" if x is None else spec_.format(x)


def table(rows):
  head = ["peer", "workload", "s/step (median)", "tok/s", "gen s/step", "gen share",
          "load avg (1m)", "note"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    if r.get("error"):
      cells = [r["peer"], r["workload"], "-", "-", "-", "-", "-", "FAILED: " + r["error"]]
    else:
      v = r.get("versions", {})
      note = ", ".join(f"{k} {v[k]}" for k in ("trl", "torch", "tunix", "jax") if k in v)
      note += "".join(f", {k}={val}" for k, val in r.get("peer_env", {}).items())
      cells = [r["peer"], r["workload"], _fmt(r["s_per_step"]), _fmt(r["tokens_per_s"], "{:.0f}"),
               _fmt(r.get("gen_s_per_step")),
               _fmt(r.get("gen_share"), "{:.0%}") if r.get("gen_share") is not None else "-",
               _fmt(r.get("machine", {}).get("loadavg", [None])[0], "{:.1f}"), note]
    lines.append("| " + " | ".join(str(c) for c in cells) + " |")
  return "\n".join(lines)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--peers", default=",".join(PEERS))
  ap.add_argument("--workloads", default=",".join(spec.WORKLOADS))
  ap.add_argument("--steps", type=int, default=spec.TIMED_STEPS)
  ap.add_argument("--warmup", type=int, default=spec.WARMUP_STEPS)
  ap.add_argument("--peers_dir", default=os.path.join(ROOT, ".peers"))
  ap.add_argument("--timeout", type=int, default=900, help="seconds per peer x workload")
  ap.add_argument("--out", default=None, help="write all rows as JSON here")
  ap.add_argument("--log_dir", default=None, help="keep each peer run's stdout/stderr here")
  ap.add_argument("--peer_env", action="append", default=[], metavar="KEY=VALUE",
                  help="extra environment for the peer runs (repeatable), e.g. "
                       "OMP_WAIT_POLICY=PASSIVE: torch's spinning OpenMP threads lose several "
                       "times their speed when other jobs share the two cores (see PEERS.md)")
  a = ap.parse_args(argv)
  env = {}
  for kv in a.peer_env:
    if "=" not in kv:
      ap.error(f"--peer_env wants KEY=VALUE, got {kv!r}")
    k, v = kv.split("=", 1)
    env[k] = v
  peers = [p for p in a.peers.split(",") if p]
  workloads = [w for w in a.workloads.split(",") if w]
  for p in peers:
    if p not in PEERS:
      ap.error(f"unknown peer {p!r} (known: {', '.join(PEERS)})")
  for w in workloads:
    if w not in spec.WORKLOADS:
      ap.error(f"unknown workload {w!r} (known: {', '.join(spec.WORKLOADS)})")
  missing = {p: check_peer(a.peers_dir, p) for p in peers}
  for p, why in missing.items():
    if why:
      print(f"[peers] {p}: {why}", file=sys.stderr, flush=True)
  rows = []
  for p in peers:
    for w in workloads:
      print(f"[peers] {p} {w} (load avg {os.getloadavg()[0]:.1f}) ...", file=sys.stderr, flush=True)
      r = run_one(p, w, a.steps, a.warmup, a.peers_dir, a.timeout, a.log_dir, env)
      msg = (f"FAILED: {r['error']}" if r["error"]
             else f"{r['s_per_step']:.3f} s/step, {r['tokens_per_s']:.0f} tok/s")
      print(f"[peers] {p} {w}: {msg}", file=sys.stderr, flush=True)
      rows.append(r)
      if a.out:   # keep partial results if a later row hangs or the run is stopped
        with open(a.out, "w") as f:
          json.dump(rows, f, indent=1)
  print(table(rows))
  return 0 if all(not r["error"] for r in rows) else 1


if __name__ == "__main__":
  sys.exit(main())
