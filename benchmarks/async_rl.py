"""GRPO steps/s, synchronous (rollout.max_staleness = 0) vs asynchronous (k = 1), with the
sampler and the trainer on disjoint halves of 8 simulated CPU devices (rollout.devices = 4):
a benchmark, not a test.

Runs `--steps` steps of `configs/grpo.py:tiny` (from its random init; the step time does not
depend on what the policy knows) for each k, logging every step, and reports the rate over
the steps after the first `--warmup` (compilation): steps / (elapsed_s[last] -
elapsed_s[warmup]), and the medians of time/step and of the phases. With k = 1 the sampler
of step t+1 runs in a background thread while step t updates, so a step costs about
max(sampling, update + log-prob passes) instead of their sum -- on a CPU only as far as the
cores are free (all simulated devices share them). k >= 1 always runs the old-log-prob pass
(pi_old of the current parameters), which GRPO's one-update-per-rollout default skips at
k = 0: `--old_logps=recompute` makes k = 0 run it too, the same work.

    .venv/bin/python benchmarks/async_rl.py [--steps=30] [--warmup=5] [--devices=8] [--sampler=4]
        [--old_logps=recompute]
"""
import argparse
import os
import sys

ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, default=30)
ap.add_argument("--warmup", type=int, default=5)
ap.add_argument("--devices", type=int, default=8)
ap.add_argument("--sampler", type=int, default=4, help="rollout.devices")
ap.add_argument("--staleness", default="0,1")
ap.add_argument("--old_logps", default="auto",
                help="grpo.old_logps; recompute: k = 0 also runs the old-log-prob pass that "
                     "k >= 1 always runs (the same work)")
args = ap.parse_args()
os.environ["XLA_FLAGS"] = (f"{os.environ.get('XLA_FLAGS', '')} "
                           f"--xla_force_host_platform_device_count={args.devices}").strip()

import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from rlhf_jax.launch import load_config  # noqa: E402
from rlhf_jax.trainers import grpo  # noqa: E402


def run(k: int, tmp: str) -> dict:
  c = load_config("configs/grpo.py:tiny")
  c.update(num_steps=args.steps, log_every=1, eval_every=0)
  c.checkpoint.every = 10**9
  c.rollout.update(max_staleness=k, devices=args.sampler)
  c.grpo.old_logps = args.old_logps
  wd = os.path.join(tmp, f"k{k}")
  grpo.run(c, wd)
  with open(os.path.join(wd, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  timed = rows[args.warmup:]
  span = timed[-1]["elapsed_s"] - rows[args.warmup - 1]["elapsed_s"]
  med = lambda key: statistics.median(r[key] for r in timed)
  return {"steps_per_s": len(timed) / span, "step": med("time/step"),
          **{p: med(f"time/{p}") for p in ("generate", "logprobs", "update")},
          "config": c}


def main():
  ks = [int(k) for k in args.staleness.split(",")]
  with tempfile.TemporaryDirectory() as tmp:
    res = {k: run(k, tmp) for k in ks}
  r = res[ks[0]]["config"].rollout
  print(f"GRPO tiny preset: {r.prompts_per_step} prompts x G={r.group_size}, "
        f"max_new_tokens={r.max_new_tokens}; {jax.device_count()}x{jax.devices()[0].platform} "
        f"simulated ({args.sampler} sample, {jax.device_count() - args.sampler} train; "
        f"grpo.old_logps={args.old_logps}; "
        f"{platform.machine()}, {os.cpu_count()} cores); {args.steps - args.warmup} timed steps")
  print("k  steps/s  median s/step  generate  logprobs  update   (medians, s)")
  for k, x in res.items():
    print(f"{k}  {x['steps_per_s']:7.2f}  {x['step']:13.3f}  {x['generate']:8.3f}  "
          f"{x['logprobs']:8.3f}  {x['update']:6.3f}")
  if len(ks) == 2:
    print(f"speed-up k={ks[1]} vs k={ks[0]}: "
          f"{res[ks[1]]['steps_per_s'] / res[ks[0]]['steps_per_s']:.2f}x")


if __name__ == "__main__":
  main()
