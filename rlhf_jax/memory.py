"""Analytic per-device memory of a training step: params, gradients, AdamW, activations.

An estimate for planning (does this model, batch and mesh fit this accelerator?),
checked against XLA's compiled memory on CPU in `benchmarks/memory.py` and
`docs/memory.md`. Everything is bytes **per device**. With a mesh
(data, fsdp, tensor) = (d, f, t) and N parameters:

  params fp32            4N / (f t)     (parameters are sharded over fsdp and tensor,
  gradients fp32         4N / (f t)      replicated over data; see rlhf_jax/parallel.py)
  AdamW mu, nu fp32      8N / (f t)
  accumulator (A > 1)    4N / (f t)     summed micro-batch gradients
  extra fp32 copies      4N / (f t)     each: a frozen reference policy, SFT's eval_kl copy
  gathered layer         2 c N_layer / t  FSDP all-gathers one layer's weights (and the
                                        next, prefetched) in the compute dtype
  weight copies          2N / (f t)     bf16 without remat: every layer's bf16 weights
                                        are kept for the backward pass
  activations            tokens * (L * saved(policy) + working + logits)

with tokens = micro-batch rows * seq_len / (d f) per device, c the compute-dtype
bytes (4 float32, 2 bfloat16), and per token and layer (D width, F MLP width,
H/K query/kv heads of size Dh, S = seq_len keys; head/MLP terms divided by t):

  none           (16 + 2c) D + c ((H + 2K) Dh + H Dh + 6F) + (4 + c) H S
  full           c D
  dots           2c D + c ((H + 2K) Dh + H Dh + 2F) + 4 H S
  dots_no_batch  2c D + c ((H + 2K) Dh + 2F)
  qkv_proj       c D + c (H + 2K) Dh

`working` is one layer's `none` activations (the layer being recomputed in the
backward pass; 0 without remat) and `logits` = 12 V / t bytes per token (three
float32 [T, V] buffers: logits, log-softmax, their gradient), counted for only
min(logits_chunk, S) tokens per row with `model.logits_chunk` > 0 (chunked log-probs,
`losses.logprobs.chunked_token_logprobs`). The (4 + c) H S term
is the materialised attention (float32 scores and softmax, compute-dtype probs):
quadratic in the sequence length, it dominates without remat at S >= 2048.

The `none`/`full`/... coefficients are what JAX saves for this model's backward
pass (counted with `saved_residuals` on the real module, tests/test_memory.py);
the 16 D of `none` are the two RMSNorms' float32 internals.
"""
from __future__ import annotations

import dataclasses
import math

from rlhf_jax.models.transformer import ModelConfig

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Hardware:
  """An accelerator slice as JAX sees it: `devices` jax.devices() of `hbm_bytes` each."""
  name: str
  devices: int
  hbm_bytes: int
  hosts: int
  mesh: tuple[int, int, int]   # default (data, fsdp, tensor) for models that need sharding
  note: str


# Default meshes: FSDP over every device. AdamW training keeps 16 bytes per parameter
# (fp32 params, grads, mu, nu); sharding them over fsdp (ZeRO-3) divides that by the
# device count at the price of one all-gather (forward and backward) and one
# reduce-scatter per layer, which fast intra-slice links (TPU ICI, NVLink) hide behind
# the matmuls at these sizes. Tensor parallelism stays 1: models up to 8B fit without
# it, and batch sharding over more devices is cheaper than splitting every matmul.
HARDWARE: dict[str, Hardware] = {
    "v5e-8": Hardware(
        "v5e-8", devices=8, hbm_bytes=16 * GiB, hosts=1, mesh=(1, 8, 1),
        note="8 TPU v5e chips (1 host, 16 GiB HBM each): FSDP over all 8; replicated "
             "AdamW state would cap the model at ~0.5B params"),
    "v5p-32": Hardware(
        "v5p-32", devices=16, hbm_bytes=95 * GiB, hosts=4, mesh=(1, 16, 1),
        note="16 TPU v5p chips = 32 TensorCores (JAX sees one device per chip, megacore), "
             "4 hosts, one ICI slice, 95 GiB HBM each: FSDP over all 16"),
    "8xH100": Hardware(
        "8xH100", devices=8, hbm_bytes=80 * GiB, hosts=1, mesh=(1, 8, 1),
        note="8 NVIDIA H100 80GB on NVLink (1 host): FSDP over all 8"),
}

# A step is planned to fit when its estimate is at most this share of HBM: headroom
# for XLA's fragmentation, collective buffers, code and the runtime. (On GPUs JAX
# preallocates 75% by default: set XLA_PYTHON_CLIENT_MEM_FRACTION=0.9.)
HEADROOM = 0.8


def _dims(m: ModelConfig):
  return m.d_model, m.d_ff, m.n_heads, m.n_kv_heads, m.head_dim, m.vocab_size, m.n_layers


