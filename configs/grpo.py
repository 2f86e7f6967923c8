"""The GRPO family of critic-free online RL (GRPO, Dr. GRPO, DAPO, GSPO, RLOO, REINFORCE++).

Presets (`--config=configs/grpo.py:PRESET`):
  tiny   the tiny CPU model on synthetic 1-digit addition with a verifiable math reward.
         Start it from a (deliberately short) SFT run of the same task, e.g.
           rlhf-jax train --config=configs/sft.py:tiny --workdir=runs/sft_add \\
               --config.data.synthetic_task=add --config.data.synthetic_max_len=2 \\
               --config.num_steps=60
           rlhf-jax train --config=configs/grpo.py:tiny --workdir=runs/grpo \\
               --config.init_from=runs/sft_add [--config.grpo.variant=dapo]
  gsm8k  Llama-3.2-1B on GSM8K, FSDP over all devices of one host ("1b" is the same).
Real model sizes (rlhf_jax/presets.py) on GSM8K (prompts 256 + completions 512 tokens,
64 prompts x 8 samples per step, gradients accumulated over micro-batches of
rollout.train_micro_batch rows), each with its planned hardware and (data, fsdp, tensor)
mesh; the per-device memory estimate of the largest phase (train step, sampler KV
cache, log-prob pass; rlhf_jax/memory.py, docs/memory.md) fits 80% of its HBM. Log-probs
are chunked (model.logits_chunk=512), which lets gsm8k run with
--config.rollout.max_new_tokens=4096 --config.model.max_seq_len=4352 on v5e-8.
  smollm2_135m  SmolLM2-135M, v5e-8, mesh (8, 1, 1) data parallel.
  llama3_2_1b   Llama-3.2-1B, v5e-8, mesh (1, 8, 1) FSDP.
  qwen2_5_1_5b  Qwen2.5-1.5B, 8xH100, mesh (1, 8, 1) FSDP.
  llama3_8b     Llama-3.1-8B, v5p-32 (16 chips, 4 hosts), mesh (1, 16, 1) FSDP.
Start every non-tiny preset from an SFT run or an instruct model:
  --config.init_from=runs/sft_gsm8k (or an HF dir / .gguf; the architecture then comes
  from the checkpoint) and --config.data.train_path=gsm8k_train.jsonl.

Knobs at -1 / "" take the variant's value (table in rlhf_jax/trainers/grpo.py); the
resolved values are written to WORKDIR/resolved_algorithm.json.
"""
from ml_collections import ConfigDict

from rlhf_jax import presets
from rlhf_jax.config import base_config
from rlhf_jax.presets import use_llama_1b

# size preset -> planned hardware
SIZES = {
    "smollm2_135m": dict(hardware="v5e-8"),
    "llama3_2_1b": dict(hardware="v5e-8"),
    "qwen2_5_1_5b": dict(hardware="8xH100"),
    "llama3_8b": dict(hardware="v5p-32"),
    "gemma3_1b": dict(hardware="v5e-8"),
    "gemma2_2b": dict(hardware="v5e-8"),
}


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
      old_logps="auto",        # auto: with one update per rollout (epochs = minibatches = 1)
                               # log pi_old = stop_gradient(log pi), no old-log-prob forward
                               # pass (ratio exactly 1); recompute: always run that pass
      share_prompt=True,       # a group's G completions as one packed row [prompt | c1 | ...
                               # | cG]: the prompt runs once (update and log-prob passes);
                               # minibatches then hold whole groups
      epochs=1,                # passes over each rollout batch
      minibatches=1,           # optimizer steps per pass
  ))
  if preset == "tiny":
    return c
  if preset in ("gsm8k", "1b"):
    use_llama_1b(c)
  elif preset in SIZES:
    presets.apply(c, preset, SIZES[preset]["hardware"])
  if preset in ("gsm8k", "1b", *SIZES):
    c.data.update(source="gsm8k", max_prompt_len=256)
    c.rollout.update(prompts_per_step=64, group_size=8, max_new_tokens=512,
                     generate_micro_batch=64, logprob_micro_batch=32,
                     train_micro_batch=32)
    # Chunked log-probs: 512 completion positions of a row unembedded at a time, so that
    # long completions fit (e.g. max_new_tokens=4096 on v5e-8: docs/memory.md).
    c.model.logits_chunk = 512
    c.num_steps = 500
    c.optimizer.update(lr=1e-6)
    c.eval_every = 50
    c.eval_prompts = 512
    return c
  raise ValueError(f"unknown grpo preset {preset!r}; expected one of tiny, gsm8k, 1b, "
                   f"{', '.join(SIZES)}")
