"""Reward over-optimisation (Gao et al. 2022, "Scaling Laws for Reward Model
Overoptimization"): optimise a policy hard against a *proxy* reward model and
watch the *gold* reward rise, then fall, while the proxy keeps rising.

    rlhf-jax sweep experiments/overoptimization/sweep.py:tiny --sweep_dir=runs/overopt --parallel=2

It reuses the flagship's data / pre-training / SFT / pair-labelling stages
(experiments/ppo_vs_grpo_vs_dpo), trains the proxy RM longer than the flagship
does (600 steps: ~0.99 pairwise accuracy on held-out on-policy pairs -- still an
imperfect proxy off the SFT distribution, as every real RM is), then runs GRPO
(lr 3e-4) against it for 120 steps at three KL coefficients (`grpo.kl_coef`, k3
estimator in the loss; 0 = unconstrained), 2 seeds each, evaluated every 10 steps. The
report plots gold and proxy reward against d = sqrt(KL(pi || pi_SFT)) and fits the
paper's RL form R_gold(d) = d (alpha - beta log d) to the gold-reward gain.
"""
import os
import runpy

HERE = os.path.dirname(os.path.abspath(__file__))
FLAGSHIP = runpy.run_path(os.path.join(HERE, "..", "ppo_vs_grpo_vs_dpo", "sweep.py"))
KL_COEFS = (0.0, 0.02, 0.1)


def get_sweep(preset="tiny"):
  if preset != "tiny":
    raise ValueError(f"unknown preset {preset!r}; expected 'tiny'")
  p = dict(FLAGSHIP["TINY"], rm_steps=600, rl_steps=120, eval_every=10)
  prep = {c["name"]: c for c in FLAGSHIP["tiny"]()}
  rm = dict(prep["rm"], overrides={**prep["rm"]["overrides"], "num_steps": p["rm_steps"]})
  proxy = FLAGSHIP["PROXY"]
  base = dict(prep["grpo_rm"])
  base["name"] = "grpo"
  base["overrides"] = {**base["overrides"], "reward.spec": proxy, "num_steps": p["rl_steps"],
                       "eval_every": p["eval_every"], "checkpoint.every": 40,
                       "optimizer.lr": 3e-4, "capability.path": ""}
  return dict(
      name="overoptimization",
      seeds=[0, 1],
      cells=[prep["data"], prep["pretrain"], prep["sft"], prep["pairs"], rm],
      grid=[dict(base=base, axes={"grpo.kl_coef": list(KL_COEFS)})],
      report=dict(
          title="Over-optimisation of a proxy reward model (GRPO, 2 seeds per KL coefficient)",
          exclude=["data", "pretrain", "sft", "pairs", "rm"],
          gold="eval_sampled_reward/gold", proxy="eval_sampled_reward/proxy", kl="eval_kl",
          metrics=["eval_sampled_reward/gold", "eval_sampled_reward/proxy", "eval_kl",
                   "eval_reward/gold", "eval_length"]),
  )
