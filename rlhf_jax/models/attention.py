"""Attention backends behind one function: `attend(q, k, v, mask, backend=...)`.

Every backend computes the same grouped-query attention (H query heads share K
kv heads, G = H / K):

    out[b, t, h] = sum_s softmax_s(scale * q[b, t, h] . k[b, s, h // G] | visible)[s] v[b, s, h // G]

with one visibility rule for every mask the model uses (`AttentionMask`, in
attention_mask.py):

    visible(t, s) = kv_seg[s] > 0  and  kv_idx[s] <= q_idx[t]
                    and (kv_seg[s] == q_seg[t]  or  (shared_prefix and kv_seg[s] == 1))

* kind "causal": causal attention within a segment; segment id 0 is padding (left or
  right), several positive ids in one row are packed sequences.
* kind "shared_prefix": rows packed as [prefix | continuation 1 | continuation 2 ...]
  (`segments.pack_shared_prefix`): segment 1 is a prefix every later segment sees.
* kind "cached": decoding against a KV cache. The keys are the S cache slots (visible
  iff filled before this call: kv_seg) and then the T new tokens themselves (causal
  among themselves, new_segment_BT marks the real ones). The cache is read, never
  copied (the caller writes the new K/V once after the layers).

Two per-model features on top (Mistral / Qwen2 / Gemma 2 / 3; `model_features`):

* "window": sliding-window layers, visible(t, s) also needs q_idx[t] - kv_idx[s] < window
  (`AttentionMask.window`, a traced per-layer scalar);
* "softcap": scores -> softcap * tanh(scores / softcap) before masking (Gemma 2).

dense and chunked support both; cudnn and splash support neither and are refused for
such a model (`resolve`), "auto" then picks dense / chunked.

A query that sees no key gets the uniform average of the values (dense: softmax of
equal -1e30 logits; chunked reproduces it), never NaN.

Backends (`ModelConfig.attention`; dense and the dispatch live here, chunked in
attention_chunked.py, cudnn and splash in attention_kernels.py):

  dense    the reference: float32 scores [B, K, G, T, S] and a boolean mask; supports
           every kind. Memory O(T S) per head, kept for the backward pass.
  chunked  memory-efficient attention written here in plain JAX (blockwise with an
           online softmax, Rabe & Staats 2021; FlashAttention-2's backward, Dao 2023:
           only the output and the row log-sum-exp are saved, the scores are
           recomputed block by block). Runs on every platform including CPU;
           memory O(T * block). Written by hand because no kernel shipped with JAX runs
           on CPU with segment ids, a shared prefix and a KV cache at O(T) memory
           (jax.nn.dot_product_attention's "xla" path materialises [T, S]).
  cudnn    jax.nn.dot_product_attention(implementation="cudnn") on GPU (cuDNN flash
           attention), with the visibility rule passed as a boolean mask.
  splash   the Pallas splash-attention TPU kernel shipped with JAX
           (jax.experimental.pallas.ops.tpu.splash_attention) with causal + segment ids
           for training and scoring. It has no decode mode: cached decoding under
           `splash` runs `chunked` (which skips the unfilled cache blocks). It cannot
           express the shared-prefix mask and refuses it (`check_config`).
  auto     the best available on the running platform for the kind (`resolve`).
"""
from __future__ import annotations

BACKENDS = ("auto", "dense", "chunked", "cudnn", "splash")
MASK_KINDS = ("causal", "shared_prefix", "cached")

import math

import jax
import jax.numpy as jnp

from rlhf_jax.models.attention_chunked import _chunked
from rlhf_jax.models.attention_kernels import _cudnn, _splash
from rlhf_jax.models.attention_mask import NEG_INF, AttentionMask

Array = jax.Array

# Which mask kinds each backend expresses (the dense reference: all of them).
SUPPORTS = {"dense": set(MASK_KINDS), "chunked": set(MASK_KINDS),
            "cudnn": set(MASK_KINDS), "splash": {"causal", "cached"}}
FEATURES = ("window", "softcap")
SUPPORTS_FEATURES = {"dense": set(FEATURES), "chunked": set(FEATURES), "cudnn": set(),
                     "splash": set()}
# Above this many keys "auto" leaves the dense path on CPU (its [T, S] scores dominate
# memory); below it the dense einsums are the fastest on XLA:CPU (the spec workloads).
AUTO_DENSE_MAX_KEYS = 2048
DEFAULT_BLOCK_Q = 512
DEFAULT_BLOCK_K = 512


