"""Supervised fine-tuning (SFT).

Presets (`--config=configs/sft.py:PRESET`):
  tiny          a 4-layer, d=96 model (0.5M parameters) learning a bundled synthetic task
                on CPU in ~2 minutes.
  1b            Llama-3.2-1B (bf16 compute, remat, FSDP over all devices of one GPU/TPU host).
Real model sizes (rlhf_jax/presets.py; shapes from the HF config.json), each with the
hardware it is planned for and that hardware's (data, fsdp, tensor) mesh; the per-device
memory estimate (rlhf_jax/memory.py, docs/memory.md) fits 80% of its HBM:
  smollm2_135m  SmolLM2-135M, v5e-8, mesh (8, 1, 1): pure data parallelism (2.2 GB of
                AdamW state per chip); batch 64 x 2048 tokens, 2 micro-batches.
  llama3_2_1b   Llama-3.2-1B, v5e-8, mesh (1, 8, 1) FSDP; batch 64 x 2048, 4 micro-batches
                (the same run as `1b`, with the mesh pinned to 8 devices).
  qwen2_5_1_5b  Qwen2.5-1.5B, 8xH100, mesh (1, 8, 1) FSDP; batch 64 x 2048, 2 micro-batches.
  llama3_8b     Llama-3.1-8B, v5p-32 (16 chips, 4 hosts), mesh (1, 16, 1) FSDP; batch 64 x 2048.
Every sized preset packs examples (data.packing) and needs real weights and data:
  --config.init_from=/path/to/hf_dir_or.gguf  (the architecture then comes from the
  checkpoint; dtype and remat from the config) and --config.data.train_path=your.jsonl.
On other hardware override --config.mesh.shape (and the batch, see docs/memory.md).
"""
from ml_collections import ConfigDict

from rlhf_jax import presets
from rlhf_jax.config import base_config
from rlhf_jax.presets import use_llama_1b

# size preset -> planned hardware, micro-batches per step, peak lr
SIZES = {
    "smollm2_135m": dict(hardware="v5e-8", grad_accum_steps=2, lr=1e-4),
    "llama3_2_1b": dict(hardware="v5e-8", grad_accum_steps=4, lr=2e-5),
    "qwen2_5_1_5b": dict(hardware="8xH100", grad_accum_steps=2, lr=1e-5),
    "llama3_8b": dict(hardware="v5p-32", grad_accum_steps=1, lr=1e-5),
    "gemma3_1b": dict(hardware="v5e-8", grad_accum_steps=4, lr=2e-5),
    "gemma2_2b": dict(hardware="v5e-8", grad_accum_steps=8, lr=1e-5),
}


def get_config(preset: str = "tiny") -> ConfigDict:
  c = base_config("sft")
  if preset == "tiny":
    return c  # base_config's defaults are the tiny CPU run
  if preset == "1b":
    use_llama_1b(c)
    size = SIZES["llama3_2_1b"]
  elif preset in SIZES:
    size = SIZES[preset]
    presets.apply(c, preset, size["hardware"])
  else:
    raise ValueError(f"unknown sft preset {preset!r}; expected one of tiny, 1b, "
                     f"{', '.join(SIZES)}")
  c.data.max_seq_len = 2048
  c.data.packing = True
  c.batch_size = 64
  c.grad_accum_steps = size["grad_accum_steps"]
  c.num_steps = 2000
  c.optimizer.update(lr=size["lr"], warmup_steps=100, weight_decay=0.0)
  c.sample.every = 500
  return c
