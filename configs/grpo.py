"""The GRPO family of critic-free online RL (GRPO, Dr. GRPO, DAPO, GSPO, RLOO, REINFORCE++).

Presets (`--config=configs/grpo.py:PRESET`):
  tiny   the tiny CPU model on synthetic 1-digit addition with a verifiable math reward.
         Start it from a (deliberately short) SFT run of the same task, e.g.
           rlhf-jax train --config=configs/sft.py:tiny --workdir=runs/sft_add \\
               --config.data.synthetic_task=add --config.data.synthetic_max_len=2 \\
               --config.num_steps=60
           rlhf-jax train --config=configs/grpo.py:tiny --workdir=runs/grpo \\
               --config.init_from=runs/sft_add [--config.grpo.variant=dapo]
  gsm8k  a Llama-3.2-1B-shaped policy on GSM8K (set init_from and data.train_path).

Knobs at -1 / "" take the variant's value (table in rlhf_jax/trainers/grpo.py); the
resolved values are written to WORKDIR/resolved_algorithm.json.
"""
from ml_collections import ConfigDict

from rlhf_jax.config import base_config, use_llama_1b


def get_config(preset: str = "tiny") -> ConfigDict:
  c = base_config("grpo")
  c.grpo = ConfigDict(dict(
      variant="grpo",          # grpo | dr_grpo | dapo | gspo | rloo | reinforce_pp
      advantage="",            # group_std | group | rloo | reinforce_pp
      aggregation="",          # seq_mean_token_mean | token_mean | seq_mean_token_sum_norm |
                               # seq_mean_token_sum (see rlhf_jax/losses/ppo.py)
      clip_eps_low=-1.0,       # ratio clipped to [1 - low, 1 + high]
      clip_eps_high=-1.0,      # DAPO clip-higher: high > low
      importance="",           # token | sequence (GSPO)
      kl_mode="",              # loss (GRPO) | reward (RLOO, REINFORCE++) | none
      kl_coef=-1.0,            # beta
      kl_estimator="",         # k1 | k2 | k3
      dynamic_sampling=-1,     # 1: replace groups with identical rewards by fresh ones (DAPO)
      max_refill_rounds=3,     # dynamic sampling: extra prompt batches tried per step
      std_eps=1e-4,            # group advantages: (r - mean) / (std + eps)
      overlong_cache=0,        # DAPO soft overlong window (tokens); 0 = off (see reward.spec)
      epochs=1,                # passes over each rollout batch
      minibatches=1,           # optimizer steps per pass
  ))
  if preset == "tiny":
    return c
  if preset == "gsm8k":
    use_llama_1b(c)
    c.data.update(source="gsm8k", max_prompt_len=256)
    c.rollout.update(prompts_per_step=64, group_size=8, max_new_tokens=512,
                     generate_micro_batch=64, logprob_micro_batch=32)
    c.num_steps = 500
    c.optimizer.update(lr=1e-6)
    c.eval_every = 50
    c.eval_prompts = 512
    return c
  raise ValueError(f"unknown grpo preset {preset!r}; expected 'tiny' or 'gsm8k'")
