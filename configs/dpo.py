"""The DPO family of offline preference optimisation losses.

Presets (`--config=configs/dpo.py:PRESET`):
  tiny   the tiny CPU model on a synthetic preference task (chosen = correct answer,
         rejected = corrupted); ~1-2 minutes. Any loss: --config.dpo.loss_type=ipo
  1b     a Llama-3.2-1B-shaped policy on HH-RLHF; set --config.init_from to an SFT
         run / HF dir and --config.data.train_path to the HH-RLHF directory.

Start from an SFT run with --config.init_from=runs/sft (its params become both the
policy's start and the frozen reference).
"""
from ml_collections import ConfigDict

from rlhf_jax.config import base_config, use_llama_1b


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
    c.data.update(source="hh_rlhf", max_prompt_len=768, max_completion_len=256)
    c.batch_size = 64
    c.num_steps = 2000
    c.optimizer.update(lr=5e-7, warmup_steps=150, weight_decay=0.0)
    c.sample.every = 500
    return c
  raise ValueError(f"unknown dpo preset {preset!r}; expected 'tiny' or '1b'")
