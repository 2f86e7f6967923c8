"""The DPO family of offline preference optimisation losses.

Presets (`--config=configs/dpo.py:PRESET`):
  tiny          the tiny CPU model on a synthetic preference task (chosen = correct answer,
                rejected = corrupted); ~1-2 minutes. Any loss: --config.dpo.loss_type=ipo
  1b            Llama-3.2-1B on HH-RLHF, FSDP over all devices of one host.
Real model sizes (rlhf_jax/presets.py) on HH-RLHF (prompts 768 + replies 256 tokens),
each with its planned hardware and (data, fsdp, tensor) mesh; the per-device memory
estimate (rlhf_jax/memory.py, docs/memory.md) fits 80% of its HBM. The DPO trainer has
no gradient accumulation: a step holds 2 x batch_size rows of logits at once.
  smollm2_135m  SmolLM2-135M, v5e-8, mesh (8, 1, 1) data parallel; batch 32 pairs.
  llama3_2_1b   Llama-3.2-1B, 8xH100, mesh (1, 8, 1) FSDP; batch 64 pairs.
  qwen2_5_1_5b  Qwen2.5-1.5B, 8xH100, mesh (1, 8, 1) FSDP; batch 64 pairs.
  llama3_8b     Llama-3.1-8B, v5p-32 (16 chips, 4 hosts), mesh (1, 16, 1) FSDP; batch 64.
Sized presets need --config.init_from=SFT_RUN_OR_HF_DIR (the architecture then comes
from the checkpoint) and --config.data.train_path=HH_RLHF_DIR.

Start from an SFT run with --config.init_from=runs/sft (its params become both the
policy's start and the frozen reference).
"""
from ml_collections import ConfigDict

from rlhf_jax import presets
from rlhf_jax.config import base_config
from rlhf_jax.presets import use_llama_1b

# size preset -> planned hardware, batch size in pairs
SIZES = {
    "smollm2_135m": dict(hardware="v5e-8", batch_size=32),
    "llama3_2_1b": dict(hardware="8xH100", batch_size=64),
    "qwen2_5_1_5b": dict(hardware="8xH100", batch_size=64),
    "llama3_8b": dict(hardware="v5p-32", batch_size=64),
    "gemma3_1b": dict(hardware="v5e-8", batch_size=32),
    "gemma2_2b": dict(hardware="v5e-8", batch_size=32),
}


def get_config(preset: str = "tiny") -> ConfigDict:
  c = base_config("dpo")
  c.dpo = ConfigDict(dict(
      loss_type="sigmoid",     # sigmoid | robust | ipo | hinge | simpo | orpo | kto
      beta=0.1,                # inverse temperature of the implicit reward (IPO: tau)
      label_smoothing=0.0,     # cDPO / robust DPO: assumed label-flip rate epsilon
      simpo_gamma=0.5,         # SimPO target reward margin (use beta ~2 with simpo)
      orpo_lambda=0.1,         # ORPO weight of the odds-ratio term next to the SFT NLL
      kto_desirable_weight=1.0,    # KTO lambda_D (chosen replies)
      kto_undesirable_weight=1.0,  # KTO lambda_U (rejected replies)
      reference_free=False,    # treat log pi_ref as 0 (sigmoid/robust/ipo/hinge/kto)
      precompute_reference=True,  # reference log-probs once, cached in the workdir
      share_prompt=True,       # chosen + rejected as one packed row: the prompt runs once
  ))
  c.num_steps = 300
  c.optimizer.warmup_steps = 30
  c.log_every = 20
  c.eval_every = 100
  c.sample.every = 100
  if preset == "tiny":
    return c
  if preset == "1b":
    use_llama_1b(c)
    c.batch_size = 64
  elif preset in SIZES:
    presets.apply(c, preset, SIZES[preset]["hardware"])
    c.batch_size = SIZES[preset]["batch_size"]
  else:
    raise ValueError(f"unknown dpo preset {preset!r}; expected one of tiny, 1b, "
                     f"{', '.join(SIZES)}")
  c.data.update(source="hh_rlhf", max_prompt_len=768, max_completion_len=256)
  c.num_steps = 2000
  c.optimizer.update(lr=5e-7, warmup_steps=150, weight_decay=0.0)
  c.sample.every = 500
  return c
