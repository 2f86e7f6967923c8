"""Model-size and hardware presets: real model shapes and the meshes to train them on.

`apply(config, size, hardware)` sets `config.model` to a published architecture
(numbers from each model's Hugging Face `config.json`), bfloat16 compute with
remat, the tokenizer's chat style, and `config.mesh.shape` for the hardware.
`configs/*.py` build their size presets on it, e.g. `configs/sft.py:llama3_8b`.
Point `--config.init_from` at the real weights (HF directory or .gguf): the
architecture then comes from the checkpoint, and these shapes are what it will be.

    size            HF model                   params  layers  d_model  heads/kv  vocab
    smollm2_135m    HuggingFaceTB/SmolLM2-135M  135M     30      576      9/3     49152
    llama3_2_1b     meta-llama/Llama-3.2-1B     1.24B    16     2048     32/8    128256
    qwen2_5_1_5b    Qwen/Qwen2.5-1.5B           1.54B    28     1536     12/2    151936
    llama3_8b       meta-llama/Llama-3.1-8B     8.03B    32     4096     32/8    128256
    gemma3_1b       google/gemma-3-1b-pt        1.00B    26     1152      4/1    262144
    gemma2_2b       google/gemma-2-2b           2.61B    26     2304      8/4    256000

Meshes (`rlhf_jax.hardware.HARDWARE`): FSDP over every device of v5e-8 (8 chips),
v5p-32 (16 chips) and 8xH100 (8 GPUs); models whose replicated AdamW state is
small (`Size.data_parallel`, SmolLM2-135M: 2.2 GB) use pure data parallelism
instead, which needs no per-layer all-gathers. `rlhf_jax.memory_plan.fits(config,
hardware)` checks a config against the hardware's HBM with the analytic formula.

A preset's mesh is a plan, not a requirement: with `config.hardware="auto"` (the default)
a run on other devices uses data parallelism over the devices present and says so in one
line (`rlhf_jax.config.resolve_mesh`); `--config.hardware=v5e-8` (a HARDWARE name)
instead requires that hardware, with the mesh planned for it.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from ml_collections import ConfigDict

from rlhf_jax.hardware import HARDWARE, Hardware

__all__ = ["SIZES", "HARDWARE", "Size", "apply", "laptop", "mesh_for", "Hardware"]


@dataclasses.dataclass(frozen=True)
class Size:
  hf_name: str
  published_params: float     # the model card's count
  model: dict[str, Any]       # config.model fields (ModelConfig names)
  chat_style: str             # the instruct models' chat template
  data_parallel: bool = False  # pure data parallelism instead of FSDP


# max_seq_len (the sampler's bound and the capability eval's row length) is our choice:
# RoPE is computed on the fly, any length works; the HF max_position_embeddings are 8192
# (SmolLM2) and 131072 (the others). Raise it with --config.model.max_seq_len.
_GEMMA = dict(norm_offset=1.0, embed_scale=True, activation="gelu_tanh", post_norms=True)
SIZES: dict[str, Size] = {
    "smollm2_135m": Size(
        "HuggingFaceTB/SmolLM2-135M", 135e6,
        dict(vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64,
             d_ff=1536, rope_theta=100000.0, rope_scaling=(), norm_eps=1e-5,
             tie_embeddings=True, attn_bias=False, max_seq_len=2048),
        chat_style="chatml", data_parallel=True),
    "llama3_2_1b": Size(
        "meta-llama/Llama-3.2-1B", 1.24e9,
        dict(vocab_size=128256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8,
             head_dim=64, d_ff=8192, rope_theta=500000.0, rope_scaling=(32.0, 1.0, 4.0, 8192),
             norm_eps=1e-5, tie_embeddings=True, attn_bias=False, max_seq_len=2048),
        chat_style="llama3"),
    "qwen2_5_1_5b": Size(
        "Qwen/Qwen2.5-1.5B", 1.54e9,
        dict(vocab_size=151936, d_model=1536, n_layers=28, n_heads=12, n_kv_heads=2,
             head_dim=128, d_ff=8960, rope_theta=1000000.0, rope_scaling=(), norm_eps=1e-6,
             tie_embeddings=True, attn_bias=True, max_seq_len=2048),
        chat_style="chatml"),
    "llama3_8b": Size(
        "meta-llama/Llama-3.1-8B", 8.03e9,
        dict(vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
             head_dim=128, d_ff=14336, rope_theta=500000.0, rope_scaling=(8.0, 1.0, 4.0, 8192),
             norm_eps=1e-5, tie_embeddings=False, attn_bias=False, max_seq_len=2048),
        chat_style="llama3"),
    # Gemma (issue #20): sandwich norms, sliding-window layers, Gemma 3 local RoPE base,
    # Gemma 2 soft-caps; query_pre_attn_scalar 256 = head_dim (the default scale).
    "gemma3_1b": Size(
        "google/gemma-3-1b-pt", 1.0e9,
        dict(vocab_size=262144, d_model=1152, n_layers=26, n_heads=4, n_kv_heads=1,
             head_dim=256, d_ff=6912, rope_theta=1000000.0, rope_scaling=(), norm_eps=1e-6,
             tie_embeddings=True, attn_bias=False, max_seq_len=2048, **_GEMMA,
             qk_norm=True, sliding_window=512, window_pattern="LLLLLG",
             rope_local_theta=10000.0),
        chat_style="gemma"),
    "gemma2_2b": Size(
        "google/gemma-2-2b", 2.61e9,
        dict(vocab_size=256000, d_model=2304, n_layers=26, n_heads=8, n_kv_heads=4,
             head_dim=256, d_ff=9216, rope_theta=10000.0, rope_scaling=(), norm_eps=1e-6,
             tie_embeddings=True, attn_bias=False, max_seq_len=2048, **_GEMMA,
             sliding_window=4096, window_pattern="LG", attn_softcap=50.0,
             final_softcap=30.0),
        chat_style="gemma"),
}

# Fields every size sets to the plain Llama values unless it says otherwise.
_LLAMA_DEFAULTS = dict(norm_offset=0.0, embed_scale=False, mlp_bias=False, qk_norm=False,
                       activation="silu", sliding_window=0, window_pattern="",
                       rope_local_theta=0.0, rope_linear_factor=1.0,
                       query_pre_attn_scalar=0.0, attn_softcap=0.0, final_softcap=0.0,
                       post_norms=False)


def mesh_for(size: str, hardware: str | None) -> tuple[int, int, int]:
  """(data, fsdp, tensor) for `size` on `hardware`: the hardware's FSDP mesh, or pure
  data parallelism over all its devices for a `data_parallel` size. hardware=None:
  the same layout over however many devices there are (-1 = fill)."""
  dp = _size(size).data_parallel
  if hardware is None:
    return (-1, 1, 1) if dp else (1, -1, 1)
  hw = _hardware(hardware)
  return (hw.devices, 1, 1) if dp else hw.mesh


def apply(c: ConfigDict, size: str, hardware: str | None = None) -> ConfigDict:
  """Set config.model to `size`'s architecture (bf16 compute, remat="full"), the
  tokenizer's chat style, config.mesh.shape for `hardware` (None: fill any device
  count), multi-host start-up for a multi-host slice, and a large-run cadence of
  logs, evals and checkpoints; returns `c`."""
  s = _size(size)
  c.model.update(**_LLAMA_DEFAULTS)
  c.model.update(**s.model)
  c.model.update(dtype="bfloat16", remat=True)
  c.mesh.shape = mesh_for(size, hardware)
  c.mesh.planned_for = hardware or ""  # config.hardware=auto adapts it to other devices
  if hardware is not None and _hardware(hardware).hosts > 1 and "distributed" in c:
    c.distributed.enabled = True  # one process per host; addresses auto-detected on TPU VMs
  c.tokenizer.chat_style = s.chat_style
  c.log_every = 10
  c.eval_every = 200
  c.checkpoint.every = 500
  return c


def laptop(c: ConfigDict, size: str = "smollm2_135m") -> ConfigDict:
  """A real model size for a few-minute CPU run (the `smollm2_laptop` presets of
  configs/*.py; README "Run a real model on your laptop"): `size`'s architecture in
  float32 (XLA:CPU has no fast bfloat16 matmul) with full remat (SmolLM2's laptop
  presets: 4.4-8.1 GB peak RSS estimated by rlhf_jax/memory_plan.py, 6.0-15.7 GB without,
  PPO the largest), data parallelism over whatever devices exist, 5 steps logged every step,
  no warmup, no evals or samples, one checkpoint at the end. The trainer's config then
  sets its data and lengths; returns `c`."""
  apply(c, size, hardware=None)
  c.model.update(dtype="float32", remat=True)
  c.num_steps = 5
  c.optimizer.update(warmup_steps=0, weight_decay=0.0)
  c.log_every = 1
  c.eval_every = 0  # no evals at all (a real model's eval takes minutes on a CPU)
  c.checkpoint.update(every=1000, keep=1)  # one checkpoint, at the end
  if "sample" in c:
    c.sample.every = 0
  return c


def _size(name: str) -> Size:
  if name not in SIZES:
    raise ValueError(f"unknown model size {name!r}; expected one of {', '.join(SIZES)}")
  return SIZES[name]


def _hardware(name: str) -> Hardware:
  if name not in HARDWARE:
    raise ValueError(f"unknown hardware {name!r}; expected one of {', '.join(HARDWARE)}")
  return HARDWARE[name]


def use_llama_1b(c: ConfigDict) -> ConfigDict:
  """Shared "1b" preset: Llama-3.2-1B (`llama3_2_1b`), bf16 compute, remat, an FSDP mesh
  over however many devices there are."""
  return apply(c, "llama3_2_1b", hardware=None)