# ----------------------------------------------------------------------------
# Backend choice
# ----------------------------------------------------------------------------

def supports(backend: str, kind: str) -> bool:
  """Whether `backend` expresses the mask kind (module docstring; auto: every kind)."""
  return backend == "auto" or kind in SUPPORTS[backend]


def model_features(config) -> frozenset:
  """The FEATURES a ModelConfig's attention needs (empty for Llama-family models)."""
  return frozenset(({"window"} if config.per_layer_attention and config.sliding_window else set())
                   | ({"softcap"} if config.attn_softcap else set()))


def available(backend: str, platform: str | None = None) -> bool:
  """Whether `backend` runs on `platform` (default: jax.default_backend())."""
  platform = platform or jax.default_backend()
  return {"dense": True, "chunked": True, "auto": True, "cudnn": platform == "gpu",
          "splash": platform == "tpu"}[backend]


def resolve(backend: str, kind: str, platform: str | None = None,
            kv_len: int | None = None, dtype=None, features=frozenset()) -> str:
  """The concrete backend that runs attention of `kind` with `kv_len` keys.

  auto: TPU -> splash where it expresses the kind; GPU -> cudnn for bfloat16 / float16
  compute (`dtype`; cuDNN has no float32 flash attention) except for decoding; decoding
  on GPU/TPU -> chunked (it reads the cache in place and skips unfilled blocks, where
  cudnn would copy the cache per layer); otherwise (CPU, and TPU
  for shared-prefix / cached masks) dense up to AUTO_DENSE_MAX_KEYS keys (the fastest
  on XLA:CPU at short lengths; results bitwise as before), chunked above. An explicit backend that cannot
  express `kind` or run on `platform` raises ValueError (validated before any run by
  `check_config`). `features` (`model_features`): a backend that lacks one is refused
  (explicit) or passed over (auto)."""
  platform = platform or jax.default_backend()
  features = frozenset(features)
  if backend == "auto":
    if platform == "tpu" and supports("splash", kind) and features <= SUPPORTS_FEATURES["splash"]:
      return "splash"
    if (platform == "gpu" and kind != "cached" and _half(dtype)
        and features <= SUPPORTS_FEATURES["cudnn"]):
      return "cudnn"
    if kind == "cached" and platform in ("gpu", "tpu"):
      return "chunked"  # reads the cache in place and skips its unfilled blocks
    return "dense" if kv_len is not None and kv_len <= AUTO_DENSE_MAX_KEYS else "chunked"
  if backend not in SUPPORTS:
    raise ValueError(f"model.attention={backend!r}: expected one of {', '.join(BACKENDS)}")
  if not supports(backend, kind):
    raise ValueError(f"model.attention={backend!r} cannot express the {kind!r} attention "
                     f"mask (it supports {sorted(SUPPORTS[backend])}); use 'auto', "
                     f"'chunked' or 'dense'")
  if features - SUPPORTS_FEATURES[backend]:
    raise ValueError(f"model.attention={backend!r} does not support "
                     f"{' and '.join(sorted(features - SUPPORTS_FEATURES[backend]))} attention "
                     f"(sliding window: model.sliding_window; soft-capping: "
                     f"model.attn_softcap); use 'auto', 'chunked' or 'dense'")
  if not available(backend, platform):
    raise ValueError(f"model.attention={backend!r} does not run on {platform!r} "
                     f"(cudnn: GPU only, splash: TPU only); use 'auto' or 'chunked'")
  if backend == "cudnn" and dtype is not None and not _half(dtype):
    raise ValueError(f"model.attention='cudnn' needs bfloat16 or float16 compute, got "
                     f"model.dtype={jnp.dtype(dtype).name}; use 'auto' or 'chunked'")
  return backend


def _half(dtype) -> bool:
  """bfloat16 / float16 (None: unknown, taken as yes)."""
  return dtype is None or jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def check_config(backend: str, kinds, platform: str | None = None,
                 features=frozenset()) -> None:
  """Raise ValueError naming model.attention when `backend` cannot run every mask kind a
  run needs (`kinds`: e.g. {"causal", "cached"} for a trainer that samples) with the
  model's `features` (`model_features`)."""
  for kind in sorted(kinds):
    resolve(backend, kind, platform, features=features)


# ----------------------------------------------------------------------------
# attend: the one entry point
# ----------------------------------------------------------------------------

