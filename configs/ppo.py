"""PPO (actor-critic) for RLHF.

Presets (`--config=configs/ppo.py:PRESET`):
  tiny   the tiny CPU model on synthetic 1-digit addition with a verifiable math reward,
         started from a short SFT run of the same task (see configs/grpo.py):
           rlhf-jax train --config=configs/ppo.py:tiny --workdir=runs/ppo \\
               --config.init_from=runs/sft_add
  gsm8k  a Llama-3.2-1B-shaped policy on GSM8K (set init_from and data.train_path).
"""
from ml_collections import ConfigDict

from rlhf_jax.config import base_config, use_llama_1b


def get_config(preset: str = "tiny") -> ConfigDict:
  c = base_config("ppo")
  c.ppo = ConfigDict(dict(
      critic="separate",       # separate: own network (backbone from the policy or
                               # critic_init); shared: scalar head on the policy's hidden states
      critic_init="",          # workdir of a reward model to initialise the separate critic
      gamma=1.0,               # GAE discount
      lam=0.95,                # GAE lambda
      whiten_advantages=True,  # masked batch whitening of the advantages
      whiten_rewards=False,    # whiten the scores over the batch (no mean shift)
      clip_eps=0.2,            # policy ratio clip
      clip_eps_high=-1.0,      # > 0: separate upper clip (clip-higher); -1 = clip_eps
      dual_clip=-1.0,          # > 1: dual clip constant c for negative advantages; -1 = off
      value_clip_eps=0.2,      # value clip around the old values; -1 = off
      vf_coef=0.1,             # value-loss weight
      entropy_coef=0.0,        # entropy bonus weight
      aggregation="token_mean",  # how token losses are averaged (rlhf_jax/losses/ppo.py)
      kl_coef=0.05,            # beta of the per-token KL penalty in the reward (initial if adaptive)
      kl_estimator="k1",       # k1 | k2 | k3 for the reward penalty
      adaptive_kl=False,       # Ziegler et al. adaptive controller
      kl_target=6.0,           # controller target (per-sequence KL, nats)
      kl_horizon=10000,        # controller horizon (samples)
      epochs=2,                # passes over each rollout batch
      minibatches=2,           # optimizer steps per pass
  ))
  if preset == "tiny":
    return c
  if preset == "gsm8k":
    use_llama_1b(c)
    c.data.update(source="gsm8k", max_prompt_len=256)
    c.rollout.update(prompts_per_step=64, group_size=4, max_new_tokens=512,
                     generate_micro_batch=64, logprob_micro_batch=32)
    c.ppo.update(adaptive_kl=True)
    c.num_steps = 500
    c.optimizer.update(lr=1e-6)
    c.eval_every = 50
    c.eval_prompts = 512
    return c
  raise ValueError(f"unknown ppo preset {preset!r}; expected 'tiny' or 'gsm8k'")
