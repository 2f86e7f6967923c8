"""How our step time grows (issue #7, item 5): seconds/step of our trainers on the spec's
workloads as batch, sequence length, GRPO group size and model width double (CPU).

    .venv/bin/python experiments/throughput/scaling.py [--steps=5] [--warmup=2]
        [--out=runs/throughput/scaling.md]

Each row is one run of bench.py's worker (a fresh process) with one knob changed from
the spec; "x spec" is the time relative to the spec row measured in the same run.
Linear cost would double per doubling; attention adds a quadratic term in sequence
length; width doubles the matmul FLOPs ~4x.
"""
from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench  # noqa: E402

STUDY = [  # (workload, label, overrides)
    ("sft", "spec (batch 16 x 128)", {}),
    ("sft", "batch 32", {"batch_size": 32}),
    ("sft", "batch 64", {"batch_size": 64}),
    ("sft", "seq 256", {"data.max_seq_len": 256}),
    ("sft", "seq 512", {"data.max_seq_len": 512, "model.max_seq_len": 512}),
    ("sft", "width 512 (d_ff 2048, 8 heads)", {"model.d_model": 512, "model.d_ff": 2048,
                                             "model.n_heads": 8, "model.n_kv_heads": 4}),
    ("grpo", "spec (8 prompts x G=4, 64 new)", {}),
    ("grpo", "group 8", {"rollout.group_size": 8}),
    ("grpo", "group 16", {"rollout.group_size": 16}),
    ("grpo", "128 new tokens", {"rollout.max_new_tokens": 128}),
]


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--out", default=os.path.join(bench.REPO, "runs", "throughput", "scaling.md"))
  args = ap.parse_args(argv)
  lines = ["| workload | change | s/step | x spec | tokens/s | gen share |", "|---|---|---|---|---|---|"]
  base = {}
  for workload, label, over in STUDY:
    r = bench.run_ours(workload, args.steps, args.warmup, overrides=over)
    if r.get("error"):
      row = f"| {workload} | {label} | FAILED | - | - | - |"
    else:
      s = r["seconds_per_step"]
      base.setdefault(workload, s)
      gen = f"{r['generation_share']:.0%}" if "generation_share" in r else "-"
      row = (f"| {workload} | {label} | {s:.3f} | {s / base[workload]:.2f} | "
             f"{r.get('tokens_per_s', 0):,.0f} | {gen} |")
    print(row, flush=True)
    lines.append(row)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    f.write("\n".join(lines) + "\n")
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
