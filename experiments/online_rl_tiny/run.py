"""Online RL on the tiny CPU task: does RL raise verifiable accuracy above SFT?

Task: synthetic 1-digit addition ("add: 7+5" -> "12"), math reward 1/0 on the
final number. One short SFT run per seed (60 steps, ~25% greedy accuracy) is
the starting policy (and the reference); then each algorithm runs
`num_steps` from it with the same seed. Held-out greedy accuracy on 128
prompts is read from each run's metrics.jsonl.

    .venv/bin/python experiments/online_rl_tiny/run.py --algos=grpo,ppo --seeds=0,1,2

Writes OUT/results.md (table: start, end, best per run + mean over seeds) and
OUT/accuracy.png (held-out accuracy vs step, one line per run).
"""
import argparse
import json
import os
import time

import numpy as np

from rlhf_jax.launch import load_config
from rlhf_jax.trainers import grpo, ppo, sft

ALGOS = {"ppo": ("configs/ppo.py:tiny", None), "grpo": ("configs/grpo.py:tiny", "grpo"),
         "dr_grpo": ("configs/grpo.py:tiny", "dr_grpo"), "dapo": ("configs/grpo.py:tiny", "dapo"),
         "gspo": ("configs/grpo.py:tiny", "gspo"), "rloo": ("configs/grpo.py:tiny", "rloo"),
         "reinforce_pp": ("configs/grpo.py:tiny", "reinforce_pp")}


def evals(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [(r["step"], r["eval_accuracy"]) for r in map(json.loads, f) if "eval_accuracy" in r]


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--algos", default="grpo,ppo")
  ap.add_argument("--seeds", default="0,1,2")
  ap.add_argument("--out", default="runs/online_rl_tiny")
  ap.add_argument("--num_steps", type=int, default=120)
  args = ap.parse_args()
  os.makedirs(args.out, exist_ok=True)
  results = {}
  for seed in [int(s) for s in args.seeds.split(",")]:
    sft_wd = os.path.join(args.out, f"sft_seed{seed}")
    c = load_config("configs/sft.py:tiny")
    c.data.update(synthetic_task="add", synthetic_max_len=2)
    c.update(num_steps=60, eval_every=0, seed=seed)
    sft.run(c, sft_wd)
    for algo in args.algos.split(","):
      cfg_path, variant = ALGOS[algo]
      c = load_config(cfg_path)
      c.update(init_from=sft_wd, seed=seed, num_steps=args.num_steps)
      if variant:
        c.grpo.variant = variant
      wd = os.path.join(args.out, f"{algo}_seed{seed}")
      t0 = time.time()
      (ppo if algo == "ppo" else grpo).run(c, wd)
      results[(algo, seed)] = (evals(wd), time.time() - t0)

  lines = ["| algorithm | seed | SFT start | end | best | wall (s) |", "|---|---|---|---|---|---|"]
  summary = {}
  for (algo, seed), (ev, wall) in sorted(results.items()):
    acc = [a for _, a in ev]
    lines.append(f"| {algo} | {seed} | {acc[0]:.3f} | {acc[-1]:.3f} | {max(acc):.3f} | "
                 f"{wall:.0f} |")
    summary.setdefault(algo, []).append((acc[0], acc[-1]))
  lines += ["", "| algorithm | mean start | mean end (± std over seeds) |", "|---|---|---|"]
  for algo, v in summary.items():
    v = np.asarray(v)
    lines.append(f"| {algo} | {v[:, 0].mean():.3f} | {v[:, 1].mean():.3f} ± "
                 f"{v[:, 1].std():.3f} |")
  with open(os.path.join(args.out, "results.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))

  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4))
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for i, algo in enumerate(summary):
    for (a, seed), (ev, _) in sorted(results.items()):
      if a == algo:
        s, acc = zip(*ev)
        ax.plot(s, acc, color=colors[i % len(colors)], alpha=0.8,
                label=algo if seed == min(k[1] for k in results if k[0] == algo) else None)
  ax.set_xlabel("RL step")
  ax.set_ylabel("held-out greedy accuracy")
  ax.set_title("1-digit addition from a 60-step SFT policy (step 0 = SFT)")
  ax.legend()
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(os.path.join(args.out, "accuracy.png"), dpi=120)


if __name__ == "__main__":
  main()
