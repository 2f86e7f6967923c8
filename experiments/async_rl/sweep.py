"""Learning with staleness: GRPO on the tiny addition task, synchronous (k = 0) vs
asynchronous rollouts one update old (`rollout.max_staleness = 1`) with and without the
off-policy correction (`rollout.is_correction = tis`, C = 2), 3 seeds each.

    rlhf-jax sweep experiments/async_rl/sweep.py --sweep_dir=runs/async_rl --parallel=1

Per seed a 60-step SFT policy on 1-digit addition (as experiments/online_rl_tiny) is the
start and the reference; then 120 GRPO steps of `configs/grpo.py:tiny`, held-out greedy
accuracy (128 prompts) every 20 steps. The arms differ only in the rollout knobs:

  grpo-max_staleness=0                          today's synchronous loop
  grpo-max_staleness=1,is_correction=none       the sampler one update behind, no correction
  grpo-max_staleness=1,is_correction=tis        ... with truncated importance weights

The report (DIR/report/report.md) gives each arm's final eval_accuracy with bootstrap and
Student-t CIs, P(X > Y) and the seeds a difference would need; is/logp_abs_diff and
is/clipped_frac (metrics.jsonl) show how far the stale sampler is from the trainer.
"""

SFT = dict(name="sft", config="configs/sft.py:tiny",
           overrides={"data.synthetic_task": "add", "data.synthetic_max_len": 2,
                      "num_steps": 60, "eval_every": 0})


def get_sweep(preset="tiny"):
  if preset != "tiny":
    raise ValueError(f"unknown preset {preset!r}; expected 'tiny'")
  base = dict(name="grpo", config="configs/grpo.py:tiny",
              overrides={"init_from": "{cell:sft}", "num_steps": 120, "eval_every": 20,
                         "checkpoint.every": 40})
  return dict(
      name="async_rl",
      seeds=[0, 1, 2],
      cells=[SFT],
      grid=[dict(base=base, axes={"rollout.max_staleness": [0]}),
            dict(base=base, axes={"rollout.max_staleness": [1],
                                  "rollout.is_correction": ["none", "tis"]})],
      report=dict(title="Learning with staleness: GRPO, k = 0 vs k = 1 (+ TIS / no "
                        "correction), 3 seeds", exclude=["sft"],
                  metrics=["eval_accuracy", "eval_reward", "eval_kl"]),
  )
