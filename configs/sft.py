"""Supervised fine-tuning (SFT).

Presets (`--config=configs/sft.py:PRESET`):
  tiny   a 4-layer, d=96 model (0.5M parameters) learning a bundled synthetic task on CPU in ~2 minutes.
  1b     a Llama-3.2-1B-shaped model (bf16 compute, FSDP mesh) for one GPU/TPU host;
         set --config.init_from=/path/to/hf_dir_or.gguf to start from real weights
         and --config.data.train_path to your JSONL.
"""
from ml_collections import ConfigDict

from rlhf_jax.config import base_config, use_llama_1b


def get_config(preset: str = "tiny") -> ConfigDict:
  c = base_config("sft")
  if preset == "tiny":
    return c  # base_config's defaults are the tiny CPU run
  if preset == "1b":
    use_llama_1b(c)
    c.data.max_seq_len = 2048
    c.data.packing = True
    c.batch_size = 64
    c.grad_accum_steps = 4
    c.num_steps = 2000
    c.optimizer.update(lr=2e-5, warmup_steps=100, weight_decay=0.0)
    c.sample.every = 500
    return c
  raise ValueError(f"unknown sft preset {preset!r}; expected 'tiny' or '1b'")
