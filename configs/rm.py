"""Reward model from pairwise preferences (Bradley-Terry).

Presets (`--config=configs/rm.py:PRESET`):
  tiny          the tiny CPU model on a synthetic task whose preferred answer is known
                (chosen = correct reversal, rejected = a corrupted one); ~1 minute.
  1b            a Llama-3.2-1B reward model on HH-RLHF, FSDP over all devices of one host.
Real model sizes (rlhf_jax/presets.py) on HH-RLHF (prompts 768 + replies 256 tokens),
batch 64 pairs, each with its planned hardware and (data, fsdp, tensor) mesh; the
per-device memory estimate (rlhf_jax/memory.py, docs/memory.md) fits 80% of its HBM
(a scalar head: no [T, vocab] logits, so reward models are lighter than DPO):
  smollm2_135m  SmolLM2-135M, v5e-8, mesh (8, 1, 1) data parallel.
  llama3_2_1b   Llama-3.2-1B, v5e-8, mesh (1, 8, 1) FSDP.
  qwen2_5_1_5b  Qwen2.5-1.5B, v5e-8, mesh (1, 8, 1) FSDP.
  llama3_8b     Llama-3.1-8B, v5p-32 (16 chips, 4 hosts), mesh (1, 16, 1) FSDP.
Sized presets need --config.init_from=SFT_RUN_OR_HF_DIR (backbone; the architecture then
comes from the checkpoint) and --config.data.train_path=HH_RLHF_DIR.
"""
from ml_collections import ConfigDict

from rlhf_jax import presets
from rlhf_jax.config import base_config
from rlhf_jax.presets import use_llama_1b

# size preset -> planned hardware, peak lr
SIZES = {
    "smollm2_135m": dict(hardware="v5e-8", lr=2e-5),
    "llama3_2_1b": dict(hardware="v5e-8", lr=9e-6),
    "qwen2_5_1_5b": dict(hardware="v5e-8", lr=9e-6),
    "llama3_8b": dict(hardware="v5p-32", lr=5e-6),
    "gemma3_1b": dict(hardware="v5e-8", lr=9e-6),
    "gemma2_2b": dict(hardware="v5e-8", lr=5e-6),
}


def get_config(preset: str = "tiny") -> ConfigDict:
  c = base_config("reward_model")
  c.rm = ConfigDict(dict(
      center_coef=0.0,         # lambda of the reward-centring term lambda*(r_c + r_r)^2
      use_margin=True,         # subtract the data's margin inside the sigmoid when present
  ))
  c.num_steps = 300
  c.optimizer.warmup_steps = 30
  c.log_every = 20
  c.eval_every = 100
  if preset == "tiny":
    return c
  if preset == "1b":
    use_llama_1b(c)
    lr = SIZES["llama3_2_1b"]["lr"]
  elif preset in SIZES:
    presets.apply(c, preset, SIZES[preset]["hardware"])
    lr = SIZES[preset]["lr"]
  else:
    raise ValueError(f"unknown rm preset {preset!r}; expected one of tiny, 1b, "
                     f"{', '.join(SIZES)}")
  c.data.update(source="hh_rlhf", max_prompt_len=768, max_completion_len=256)
  c.batch_size = 64
  c.num_steps = 2000
  c.optimizer.update(lr=lr, warmup_steps=100, weight_decay=0.0)
  return c