def layer_params(m: ModelConfig) -> int:
  D, F, H, K, Dh, _, _ = _dims(m)
  bias = (H + 2 * K) * Dh if m.attn_bias else 0
  qk_norm = 2 * Dh if m.qk_norm else 0
  return D * Dh * (H + 2 * K) + H * Dh * D + 3 * D * F + 2 * D + bias + qk_norm


def num_params(m: ModelConfig) -> int:
  """Exact parameter count of `Transformer(m)` (with q/k/v biases and QK-norm scales)."""
  return (m.n_layers * layer_params(m) + m.vocab_size * m.d_model
          * (1 if m.tie_embeddings else 2) + m.d_model)


def saved_bytes_per_token_layer(m: ModelConfig, policy: str, seq_len: int,
                                tensor: int = 1, dtype: str | None = None) -> float:
  """Bytes one layer keeps for the backward pass, per token (see the module docstring)."""
  D, F, H, K, Dh, _, _ = _dims(m)
  c = 4 if (dtype or m.dtype) == "float32" else 2
  t, S = tensor, seq_len
  qkv = (H + 2 * K) * Dh
  if policy == "none":
    return (16 + 2 * c) * D + c * (qkv + H * Dh + 6 * F) / t + (4 + c) * H * S / t
  if policy == "full":
    return c * D
  if policy == "dots":
    return 2 * c * D + c * (qkv + H * Dh + 2 * F) / t + 4 * H * S / t
  if policy == "dots_no_batch":
    return 2 * c * D + c * (qkv + 2 * F) / t
  if policy == "qkv_proj":
    return c * D + c * qkv / t
  raise ValueError(f"model.remat_policy={policy!r}: unknown")


def train_step_bytes(m: ModelConfig, *, rows: int, seq_len: int, mesh=(1, 1, 1),
                     policy: str | None = None, dtype: str | None = None,
                     grad_accum: int = 1, extra_param_copies: int = 0,
                     trained_models: int = 1, logits: bool = True) -> dict[str, float]:
  """Per-device bytes of one training step, by component.

  rows: the micro-batch's global rows (batch_size / grad_accum; DPO/RM count chosen
  and rejected rows); trained_models: 2 for PPO's separate critic (its own params,
  grads, AdamW state and activations, no logits); logits=False for scalar-head models.
  """
  d, f, t = mesh
  policy = policy or m.resolved_remat_policy
  dtype = dtype or m.dtype
  c = 4 if dtype == "float32" else 2
  N = num_params(m) * trained_models
  shard = f * t
  tokens = rows * seq_len / (d * f)
  out = {
      "params": 4 * N / shard,
      "grads": 4 * N / shard,
      "adam": 8 * N / shard,
      "accumulator": 4 * N / shard if grad_accum > 1 else 0.0,
      "extra_params": 4 * num_params(m) * extra_param_copies / shard,
      "gathered_layer": 2 * c * layer_params(m) / t if f > 1 else 0.0,
      # without remat the backward keeps every layer's compute-dtype weight copy
      "weight_copies": 2 * N / shard if policy == "none" and dtype != "float32" else 0.0,
  }
  per_layer = saved_bytes_per_token_layer(m, policy, seq_len, t, dtype)
  working = saved_bytes_per_token_layer(m, "none", seq_len, t, dtype) if policy != "none" else 0
  out["activations"] = tokens * (m.n_layers * per_layer + working) * trained_models
  out["logits"] = _logit_tokens(m, rows, seq_len, d * f) * 12 * m.vocab_size / t if logits else 0.0
  out["total"] = sum(out.values())
  return out


def _logit_tokens(m: ModelConfig, rows: float, seq_len: int, row_shards: int) -> float:
  """Tokens per device whose float32 logits are alive at once: every token, or with
  model.logits_chunk > 0 one chunk of each row (`chunked_token_logprobs`)."""
  per_row = min(m.logits_chunk, seq_len) if m.logits_chunk else seq_len
  return rows * per_row / row_shards


def generation_bytes(m: ModelConfig, *, rows: int, length: int, mesh=(1, 1, 1)) -> float:
  """Per-device KV cache of the sampler: 2 (k, v) x L x rows x length x K x Dh x c."""
  d, f, t = mesh
  c = 4 if m.dtype == "float32" else 2
  return 2 * m.n_layers * rows / (d * f) * length * m.n_kv_heads / t * m.head_dim * c


# ----------------------------------------------------------------------------
# A trainer config -> per-device estimate
# ----------------------------------------------------------------------------

def resolve_mesh(shape, devices: int) -> tuple[int, int, int]:
  shape = [int(s) for s in shape]
  if -1 in shape:
    known = math.prod(s for s in shape if s != -1)
    shape[shape.index(-1)] = devices // known
  return tuple(shape)