def attend(q_BTHd: Array, k_BSKd: Array, v_BSKd: Array, mask: AttentionMask, *,
           backend: str = "auto", scale: float | None = None,
           new_k_BTKd: Array | None = None, new_v_BTKd: Array | None = None,
           block_q: int = DEFAULT_BLOCK_Q, block_k: int = DEFAULT_BLOCK_K,
           softcap: float = 0.0) -> Array:
  """Grouped-query attention of T queries over S keys under `mask`: out [B, T, H, Dh].

  q_BTHd: queries (H heads), k_BSKd / v_BSKd: keys and values (K kv heads, H % K == 0),
  all in the compute dtype; scores and softmax run in float32, the probabilities are
  cast to the compute dtype for the value product. For mask.kind "cached", k/v are
  the cache (read only) and new_k_BTKd / new_v_BTKd the T new tokens' keys and values.
  scale defaults to 1 / sqrt(Dh). block_q / block_k: tile sizes of `chunked`.
  softcap > 0: scores -> softcap * tanh(scores / softcap) (after scale, before masking).
  """
  Dh = q_BTHd.shape[-1]
  scale = 1.0 / math.sqrt(Dh) if scale is None else scale
  if (mask.kind == "cached") != (new_k_BTKd is not None):
    raise ValueError("attend: new_k_BTKd / new_v_BTKd go with (and only with) a cached mask")
  features = ({"window"} if mask.window is not None else set()) | (
      {"softcap"} if softcap else set())
  name = resolve(backend, mask.kind, kv_len=k_BSKd.shape[1], dtype=v_BSKd.dtype,
                 features=features)
  if name == "dense":
    return _dense(q_BTHd, k_BSKd, v_BSKd, mask, scale, new_k_BTKd, new_v_BTKd, softcap)
  if name == "chunked":
    return _chunked(q_BTHd, k_BSKd, v_BSKd, mask, scale, new_k_BTKd, new_v_BTKd,
                    block_q, block_k, softcap)
  if name == "cudnn":
    return _cudnn(q_BTHd, k_BSKd, v_BSKd, mask, scale, new_k_BTKd, new_v_BTKd)
  if mask.kind == "cached":  # splash has no decode kernel (module docstring)
    return _chunked(q_BTHd, k_BSKd, v_BSKd, mask, scale, new_k_BTKd, new_v_BTKd,
                    block_q, block_k)
  return _splash(q_BTHd, k_BSKd, v_BSKd, mask, scale)


def _dense(q_BTHd, k_BSKd, v_BSKd, mask, scale, new_k_BTKd, new_v_BTKd, softcap=0.0):
  """The reference: every score [B, K, G, T, S] in float32."""
  B, T, H, Dh = q_BTHd.shape
  K = k_BSKd.shape[2]
  dt = v_BSKd.dtype
  q_BTKGd = q_BTHd.reshape(B, T, K, H // K, Dh)
  cap = (lambda s: softcap * jnp.tanh(s / softcap)) if softcap else (lambda s: s)
  if mask.kind != "cached":
    logits = cap(jnp.einsum("btkgd,bskd->bkgts", q_BTKGd, k_BSKd,
                            preferred_element_type=jnp.float32) * scale)
    logits = jnp.where(mask.dense_matrix()[:, None, None], logits, NEG_INF)
    probs = jax.nn.softmax(logits, axis=-1).astype(dt)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v_BSKd)
  else:
    old_mask_BTS, new_mask_BTT = mask.dense_matrix()
    lo = cap(jnp.einsum("btkgd,bskd->bkgts", q_BTKGd, k_BSKd,
                        preferred_element_type=jnp.float32) * scale)
    ln = cap(jnp.einsum("btkgd,bskd->bkgts", q_BTKGd, new_k_BTKd,
                        preferred_element_type=jnp.float32) * scale)
    lo = jnp.where(old_mask_BTS[:, None, None], lo, NEG_INF)
    ln = jnp.where(new_mask_BTT[:, None, None], ln, NEG_INF)
    probs = jax.nn.softmax(jnp.concatenate([lo, ln], axis=-1), axis=-1).astype(dt)
    S = k_BSKd.shape[1]
    out = (jnp.einsum("bkgts,bskd->btkgd", probs[..., :S], v_BSKd)
           + jnp.einsum("bkgts,bskd->btkgd", probs[..., S:], new_v_BTKd))
  return out.reshape(B, T, H, Dh)
