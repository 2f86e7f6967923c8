"""Llama-family decoder LM as a Flax Linen module.

One architecture, driven by `ModelConfig` (model_config.py), covers Llama 2/3,
Mistral and Qwen2 (sliding windows; q/k/v biases), Qwen3 (QK-norm), SmolLM2 and the
Gemma family (norm offset, scaled embeddings, GeLU-tanh MLP; Gemma 2 / 3: sliding-window
layers, soft-capping, sandwich norms, query scaling, Gemma 3's two RoPE bases):

    h_0   = embed(tokens) [* sqrt(D) if embed_scale]
    h_l+1 = h_l + [N](Attn(RMSNorm(h_l))) ;  h_l+1 += [N](MLP(RMSNorm(h_l+1)))
    logits = [cap](RMSNorm(h_L) @ W_out)     (W_out = embed^T when tied)

([N]: the post_norms RMSNorms; [cap]: final_softcap.) Sliding-window layers attend to
the last `sliding_window` keys only (training, scoring and cached decoding alike; the
cache keeps every slot); which layers are local is a per-layer flag scanned with the
layer parameters.

Attention is grouped-query (H query heads share K kv heads), rotary position
embeddings use the "rotate half" convention of Hugging Face checkpoints
(Su et al. 2021, RoFormer), optionally with Llama-3 frequency scaling.
RMSNorm: x / sqrt(mean(x^2) + eps) * (offset + w) (Zhang & Sennrich 2019).
MLP: down(act(gate(x)) * up(x)) (Shazeer 2020, GLU variants).

Parameters are float32; `ModelConfig.dtype` sets the compute dtype
(bfloat16 on accelerators). Norms, softmax and logits run in float32.

The layers are `nn.scan`-ed (parameters stacked on a leading `layers` axis),
which keeps compile time flat in depth. Every parameter carries logical axis
names (see `rlhf_jax.parallel` for the mapping onto mesh axes).

Rematerialisation (`ModelConfig.remat_policy`, gradient checkpointing, Chen et
al. 2016) decides which activations of each block the backward pass keeps and
which it recomputes from the block's input (`REMAT_POLICIES`); every policy
gives the same loss and gradients, only memory and recompute differ.

Models know nothing of RL: the module maps tokens to logits or hidden states,
optionally reading and writing a KV cache for `rlhf_jax.sampling`.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from rlhf_jax.models import attention, attention_mask
# ModelConfig and the remat policies live in model_config.py; re-exported here.
from rlhf_jax.models.model_config import (REMAT_POLICIES, ModelConfig,  # noqa: F401
                                          remat_policy_fn)
from rlhf_jax.models.segments import positions_from_segments

Array = jax.Array
NEG_INF = attention_mask.NEG_INF

# ----------------------------------------------------------------------------
# RoPE
# ----------------------------------------------------------------------------

def rope_inv_freq(head_dim: int, theta: float, scaling=None):
  """Inverse frequencies theta^(-2i/d), optionally with Llama-3 scaling.

  Llama-3 scaling (Meta 2024, "The Llama 3 Herd of Models"): wavelengths
  longer than orig/low_freq_factor are divided by `factor`, shorter than
  orig/high_freq_factor are kept, and the band between is interpolated.
  """
  inv = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  if scaling is None:
    return inv
  factor, low, high, orig = scaling
  wavelen = 2 * math.pi / inv
  low_wavelen, high_wavelen = orig / low, orig / high
  smooth = (orig / wavelen - low) / (high - low)
  scaled = jnp.where(wavelen > low_wavelen, inv / factor, inv)
  mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
  return jnp.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)


def apply_rope(x_BTNd: Array, positions_BT: Array, inv_freq) -> Array:
  """Rotate-half RoPE in float32: x*cos + rotate_half(x)*sin."""
  angles = positions_BT[..., None].astype(jnp.float32) * inv_freq  # [B, T, d/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
  x = x_BTNd.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return (x * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x_BTNd.dtype)


# ----------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------

def _init(std, names):
  return nn.with_logical_partitioning(nn.initializers.normal(std), names)


class RMSNorm(nn.Module):
  eps: float = 1e-5
  offset: float = 0.0
  dtype: Any = jnp.float32
  axis_name: str = "norm"

  @nn.compact
  def __call__(self, x):
    init = nn.initializers.zeros if self.offset else nn.initializers.ones
    scale = self.param("scale", nn.with_logical_partitioning(init, (self.axis_name,)),
                       (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * (self.offset + scale)).astype(self.dtype)


class Block(nn.Module):
  """One pre-norm transformer block; scanned over layers by `Transformer`."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x_BTD, layer_cache, is_local, positions_BT, mask, cache_index):
    """is_local: this layer's bool flag (scanned) when `config.per_layer_attention`, else
    None: a local layer attends within the sliding window and uses the local RoPE base."""
    c = self.config
    dt = c.compute_dtype
    H, K, Dh, D = c.n_heads, c.n_kv_heads, c.head_dim, c.d_model
    std = 0.02

    def proj(name, n, names):
      return nn.DenseGeneral(
          (n, Dh), use_bias=c.attn_bias, dtype=dt, param_dtype=jnp.float32, name=name,
          kernel_init=_init(std, ("embed",) + names),
          bias_init=nn.with_logical_partitioning(nn.initializers.zeros, names))

    # Projections and the MLP run on [B*T, ...] rows: a matmul whose weight gradient
    # contracts one (B*T) axis instead of two (B, T) is ~2x faster on XLA:CPU
    # (experiments/throughput/NOTES.md); the parameters and results are the same.
    B, T = x_BTD.shape[:2]
    h_ND = RMSNorm(c.norm_eps, c.norm_offset, dt, name="attn_norm")(x_BTD).reshape(B * T, D)
    q_BTHd = proj("q", H, ("heads", "head_dim"))(h_ND).reshape(B, T, H, Dh)
    k_BTKd = proj("k", K, ("kv_heads", "head_dim"))(h_ND).reshape(B, T, K, Dh)
    v_BTKd = proj("v", K, ("kv_heads", "head_dim"))(h_ND).reshape(B, T, K, Dh)
    if c.qk_norm:
      q_BTHd = RMSNorm(c.norm_eps, c.norm_offset, dt, "head_dim", name="q_norm")(q_BTHd)
      k_BTKd = RMSNorm(c.norm_eps, c.norm_offset, dt, "head_dim", name="k_norm")(k_BTKd)
    inv_freq = rope_inv_freq(Dh, c.rope_theta, c.rope_scaling)
    if c.rope_linear_factor != 1.0:
      inv_freq = inv_freq / c.rope_linear_factor
    if is_local is not None:
      if c.rope_local_theta:
        inv_freq = jnp.where(is_local, rope_inv_freq(Dh, c.rope_local_theta), inv_freq)
      big = jnp.iinfo(jnp.int32).max // 2  # a global layer: no key is out of the window
      mask = mask.replace(window=jnp.where(is_local, c.sliding_window, big).astype(jnp.int32))
    q_BTHd = checkpoint_name(apply_rope(q_BTHd, positions_BT, inv_freq), "query_proj")
    k_BTKd = checkpoint_name(apply_rope(k_BTKd, positions_BT, inv_freq), "key_proj")
    v_BTKd = checkpoint_name(v_BTKd, "value_proj")  # names: identity ops for remat policies

    extra = {}  # Gemma's query scaling and score soft-capping (only when set)
    if c.query_pre_attn_scalar:
      extra["scale"] = c.query_pre_attn_scalar ** -0.5
    if c.attn_softcap:
      extra["softcap"] = c.attn_softcap
    if layer_cache is None:
      new_cache = None
      attn_BTHd = attention.attend(q_BTHd, k_BTKd, v_BTKd, mask, backend=c.attention, **extra)
    else:
      # Cached: attend to the cache (read only) and to the T new keys; the caller
      # writes the returned new K/V into the cache (no per-layer copy of the cache).
      k_BSKd, v_BSKd = (x.astype(dt) for x in layer_cache)
      new_cache = (k_BTKd.astype(layer_cache[0].dtype), v_BTKd.astype(layer_cache[1].dtype))
      attn_BTHd = attention.attend(q_BTHd, k_BSKd, v_BSKd, mask, backend=c.attention,
                                   new_k_BTKd=k_BTKd, new_v_BTKd=v_BTKd, **extra)
    attn_NHd = attn_BTHd.reshape(B * T, H, Dh)
    out_ND = nn.DenseGeneral(D, axis=(-2, -1), use_bias=False, dtype=dt,
                             param_dtype=jnp.float32, name="o",
                             kernel_init=_init(std, ("heads", "head_dim", "embed")))(attn_NHd)
    if c.post_norms:  # sandwich norm (Gemma 2 / 3)
      out_ND = RMSNorm(c.norm_eps, c.norm_offset, dt, name="post_attn_norm")(out_ND)
    x_BTD = x_BTD + out_ND.reshape(B, T, D)

    h = RMSNorm(c.norm_eps, c.norm_offset, dt, name="mlp_norm")(x_BTD).reshape(B * T, D)

    def dense(name, n, names):
      return nn.Dense(n, use_bias=c.mlp_bias, dtype=dt, param_dtype=jnp.float32, name=name,
                      kernel_init=_init(std, names),
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, names[1:]))

    act = nn.silu if c.activation == "silu" else (lambda z: nn.gelu(z, approximate=True))
    g = act(dense("gate", c.d_ff, ("embed", "mlp"))(h)) * dense("up", c.d_ff, ("embed", "mlp"))(h)
    y_ND = dense("down", D, ("mlp", "embed"))(g)
    if c.post_norms:
      y_ND = RMSNorm(c.norm_eps, c.norm_offset, dt, name="post_mlp_norm")(y_ND)
    x_BTD = x_BTD + y_ND.reshape(B, T, D)
    return x_BTD.astype(dt), new_cache


