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
  if preset == "long":
    return long_sweep()
  if preset != "tiny":
    raise ValueError(f"unknown preset {preset!r}; expected 'tiny' or 'long'")
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


def long_sweep():
  """Slower optimisation for longer, to resolve the early *rise* of the gold reward and
  the fall after it: GRPO without a KL penalty at lr 1e-4 against three proxies trained
  on the same pairs for 500 ("weak", ~0.90 held-out pairwise accuracy), 550 ("medium")
  and 600 steps ("strong", ~0.99) -- 3 seeds each, evaluated on 8 samples per prompt
  (800 gold / proxy samples per point). The weak proxy is exploited at once (300 steps
  suffice); the others run 1500 steps, and the medium one also 3000 steps at lr 3e-4.
  ~32 min on 2 cores with --parallel=2."""
  prep = {c["name"]: c for c in FLAGSHIP["tiny"]()}
  rms = {"weak": (500, 300, 15), "medium": (550, 1500, 50), "strong": (600, 1500, 50)}
  cells = [prep["data"], prep["pretrain"], prep["sft"], prep["pairs"]]
  for tag, (rm_steps, _, _) in rms.items():
    cells.append(dict(prep["rm"], name=f"rm_{tag}",
                      overrides={**prep["rm"]["overrides"], "num_steps": rm_steps}))
  # (arm name, proxy, lr, steps, eval every): the medium proxy once more at 3x the lr and
  # 2x the steps, to push the policy further from SFT than lr 1e-4 does in 1500 steps.
  arms = [(f"grpo_{tag}_rm", tag, 1e-4, rl_steps, every)
          for tag, (_, rl_steps, every) in rms.items()]
  arms.append(("grpo_medium_rm_lr3e-4", "medium", 3e-4, 3000, 100))
  grid = []
  for name, tag, lr, rl_steps, every in arms:
    base = dict(prep["grpo_rm"])
    base["name"] = name
    proxy = FLAGSHIP["PROXY"].replace("{cell:rm}", f"{{cell:rm_{tag}}}")
    gold_proxy = FLAGSHIP["GOLD_PROXY"].replace("{cell:rm}", f"{{cell:rm_{tag}}}")
    base["depends"] = [f"rm_{tag}"]
    base["overrides"] = {**base["overrides"], "reward.spec": proxy,
                         "eval_reward_spec": gold_proxy, "num_steps": rl_steps,
                         "eval_every": every, "checkpoint.every": 5 * every,
                         "optimizer.lr": lr, "capability.path": "", "eval_samples": 8}
    grid.append(dict(base=base, axes={"grpo.kl_coef": [0.0]}))
  return dict(
      name="overoptimization_long",
      seeds=[0, 1, 2],
      cells=cells,
      grid=grid,
      report=dict(
          title="Over-optimisation, slow and long: GRPO (lr 1e-4, no KL penalty) against a "
                "weak, a medium and a strong proxy RM, 3 seeds",
          exclude=["data", "pretrain", "sft", "pairs", "rm_weak", "rm_medium", "rm_strong"],
          gold="eval_sampled_reward/gold", proxy="eval_sampled_reward/proxy", kl="eval_kl",
          metrics=["eval_sampled_reward/gold", "eval_sampled_reward/proxy", "eval_kl",
                   "eval_reward/gold", "eval_length"]),
  )
