"""A refactor changes no result: the same tiny runs in two checkouts, compared bit for bit.

For every trainer's tiny preset (SFT, reward model, PRM, DPO with every loss type, PPO,
every GRPO variant, LoRA SFT and LoRA DPO), shortened to a few steps, this runs
`python -m rlhf_jax.launch train` once in each checkout (its own code: the checkout is
the working directory and first on PYTHONPATH) and compares

  metrics   every row of metrics.jsonl, wall-clock keys excluded (time/*, elapsed_s,
            *tokens_per_second: `experiments/reliability/kill_resume.is_timing_key`);
  state     every leaf of the final checkpoint (params, optimizer state, step, loop
            counters): same path, dtype, shape and bytes.

Usage (two checkouts of the repository, e.g. `git worktree add /tmp/before HEAD~3`):
  .venv/bin/python experiments/bitwise/compare_checkouts.py --before=/tmp/before \\
      --after=. [--cells=sft,dpo_sigmoid,...] [--steps=6] [--out=runs/bitwise]

Prints one row per cell and writes OUT/results.json; exits 1 if any cell differs or
fails. Both checkouts run with this interpreter (same jax build), one cell at a time.
About 1 minute per cell and checkout on a 2-core CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(REPO, "experiments", "reliability"))
import kill_resume as kr  # noqa: E402  (is_timing_key, final_checkpoint, trees_equal)

DPO_LOSSES = ("sigmoid", "robust", "ipo", "hinge", "simpo", "orpo", "kto")
GRPO_VARIANTS = ("grpo", "dr_grpo", "dapo", "gspo", "rloo", "reinforce_pp")


def cells(steps: int) -> dict:
  """name -> (config spec, overrides): the tiny presets, `steps` optimizer / RL steps."""
  short = {"num_steps": steps, "log_every": 1, "checkpoint.every": steps,
           "checkpoint.async_save": False}
  sup = {**short, "eval_every": steps, "optimizer.warmup_steps": 1,
         "data.synthetic_train_examples": 256, "data.synthetic_eval_examples": 32}
  rl = {**short, "eval_every": steps, "eval_prompts": 4, "eval_samples": 2,
        "reward.spec": kr.RL_REWARD, "data.synthetic_train_examples": 128,
        "data.synthetic_eval_examples": 16}
  out = {
      "sft": ("configs/sft.py:tiny", {**sup, "sample.every": steps, "eval_kl": False}),
      "rm": ("configs/rm.py:tiny", sup),
      "prm": ("configs/prm.py:tiny", {**short, "eval_every": steps, "optimizer.warmup_steps": 1,
                                     "data.max_train_examples": 64,
                                     "data.max_eval_examples": 16}),
      "ppo": ("configs/ppo.py:tiny", rl),
      "lora_sft": ("configs/sft.py:tiny", {**sup, "eval_kl": False, "lora.rank": 4}),
      "lora_dpo": ("configs/dpo.py:tiny", {**sup, "eval_kl": False, "lora.rank": 4}),
      # exact gradient accumulation (two micro-batches) through each trainer's step
      "sft_accum": ("configs/sft.py:tiny", {**sup, "eval_kl": False, "grad_accum_steps": 2}),
      "rm_accum": ("configs/rm.py:tiny", {**sup, "grad_accum_steps": 2}),
      "dpo_accum": ("configs/dpo.py:tiny", {**sup, "eval_kl": False, "grad_accum_steps": 2}),
  }
  for loss in DPO_LOSSES:
    out[f"dpo_{loss}"] = ("configs/dpo.py:tiny", {**sup, "eval_kl": False,
                                                  "dpo.loss_type": loss})
  for variant in GRPO_VARIANTS:
    out[f"grpo_{variant}"] = ("configs/grpo.py:tiny", {**rl, "grpo.variant": variant})
  return out


def run_cell(checkout: str, spec: str, overrides: dict, workdir: str, log: str) -> tuple:
  argv = [sys.executable, "-m", "rlhf_jax.launch", "train",
          f"--config={os.path.join(checkout, spec)}", f"--workdir={workdir}"]
  argv += [f"--config.{k}={kr._flag(v)}" for k, v in overrides.items()]
  env = {k: v for k, v in os.environ.items()
         if k not in ("RLHF_JAX_FAULT", "RLHF_JAX_NAN_STEPS", "XLA_FLAGS")}
  env.update(PYTHONPATH=checkout, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  # real data (PRM: GSM8K) from this repository's ../shared/data, wherever the checkouts are
  env.setdefault("RLHF_JAX_DATA", os.path.join(os.path.dirname(REPO), "shared", "data"))
  t0 = time.time()
  with open(log, "w") as f:
    rc = subprocess.run(argv, cwd=checkout, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
  return rc, time.time() - t0


def metric_rows(workdir: str, added=()) -> list[dict]:
  """metrics.jsonl rows without wall-clock keys, nor keys starting with a prefix in `added`
  (metrics a feature added on purpose: every other value must still be equal)."""
  keep = lambda k: not kr.is_timing_key(k) and not k.startswith(tuple(added))
  return [{k: v for k, v in r.items() if keep(k)}
          for r in kr.read_rows(os.path.join(workdir, "metrics.jsonl"))]


def rename_leaves(tree: dict, key_map) -> dict:
  """`tree` {leaf path: array} with each path starting with OLD renamed to start with NEW,
  for (OLD, NEW) in key_map (the first that matches): a deliberate move of checkpoint
  leaves, e.g. the optimizer state wrapped in a guard, whose values must stay equal."""
  out = {}
  for k, v in tree.items():
    for old, new in key_map:
      if k.startswith(old):
        k = new + k[len(old):]
        break
    out[k] = v
  return out


def compare_cell(a: str, b: str, key_map=(), added=()) -> dict:
  ra, rb = metric_rows(a, added), metric_rows(b, added)
  diff_rows = [i for i, (x, y) in enumerate(zip(ra, rb)) if x != y]
  first = None
  if diff_rows:
    x, y = ra[diff_rows[0]], rb[diff_rows[0]]
    first = {k: (x.get(k), y.get(k)) for k in sorted(set(x) | set(y)) if x.get(k) != y.get(k)}
  sa, ta = kr.final_checkpoint(a)
  sb, tb = kr.final_checkpoint(b)
  ta = rename_leaves(ta, key_map)
  bad_leaves = sorted(k for k in set(ta) | set(tb)
                      if k not in ta or k not in tb or not kr.trees_equal({k: ta[k]}, {k: tb[k]}))
  return {"metrics_equal": len(ra) == len(rb) and not diff_rows, "rows": [len(ra), len(rb)],
          "first_diff_row": diff_rows[0] if diff_rows else None, "first_diff": first,
          "checkpoint_equal": sa == sb and not bad_leaves, "steps": [sa, sb],
          "leaves": len(ta), "differing_leaves": bad_leaves[:10]}


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--before", required=True, help="checkout before the change")
  ap.add_argument("--after", default=REPO, help="checkout after the change (default: this one)")
  ap.add_argument("--cells", default="", help="comma-separated subset of: "
                  + ", ".join(cells(1)))
  ap.add_argument("--steps", type=int, default=6)
  ap.add_argument("--out", default=os.path.join(REPO, "runs", "bitwise"))
  ap.add_argument("--map", action="append", default=[], metavar="OLD=NEW",
                  help="a deliberate move of checkpoint leaves: the before-checkout's leaf "
                  "paths starting with OLD are compared with the after-checkout's starting "
                  "with NEW (repeatable; paths as jax.tree_util.keystr, e.g. "
                  "\"['loop']=['opt_state']\")")
  ap.add_argument("--added", action="append", default=[], metavar="PREFIX",
                  help="metrics keys starting with PREFIX (repeatable) are left out of the "
                  "comparison: metrics a change added on purpose, e.g. flops/")
  a = ap.parse_args(argv)
  key_map = []
  for m in a.map:
    old, sep, new = m.partition("=")
    if not sep or not old:
      raise SystemExit(f"--map={m!r}: expected OLD=NEW (leaf path prefixes)")
    key_map.append((old, new))
  table = cells(a.steps)
  names = [c for c in a.cells.split(",") if c] or list(table)
  unknown = [c for c in names if c not in table]
  if unknown:
    raise SystemExit(f"--cells: unknown {unknown}; expected some of {', '.join(table)}")
  checkouts = {"before": os.path.abspath(a.before), "after": os.path.abspath(a.after)}
  for side, path in checkouts.items():
    if not os.path.isfile(os.path.join(path, "rlhf_jax", "launch.py")):
      raise SystemExit(f"--{side}={path}: not a checkout of this repository "
                       f"(no rlhf_jax/launch.py)")
  results, ok = {}, True
  print(f"{'cell':22s} {'metrics':8s} {'state':8s} rows  leaves  s(before/after)")
  for name in names:
    spec, overrides = table[name]
    r = {}
    for side, path in checkouts.items():
      wd = os.path.join(a.out, side, name)
      if os.path.exists(wd):
        raise SystemExit(f"{wd} exists: choose another --out (runs are never overwritten)")
      os.makedirs(os.path.dirname(wd), exist_ok=True)
      r[side] = run_cell(path, spec, overrides, wd, wd + ".log")
    if any(rc for rc, _ in r.values()):
      res = {"error": {s: f"exit {rc}, log {os.path.join(a.out, s, name)}.log"
                       for s, (rc, _) in r.items() if rc}}
      print(f"{name:22s} FAILED   {res['error']}")
    else:
      res = compare_cell(os.path.join(a.out, "before", name), os.path.join(a.out, "after", name),
                         key_map, a.added)
      print(f"{name:22s} {'equal' if res['metrics_equal'] else 'DIFFER':8s} "
            f"{'equal' if res['checkpoint_equal'] else 'DIFFER':8s} {res['rows'][1]:4d}  "
            f"{res['leaves']:6d}  {r['before'][1]:.0f}/{r['after'][1]:.0f}", flush=True)
      if res["first_diff"]:
        print(f"    first differing metrics row {res['first_diff_row']}: {res['first_diff']}")
      if res["differing_leaves"]:
        print(f"    differing checkpoint leaves: {res['differing_leaves']}")
    res["seconds"] = {s: t for s, (_, t) in r.items()}
    results[name] = res
    ok &= "error" not in res and res["metrics_equal"] and res["checkpoint_equal"]
  with open(os.path.join(a.out, "results.json"), "w") as f:
    json.dump({"checkouts": checkouts, "steps": a.steps, "map": key_map, "added": a.added,
               "cells": results}, f,
              indent=1)
  print("ALL EQUAL" if ok else "SOME CELLS DIFFER OR FAILED", f"({len(names)} cells)")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