class Transformer(nn.Module):
  """Decoder LM.

  __call__(tokens_BT, segment_ids_BT=None, positions_BT=None, *, cache=None,
           cache_index=None, kv_mask_BS=None, output="logits", shared_prefix=False)
      -> (out, cache)

  * Training / scoring (cache=None): `segment_ids_BT` (int, 0 = padding,
    default all ones) defines padding and packed sequences; positions default to
    `positions_from_segments`. Attention is causal within a segment; with
    `shared_prefix=True` segment 1 is a prefix every other segment also attends to
    (`shared_prefix_mask`; positions_BT must then be given, see `pack_shared_prefix`).
  * Cached (sampling): `cache = (k_LBSKd, v_LBSKd)` from `init_cache`; the T
    new tokens go into slots cache_index..cache_index+T-1; `kv_mask_BS` marks
    which slots hold real tokens; `positions_BT` must be given.

  out: float32 logits [B, T, V] (output="logits") or the final-norm hidden
  states [B, T, D] in the compute dtype (output="hidden", for scalar heads).
  """

  config: ModelConfig

  def setup(self):
    c = self.config
    self.embed = nn.Embed(c.vocab_size, c.d_model, param_dtype=jnp.float32,
                          embedding_init=_init(0.02, ("vocab", "embed")))
    policy = c.resolved_remat_policy
    block = (Block if policy == "none" else
             nn.remat(Block, prevent_cse=False, policy=remat_policy_fn(policy)))
    self.layers = nn.scan(
        block, variable_axes={"params": 0}, split_rngs={"params": True},
        in_axes=(0, 0, nn.broadcast, nn.broadcast, nn.broadcast), length=c.n_layers,
        metadata_params={nn.PARTITION_NAME: "layers"})(c)
    self.final_norm = RMSNorm(c.norm_eps, c.norm_offset, c.compute_dtype)
    if not c.tie_embeddings:
      self.lm_head = self.param("lm_head", _init(0.02, ("embed", "vocab")),
                                (c.d_model, c.vocab_size), jnp.float32)

  def __call__(self, tokens_BT, segment_ids_BT=None, positions_BT=None, *, cache=None,
               cache_index=None, kv_mask_BS=None, output="logits", shared_prefix=False):
    c = self.config
    B, T = tokens_BT.shape
    if shared_prefix:
      if cache is not None or segment_ids_BT is None or positions_BT is None:
        raise ValueError("shared_prefix=True needs segment_ids_BT and positions_BT, no cache")
      mask = attention_mask.shared_prefix_mask(segment_ids_BT)
      cache_index = 0
    elif cache is None:
      if segment_ids_BT is None:
        segment_ids_BT = jnp.ones((B, T), jnp.int32)
      if positions_BT is None:
        positions_BT = positions_from_segments(segment_ids_BT)
      mask = attention_mask.causal_mask(segment_ids_BT)
      cache_index = 0
    else:
      if positions_BT is None or kv_mask_BS is None or cache_index is None:
        raise ValueError("cached call needs positions_BT, kv_mask_BS and cache_index")
      mask = attention_mask.cached_mask(kv_mask_BS, cache_index, T)
    S = mask.kv_segment_BS.shape[1]
    is_local_L = None
    if c.per_layer_attention:
      is_local_L = jnp.asarray(c.local_layers)
      if shared_prefix:  # windows count positions: the packed row's indices are not
        mask = mask.replace(q_index_BT=positions_BT, kv_index_BS=positions_BT)
    features = attention.model_features(c)
    if attention.resolve(c.attention, mask.kind, kv_len=S, dtype=c.compute_dtype,
                         features=features) == "dense" and is_local_L is None:
      mask = mask.with_dense()  # the [B, T, S] matrix once, not once per layer
    x = self.embed(tokens_BT).astype(c.compute_dtype)
    if c.embed_scale:
      x = x * jnp.asarray(math.sqrt(c.d_model), c.compute_dtype)
    x, new_kv = self.layers(x, cache, is_local_L, positions_BT, mask, cache_index)
    new_cache = None
    if cache is not None:  # the layers return the new tokens' K/V; write them once here
      new_cache = tuple(jax.lax.dynamic_update_slice(c_, n_, (0, 0, cache_index, 0, 0))
                        for c_, n_ in zip(cache, new_kv))
    h = self.final_norm(x)
    if output == "hidden":
      return h, new_cache
    if output != "logits":
      raise ValueError(f"output={output!r}: expected 'logits' or 'hidden'")
    return self.unembed(h), new_cache

  def unembed(self, h_BTD):
    """float32 logits [B, T, V] from final hidden states."""
    c = self.config
    B, T, D = h_BTD.shape
    h_ND = h_BTD.reshape(B * T, D).astype(c.compute_dtype)  # 2-D matmul (see Block)
    if c.tie_embeddings:
      w_VD = self.embed.embedding
      logits_NV = jnp.einsum("nd,vd->nv", h_ND, w_VD.astype(c.compute_dtype),
                             preferred_element_type=jnp.float32)
    else:
      logits_NV = jnp.einsum("nd,dv->nv", h_ND, self.lm_head.astype(c.compute_dtype),
                             preferred_element_type=jnp.float32)
    if c.final_softcap:  # Gemma 2
      logits_NV = c.final_softcap * jnp.tanh(logits_NV / c.final_softcap)
    return logits_NV.reshape(B, T, -1)


def init_cache(config: ModelConfig, batch: int, length: int, dtype=None):
  """Zeroed KV cache (k_LBSKd, v_LBSKd) in the compute dtype."""
  dtype = dtype or config.compute_dtype
  shape = (config.n_layers, batch, length, config.n_kv_heads, config.head_dim)
  return (jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


def init_params(config: ModelConfig, rng, boxed: bool = False):
  """Random float32 parameters (plain pytree; `boxed=True` keeps logical-axis boxes)."""
  tokens = jnp.zeros((1, 2), jnp.int32)
  variables = Transformer(config).init(rng, tokens)
  params = variables["params"]
  return params if boxed else nn.meta.unbox(params)