def config_estimate(config, devices: int) -> dict[str, float]:
  """Per-device bytes of the largest phase of `config`'s trainer on `devices` devices.

  Phases: the train step (every trainer), plus for online RL the sampler's KV
  cache and the no-grad log-prob passes; static state (params, AdamW, reference
  copies) is counted in each phase. Keys: the train-step breakdown, "kv_cache",
  "logprob_pass", "total".
  """
  from rlhf_jax import config as config_lib
  m = config_lib.model_config(config, vocab_size=config.tokenizer.vocab_size)
  mesh = resolve_mesh(config.mesh.shape, devices)
  d, f, t = mesh
  trainer = config.trainer
  extra = 0
  if trainer in ("sft", "dpo") and config.get("eval_kl") and config.get("prompt_eval") \
      and config.prompt_eval.path:
    extra += 1  # the initial policy kept for eval_kl
  if trainer == "sft":
    rows = config.batch_size // config.grad_accum_steps
    seq = config.data.max_seq_len
    kw = dict(grad_accum=config.grad_accum_steps)
  elif trainer in ("dpo", "reward_model"):
    per_pair = 3 if trainer == "dpo" and config.dpo.loss_type == "kto" else 2
    rows = config.batch_size * per_pair
    seq = config.data.max_prompt_len + config.data.max_completion_len
    kw = dict(logits=trainer == "dpo")
    if trainer == "dpo" and not config.dpo.precompute_reference:
      extra += 1
  elif trainer in ("grpo", "ppo"):
    r = config.rollout
    minibatches = config[trainer].minibatches
    rows = r.train_micro_batch or r.prompts_per_step * r.group_size // minibatches
    seq = config.data.max_prompt_len + r.max_new_tokens
    extra += 1  # the reference policy
    kw = dict(trained_models=2 if trainer == "ppo" and config.ppo.critic == "separate" else 1)
  else:
    raise ValueError(f"config.trainer={trainer!r}: no memory model")
  out = train_step_bytes(m, rows=rows, seq_len=seq, mesh=mesh, extra_param_copies=extra, **kw)
  out["kv_cache"] = out["logprob_pass"] = 0.0
  if trainer in ("grpo", "ppo"):
    static = out["params"] + out["adam"] + out["extra_params"]
    kv = generation_bytes(m, rows=r.generate_micro_batch, length=seq, mesh=mesh)
    lp_tokens = r.logprob_micro_batch * seq / (d * f)
    logprob = (_logit_tokens(m, r.logprob_micro_batch, seq, d * f) * 12 * m.vocab_size / t
               + lp_tokens * saved_bytes_per_token_layer(m, "none", seq, t))
    out["kv_cache"], out["logprob_pass"] = kv, logprob
    out["total"] = max(out["total"], static + kv, static + logprob)
  return out


def fits(config, hardware: str | Hardware) -> tuple[bool, float, float]:
  """(fits, estimated bytes per device, budget = HEADROOM x HBM) for `config` on `hardware`."""
  hw = HARDWARE[hardware] if isinstance(hardware, str) else hardware
  est = config_estimate(config, hw.devices)["total"]
  budget = HEADROOM * hw.hbm_bytes
  return est <= budget, est, budget


# ----------------------------------------------------------------------------
# Optimizer-state offload to host memory
# ----------------------------------------------------------------------------

def offload_opt_state(shardings: dict) -> dict:
  """The train-state shardings with state["opt_state"] in pinned host memory.

  Pass them as the step's in/out shardings (and to `jax.device_put` the state) and
  wrap the step with `with_offloaded_opt_state`: the AdamW moments (8N bytes)
  then live in host RAM and visit the accelerator only for the update, after the
  backward pass has freed its activations, so the step's peak loses them. Costs
  a host<->device copy of the moments per step (PCIe/DMA). Same numbers, bit for
  bit. Not a config knob yet: the trainers build their state and step themselves.
  """
  return {**shardings,
          "opt_state": _with_memory_kind(shardings["opt_state"], "pinned_host")}


def with_offloaded_opt_state(step, shardings: dict):
  """step(state, *args) -> (state, metrics) whose state["opt_state"] arrives and leaves
  in host memory (`offload_opt_state(shardings)`), moved to the device inside the jit
  for the update only."""
  import jax
  on_device = _with_memory_kind(shardings["opt_state"], "device")
  on_host = _with_memory_kind(shardings["opt_state"], "pinned_host")

  def offloaded(state, *args):
    state = {**state, "opt_state": jax.device_put(state["opt_state"], on_device)}
    new_state, metrics = step(state, *args)
    return {**new_state, "opt_state": jax.device_put(new_state["opt_state"], on_host)}, metrics

  return offloaded


def _with_memory_kind(shardings, kind: str):
  import jax
  return jax.tree.map(lambda s: s.with_memory_kind(kind), shardings)
