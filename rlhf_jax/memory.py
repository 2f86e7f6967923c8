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
  activations            tokens * (L * saved(policy) + working)
  logits                 the float32 unembedding buffers (below)

with tokens = micro-batch rows * seq_len / (d f) per device, c the compute-dtype
bytes (4 float32, 2 bfloat16), and per token and layer (D width, F MLP width,
H/K query/kv heads of size Dh, S = seq_len keys; head/MLP terms divided by t):

  none           (16 + 2c) D + c ((H + 2K) Dh + H Dh + 6F) + attn
  full           c D
  dots           2c D + c ((H + 2K) Dh + H Dh + 2F) + 4 H S
  dots_no_batch  2c D + c ((H + 2K) Dh + 2F)
  qkv_proj       c D + c (H + 2K) Dh

attn is what the attention backend (`model.attention`, rlhf_jax/models/attention.py,
resolved per platform and mask kind as the model resolves it) keeps:

  dense          (4 + c) H S     the float32 scores and softmax and the compute-dtype
                                 probabilities: quadratic in the sequence length; it
                                 dominates without remat at S >= 2048
  chunked, splash, cudnn (memory-efficient: blockwise, online softmax, recomputing
  backward)      c H Dh + 8 H + 24   the output copy, the float32 row max and 1 / row sum
                                 and the per-token mask ids; plus, while the layer's backward
                                 runs, a float32 dq accumulator (4 H Dh per token) and one
                                 block pair's scores (O(rows H block^2), `attention`)

`dots` keeps every matmul output, the attention scores included, under every backend
(the chunked backend's per-block scores are matmul outputs too): 4 H S.

`working` is the layer whose backward runs: with remat (the layer recomputed) the
larger of its `none` activations (while its MLP's backward runs) and its attention
residuals plus their gradients (dense: 8 H S more per token; memory-efficient: a
float32 dq, 4 H Dh); without remat only that transient.
`logits` = 8 V / t bytes per unembedded token of a step with gradients (two float32
[T, V] buffers, the logits and their cotangent: XLA fuses the log-softmax and the
target gather into them; 4 V in a no-grad log-prob pass); with `model.logits_chunk`
= C > 0 (the unembed -> log-softmax -> gather runs per chunk of C tokens,
rematerialised, `losses.logprobs.chunked_token_logprobs`) only one [rows, C, V] chunk's
buffers are live: 8 V C / t per row.

The step's peak is the larger of two phases: the backward pass (gradients 4N/(f t),
activations, logits, the attention scratch) and the optimizer update, for which XLA
plans 12N/(f t) bytes of temporaries (the new params, mu and nu next to the old ones:
`apply_gradients` keeps the old state when a gradient is not finite). A step that
does not donate its state (the GRPO/PPO updates) also holds the new state next to
the old one (`state_copy`, 12N/(f t)); XLA then computes the gradients in those output
buffers, and there is no separate update phase.

The `none`/`full`/... coefficients are what JAX saves for this model's backward
pass (counted with `saved_residuals` on the real module, tests/test_memory.py);
the 16 D of `none` are the two RMSNorms' float32 internals. The whole is checked
against XLA's compiled memory of the real steps at real sizes (`rlhf_jax.memory_aot`,
`benchmarks/memory.py --aot`, docs/memory.md, tests/test_memory_aot.py).

