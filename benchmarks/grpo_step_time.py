"""GRPO step time on the tiny preset (a benchmark, not a test).

Runs a 20-step SFT policy, then `--steps` GRPO steps of `configs/grpo.py:tiny`
logging every step, and reports medians over the steps after the first
`--warmup` (which include compilation): seconds per step and its split
(generation / reward / old+ref log-probs / update) and rollout tokens/s.

    .venv/bin/python benchmarks/grpo_step_time.py [--variant=grpo]
"""
import argparse
import json
import os
import platform
import statistics
import tempfile

import jax

from rlhf_jax.launch import load_config
from rlhf_jax.trainers import grpo, sft


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--variant", default="grpo")
  ap.add_argument("--steps", type=int, default=25)
  ap.add_argument("--warmup", type=int, default=5)
  args = ap.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    c = load_config("configs/sft.py:tiny")
    c.data.update(synthetic_task="add", synthetic_max_len=2)
    c.update(num_steps=20, eval_every=0)
    c.optimizer.warmup_steps = 2
    sft.run(c, os.path.join(tmp, "sft"))
    c = load_config("configs/grpo.py:tiny")
    c.update(init_from=os.path.join(tmp, "sft"), num_steps=args.steps, log_every=1,
             eval_every=0)
    c.grpo.variant = args.variant
    c.checkpoint.every = 10**9
    grpo.run(c, os.path.join(tmp, "grpo"))
    with open(os.path.join(tmp, "grpo", "metrics.jsonl")) as f:
      rows = [json.loads(line) for line in f][args.warmup:]
  med = lambda k: statistics.median(r[k] for r in rows)
  r = c.rollout
  print(f"GRPO [{args.variant}] tiny preset: {r.prompts_per_step} prompts x G={r.group_size}, "
        f"max_new_tokens={r.max_new_tokens}; {jax.device_count()}x{jax.devices()[0].platform} "
        f"({platform.machine()}, {os.cpu_count()} cores); medians over {len(rows)} steps")
  step = med("time/step")
  print(f"seconds per step: {step:.3f}")
  for k in ("generate", "reward", "logprobs", "update"):
    t = med(f"time/{k}")
    print(f"  {k:<9} {t:.3f} s  ({100 * t / step:.0f}%)")
  print(f"rollout tokens/s (generated, during generation): {med('rollout_tokens_per_second'):,.0f}")
  print(f"train tokens/s (prompt + completion, during update): "
        f"{med('train_tokens_per_second'):,.0f}")


if __name__ == "__main__":
  main()
