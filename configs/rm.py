"""Reward model from pairwise preferences (Bradley-Terry).

Presets (`--config=configs/rm.py:PRESET`):
  tiny   the tiny CPU model on a synthetic task whose preferred answer is known
         (chosen = correct reversal, rejected = a corrupted one); ~1 minute.
  1b     a Llama-3.2-1B-shaped reward model on HH-RLHF; set --config.init_from to an
         SFT run / HF dir and --config.data.train_path to the HH-RLHF directory.
"""
from ml_collections import ConfigDict

from rlhf_jax.config import base_config, use_llama_1b


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
    c.data.update(source="hh_rlhf", max_prompt_len=768, max_completion_len=256)
    c.batch_size = 64
    c.num_steps = 2000
    c.optimizer.update(lr=9e-6, warmup_steps=100, weight_decay=0.0)
    return c
  raise ValueError(f"unknown rm preset {preset!r}; expected 'tiny' or '1b'")
