"""Run by tests/test_async_rl.py in its own process with 8 simulated CPU devices.

Usage: async_rl_check.py WORKDIR
Tiny GRPO / PPO runs (2 steps, 8 prompts x 4 samples) with rollout.devices and
rollout.max_staleness; prints JSON: for GRPO k = 0, the largest differences between the
colocated run on 8 devices and the 4 + 4 disaggregated one (every metric but the timings,
every checkpoint leaf), and for each asynchronous + disaggregated run (PPO k = 1, RLOO k = 1,
REINFORCE++ k = 2) its last loss, staleness metrics and is/ keys.
"""
import json
import os
import sys

import jax
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "experiments", "reliability"))
import kill_resume as kr  # noqa: E402

from rlhf_jax.trainers import grpo, ppo  # noqa: E402

SMALL = {"num_steps": 2, "eval_every": 0, "checkpoint.every": 2, "rollout.prompts_per_step": 8,
         "rollout.group_size": 4}


def run(trainer, workdir, **extra):
  fn = {"grpo": grpo.run, "ppo": ppo.run}[trainer]
  fn(kr.config(trainer, **{**SMALL, **extra}), workdir)
  return kr.read_rows(os.path.join(workdir, "metrics.jsonl"))


def max_diffs(a_dir, b_dir, rows_a, rows_b):
  keys = sorted({k for r in rows_a for k in r if not kr.is_timing_key(k)})
  metric = max(abs(float(ra[k]) - float(rb[k])) for ra, rb in zip(rows_a, rows_b) for k in keys
               if k in ra and k in rb)
  missing = sorted({k for ra, rb in zip(rows_a, rows_b) for k in set(ra) ^ set(rb)
                    if not kr.is_timing_key(k)})  # keys one run logs at a step, the other not
  (_, a), (_, b) = kr.final_checkpoint(a_dir), kr.final_checkpoint(b_dir)
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  state = max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
              for x, y in zip(la, lb))
  return {"metric": metric, "state": state, "leaves": len(la), "same_leaves": len(la) == len(lb),
          "missing": missing, "rows": [len(rows_a), len(rows_b)]}


def main():
  root = sys.argv[1]
  assert jax.device_count() == 8, jax.device_count()
  out = {}
  co = os.path.join(root, "colocated")
  dis = os.path.join(root, "disaggregated")
  out["k0"] = max_diffs(co, dis, run("grpo", co), run("grpo", dis, **{"rollout.devices": 4}))
  for name, trainer, extra in (
      ("ppo", "ppo", {"rollout.max_staleness": 1}),
      ("rloo", "grpo", {"grpo.variant": "rloo", "rollout.max_staleness": 1}),
      ("reinforce_pp", "grpo", {"grpo.variant": "reinforce_pp", "rollout.max_staleness": 2,
                                "rollout.is_correction": "tis"})):
    rows = run(trainer, os.path.join(root, name), **{"rollout.devices": 4, **extra})
    out[name] = {"loss": rows[-1]["loss"], "staleness": [r["staleness"] for r in rows],
                 "is": sorted(k for k in rows[-1] if k.startswith("is/"))}
  print(json.dumps(out))


if __name__ == "__main__":
  main()
