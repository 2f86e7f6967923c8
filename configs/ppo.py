"""PPO (actor-critic) for RLHF.

Presets (`--config=configs/ppo.py:PRESET`):
  tiny   the tiny CPU model on synthetic 1-digit addition with a verifiable math reward,
         started from a short SFT run of the same task (see configs/grpo.py):
           rlhf-jax train --config=configs/ppo.py:tiny --workdir=runs/ppo \\
               --config.init_from=runs/sft_add
  gsm8k  Llama-3.2-1B on GSM8K, FSDP over all devices of one host ("1b" is the same).
Real model sizes (rlhf_jax/presets.py) on GSM8K (prompts 256 + completions 512 tokens,
64 prompts x 4 samples per step, gradients accumulated over micro-batches of
rollout.train_micro_batch rows), each with its planned hardware and (data, fsdp, tensor)
mesh; the per-device memory estimate of the largest phase (train step, sampler KV
cache, log-prob pass; rlhf_jax/memory.py, docs/memory.md) fits 80% of its HBM.
PPO's separate critic is a second full model (params, gradients, AdamW state,
activations) in the same step; the estimate counts it.
  smollm2_135m  SmolLM2-135M, v5e-8, mesh (8, 1, 1) data parallel.
  llama3_2_1b   Llama-3.2-1B, 8xH100, mesh (1, 8, 1) FSDP (policy + critic estimate
                12.8 GB per chip: too close to v5e's 16 GiB).
  qwen2_5_1_5b  Qwen2.5-1.5B, 8xH100, mesh (1, 8, 1) FSDP.
  llama3_8b     Llama-3.1-8B, v5p-32 (16 chips, 4 hosts), mesh (1, 16, 1) FSDP.
Start every non-tiny preset from an SFT run or an instruct model:
  --config.init_from=runs/sft_gsm8k (or an HF dir / .gguf; the architecture then comes
  from the checkpoint) and --config.data.train_path=gsm8k_train.jsonl.
"""
from ml_collections import ConfigDict

from rlhf_jax import presets
from rlhf_jax.config import base_config
from rlhf_jax.presets import use_llama_1b

# size preset -> planned hardware
SIZES = {
    "smollm2_135m": dict(hardware="v5e-8"),
    "llama3_2_1b": dict(hardware="8xH100"),  # policy + critic: 12.8 GB on v5e-8, too tight
    "qwen2_5_1_5b": dict(hardware="8xH100"),
    "llama3_8b": dict(hardware="v5p-32"),
    "gemma3_1b": dict(hardware="v5e-8"),
    "gemma2_2b": dict(hardware="8xH100"),  # policy + critic: too tight on v5e-8
}


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
  if preset in ("gsm8k", "1b"):
    use_llama_1b(c)
  elif preset in SIZES:
    presets.apply(c, preset, SIZES[preset]["hardware"])
  if preset in ("gsm8k", "1b", *SIZES):
    c.data.update(source="gsm8k", max_prompt_len=256)
    c.rollout.update(prompts_per_step=64, group_size=4, max_new_tokens=512,
                     generate_micro_batch=64, logprob_micro_batch=32,
                     train_micro_batch=32)
    c.ppo.update(adaptive_kl=True)
    c.num_steps = 500
    c.optimizer.update(lr=1e-6)
    c.eval_every = 50
    c.eval_prompts = 512
    return c
  raise ValueError(f"unknown ppo preset {preset!r}; expected one of tiny, gsm8k, 1b, "
                   f"{', '.join(SIZES)}")