A trainer config on a hardware preset: `rlhf_jax.memory_plan` (`config_estimate`, `fits`);
optimizer-state offload to host memory: `rlhf_jax.memory_offload`.
"""
from __future__ import annotations

from rlhf_jax.models import attention as attention_lib
from rlhf_jax.models.transformer import ModelConfig


def _dims(m: ModelConfig):
  return m.d_model, m.d_ff, m.n_heads, m.n_kv_heads, m.head_dim, m.vocab_size, m.n_layers


def layer_params(m: ModelConfig) -> int:
  D, F, H, K, Dh, _, _ = _dims(m)
  bias = (H + 2 * K) * Dh if m.attn_bias else 0
  qk_norm = 2 * Dh if m.qk_norm else 0
  post_norms = 2 * D if m.post_norms else 0  # Gemma 2 / 3 sandwich norms
  return D * Dh * (H + 2 * K) + H * Dh * D + 3 * D * F + 2 * D + bias + qk_norm + post_norms


def num_params(m: ModelConfig) -> int:
  """Exact parameter count of `Transformer(m)` (with q/k/v biases and QK-norm scales)."""
  return (m.n_layers * layer_params(m) + m.vocab_size * m.d_model
          * (1 if m.tie_embeddings else 2) + m.d_model)


def attention_backend(m: ModelConfig, kind: str = "causal", kv_len: int | None = None,
                      platform: str | None = None) -> str:
  """The attention backend `m` runs for a mask `kind` over kv_len keys on `platform`
  (None: this process's), as the model resolves it (`attention.resolve`): "auto" picks
  per platform; an explicit backend counts as itself even where it cannot run."""
  if m.attention != "auto":
    return m.attention
  return attention_lib.resolve("auto", kind, platform, kv_len,
                               features=attention_lib.model_features(m))


def memory_efficient(backend: str) -> bool:
  """Whether `backend` keeps O(T) attention memory (all but the dense reference)."""
  return backend != "dense"


def saved_bytes_per_token_layer(m: ModelConfig, policy: str, seq_len: int,
                                tensor: int = 1, dtype: str | None = None,
                                attention: str | None = None) -> float:
  """Bytes one layer keeps for the backward pass, per token (see the module docstring).
  attention: the resolved backend (default: `attention_backend(m)` for seq_len keys)."""
  D, F, H, K, Dh, _, _ = _dims(m)
  c = 4 if (dtype or m.dtype) == "float32" else 2
  t, S = tensor, seq_len
  qkv = (H + 2 * K) * Dh
  backend = attention or attention_backend(m, kv_len=seq_len)
  attn = attention_residual_per_token(m, seq_len, backend, t, dtype)
  if policy == "none":
    return (16 + 2 * c) * D + c * (qkv + H * Dh + 6 * F) / t + attn
  if policy == "full":
    return c * D
  if policy == "dots":
    return 2 * c * D + c * (qkv + H * Dh + 2 * F) / t + 4 * H * S / t
  if policy == "dots_no_batch":
    return 2 * c * D + c * (qkv + 2 * F) / t
  if policy == "qkv_proj":
    return c * D + c * qkv / t
  raise ValueError(f"model.remat_policy={policy!r}: unknown")


def attention_residual_per_token(m: ModelConfig, seq_len: int, backend: str, tensor: int = 1,
                                 dtype: str | None = None) -> float:
  """What attention itself keeps per token and layer for the backward pass (beyond q, k,
  v and its output): dense (4 + c) H S (float32 scores and softmax, compute-dtype
  probabilities), + 4 H S with model.attn_softcap (the uncapped float32 scores, for the
  tanh's derivative; measured on XLA:CPU); a memory-efficient backend c H Dh + 8 H + 24
  (its own output copy, the float32 row max and 1 / row sum of the online softmax, the
  per-token mask ids)."""
  H, Dh = m.n_heads, m.head_dim
  c = 4 if (dtype or m.dtype) == "float32" else 2
  if memory_efficient(backend):
    return (c * H * Dh + 8 * H + 24) / tensor
  return (4 + c + (4 if m.attn_softcap else 0)) * H * seq_len / tensor


def logits_bytes(m: ModelConfig, rows: float, length: float, tensor: int = 1,
                 grad: bool = True) -> float:
  """Bytes of the float32 unembedding buffers of `rows` rows per device that unembed
  `length` tokens each: 8 V per token with a gradient (the logits and their cotangent;
  XLA fuses the log-softmax and the gather into them), 4 V without (a no-grad log-prob
  pass). With model.logits_chunk = C > 0 (`losses.logprobs.chunked_token_logprobs`: one
  [rows, C, V] chunk at a time, rematerialised) only min(C, length) tokens of every row."""
  live = min(length, m.logits_chunk) if m.logits_chunk else length
  return rows * live * (8 if grad else 4) * m.vocab_size / tensor


def backward_transient_per_token(m: ModelConfig, seq_len: int, backend: str,
                                 tensor: int = 1) -> float:
  """Bytes per token that one layer's backward pass adds while it runs: dense attention's
  float32 gradients of the probabilities and scores (8 H S); a memory-efficient
  backend's float32 dq accumulator (4 H Dh)."""
  if memory_efficient(backend):
    return 4 * m.n_heads * m.head_dim / tensor
  return 8 * m.n_heads * seq_len / tensor


def forward_transient_per_token(m: ModelConfig, seq_len: int, backend: str, tensor: int = 1,
                                dtype: str | None = None) -> float:
  """Bytes per token of one layer's no-grad forward pass (log-prob passes, prefill): the
  normed input and the residual, q/k/v and the attention output, one MLP intermediate
  (XLA fuses act(gate) * up into the down projection's input), and dense attention's
  scores and probabilities ((4 + c) H S)."""
  D, F, H, K, Dh, _, _ = _dims(m)
  c = 4 if (dtype or m.dtype) == "float32" else 2
  attn = 0 if memory_efficient(backend) else (4 + c) * H * seq_len
  return c * (2 * D + ((H + 2 * K) * Dh + H * Dh + F) / tensor) + attn / tensor


def _activation_dtype(dtype: str, platform: str | None) -> str:
  """XLA:CPU computes bfloat16 through float32 copies: its plan keeps float32 activations
  (platform="cpu" models that, to check the formula against compiled CPU numbers)."""
  return "float32" if platform == "cpu" else dtype


def attention_scratch_bytes(m: ModelConfig, rows: float, seq_len: int, backend: str,
                            tensor: int = 1) -> float:
  """A memory-efficient backend's per-block scratch (two float32 [block_q, block_k] tiles
  per row and head: the scores / probabilities and their gradient; a third with
  model.attn_softcap: the uncapped scores); 0 for dense (its scores are counted per
  token)."""
  if not memory_efficient(backend):
    return 0.0
  b = min(attention_lib.DEFAULT_BLOCK_Q, seq_len) * min(attention_lib.DEFAULT_BLOCK_K, seq_len)
  tiles = 3 if m.attn_softcap else 2
  return tiles * 4 * rows * m.n_heads * b / tensor


def train_step_bytes(m: ModelConfig, *, rows: int, seq_len: int, mesh=(1, 1, 1),
                     policy: str | None = None, dtype: str | None = None,
                     grad_accum: int = 1, extra_param_copies: int = 0,
                     trained_models: int = 1, logits: bool = True,
                     logit_tokens: float | None = None, attention: str | None = None,
                     mask_kind: str = "causal", platform: str | None = None,
                     donated: bool = True) -> dict[str, float]:
  """Per-device bytes of one training step, by component ("total": the step's peak).

  rows: the micro-batch's global rows (batch_size / grad_accum; DPO/RM count chosen
  and rejected rows); trained_models: 2 for PPO's separate critic (its own params,
  grads, AdamW state and activations, no logits); logits=False for scalar-head models;
  logit_tokens: the global tokens the step unembeds (default rows * seq_len; GRPO and
  packed DPO unembed only the completions). attention: the resolved backend (default:
  model.attention resolved for `mask_kind` and seq_len keys on `platform`, None = this
  process's). donated=False: the step does not donate its state (the GRPO/PPO updates),
  so the new state sits next to the old one.
  """
  d, f, t = mesh
  policy = policy or m.resolved_remat_policy
  dtype = dtype or m.dtype
  c = 4 if dtype == "float32" else 2
  act = _activation_dtype(dtype, platform)
  backend = attention or attention_backend(m, mask_kind, seq_len, platform)
  N = num_params(m) * trained_models
  shard = f * t
  tokens = rows * seq_len / (d * f)
  out = {
      "params": 4 * N / shard,
      "grads": 4 * N / shard,
      "adam": 8 * N / shard,
      "accumulator": 4 * N / shard if grad_accum > 1 else 0.0,
      "extra_params": 4 * num_params(m) * extra_param_copies / shard,
      "state_copy": 0.0 if donated else 12 * N / shard,
      "gathered_layer": 2 * c * layer_params(m) / t if f > 1 else 0.0,
      # without remat the backward keeps every layer's compute-dtype weight copy
      "weight_copies": 2 * N / shard if policy == "none" and dtype != "float32" else 0.0,
  }
  per_layer = saved_bytes_per_token_layer(m, policy, seq_len, t, act, backend)
  # The layer whose backward runs: recomputed (with remat) it keeps all of `none` while
  # its MLP's backward runs; during its attention's backward, the attention residuals
  # and their gradients (`backward_transient_per_token`) -- whichever is larger.
  attn = attention_residual_per_token(m, seq_len, backend, t, act)
  grad_attn = attn + backward_transient_per_token(m, seq_len, backend, t)
  if policy == "none":
    working = grad_attn - attn
  else:
    none = saved_bytes_per_token_layer(m, "none", seq_len, t, act, backend)
    working = max(none - attn, grad_attn)
  out["activations"] = tokens * (m.n_layers * per_layer + working) * trained_models
  per_row = seq_len if logit_tokens is None else logit_tokens / rows
  out["logits"] = logits_bytes(m, rows / (d * f), per_row, t) if logits else 0.0
  out["attention"] = attention_scratch_bytes(m, rows / (d * f), seq_len, backend, t)
  static = ("params", "adam", "accumulator", "extra_params", "state_copy")
  backward = ("grads", "gathered_layer", "weight_copies", "activations", "logits", "attention")
  if not donated:  # XLA computes the gradients in the new state's (output) buffers
    backward = backward[1:]
  # the optimizer update: new params, mu, nu beside the old ones (the non-finite guard);
  # an undonated step writes them to its outputs (state_copy) instead
  out["update"] = 12 * N / shard if donated else 0.0
  out["total"] = (sum(out[k] for k in static)
                  + max(sum(out[k] for k in backward), out["update"]))
  return out


def generation_bytes(m: ModelConfig, *, rows: int, length: int, mesh=(1, 1, 1),
                     cache_dtype: str | None = None) -> float:
  """Per-device KV cache of the sampler: 2 (k, v) x L x rows x length x K x Dh x bytes of
  the cache dtype (default: the compute dtype; `sampling.resolve_kv_cache_dtype` stores a
  float32 model's cache in bfloat16 on GPU/TPU). Rows are sharded over data x fsdp, kv
  heads over tensor (`parallel.kv_cache_sharding`)."""
  d, f, t = mesh
  c = 4 if (cache_dtype or m.dtype) == "float32" else 2
  return 2 * m.n_layers * rows / (d * f) * length * m.n_kv_heads / t * m.head_dim * c


def generation_phase_bytes(m: ModelConfig, *, rows: int, prompt_len: int, length: int,
                           mesh=(1, 1, 1), platform: str | None = None,
                           group_size: int = 1) -> dict[str, float]:
  """Per-device bytes of `sampling.generate` beyond the float32 parameters, for `rows`
  global prompts of prompt_len tokens and a cache of `length` slots (prompt + new), each
  group of `group_size` rows prefilled once (`rollout.generate_group_size`).

  kv_cache: `generation_bytes` in the cache dtype the sampler picks on `platform`
  (+ the once-per-group prefill's cache while it is repeated to every row; on "cpu"
  XLA:CPU's float32 shadow of a bf16 cache it updates in place); weights: the
  compute-dtype copy of the unembedding (sharded like the parameters) and of the layer in
  use (gathered under FSDP); prefill: one layer's forward over the prompts at a time
  (`forward_transient_per_token`: dense attention's scores over every cache slot, or a
  memory-efficient backend's block); sampling: the float32 [rows, V] logits,
  log-softmax, filtered copy and Gumbel noise of one decode step. "total".
  """
  d, f, t = mesh
  D, F, H, K, Dh, V, _ = _dims(m)
  act = _activation_dtype(m.dtype, platform)
  c = 4 if act == "float32" else 2
  r = rows / (d * f)
  backend = attention_backend(m, "cached", length, platform)
  cache_dtype = "bfloat16" if m.dtype == "float32" and platform in ("gpu", "tpu") else m.dtype
  kv = generation_bytes(m, rows=rows, length=length, mesh=mesh, cache_dtype=cache_dtype)
  if group_size > 1:
    kv *= 1 + 1 / group_size
  if platform == "cpu" and cache_dtype != "float32":
    kv *= 3  # + a float32 copy of k and v
  prefill_rows = r / group_size
  out = {"kv_cache": kv,
         "weights": c * (V * D / (f * t) + layer_params(m) / t),
         "prefill": (prefill_rows * prompt_len
                     * forward_transient_per_token(m, length, backend, t, act)
                     + attention_scratch_bytes(m, prefill_rows, length, backend, t)),
         "sampling": 6 * 4 * r * V / t}
  out["total"] = sum(out.values())
  return out
