"""Llama-family decoder LM as a Flax Linen module.

One architecture, driven by `ModelConfig`, covers Llama 2/3, Mistral, Qwen2
(q/k/v biases), Qwen3 (QK-norm), SmolLM2 and Gemma-style models (norm offset,
scaled embeddings, GeLU-tanh MLP):

    h_0   = embed(tokens) [* sqrt(D) if embed_scale]
    h_l+1 = h_l + Attn(RMSNorm(h_l)) ;  h_l+1 += MLP(RMSNorm(h_l+1))
    logits = RMSNorm(h_L) @ W_out            (W_out = embed^T when tied)

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

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from rlhf_jax.models import attention, attention_mask
from rlhf_jax.models.segments import positions_from_segments

Array = jax.Array
NEG_INF = attention_mask.NEG_INF

# What each block keeps for the backward pass (`ModelConfig.remat_policy`). Per layer
# and token, with D model width, F MLP width, H/K query/kv heads of size Dh, S keys:
#   none           everything the backward needs (no recompute); includes the float32
#                  attention scores and probabilities, H*S values per token
#   full           only the block input (D values); the whole block is recomputed
#   dots           every matmul output, incl. the attention scores (H*S per token)
#                  (jax.checkpoint_policies.dots_saveable); norms, RoPE, softmax and
#                  activations recomputed
#   dots_no_batch  the projection outputs q, k, v, o, gate, up, down ((H+2K)*Dh + 2D + 2F)
#                  but not the attention einsums (dots_with_no_batch_dims_saveable);
#                  recomputes attention and the elementwise ops
#   qkv_proj       the block input and the RoPE'd q, k and v ((H+2K)*Dh); recomputes
#                  attention and the MLP (MaxText's "save_qkv_proj")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "qkv_proj")
_QKV_NAMES = ("query_proj", "key_proj", "value_proj")


def remat_policy_fn(name: str):
  """The `jax.checkpoint` policy of a remat policy name (None = save nothing)."""
  policies = jax.checkpoint_policies
  return {"full": None,
          "dots": policies.dots_saveable,
          "dots_no_batch": policies.dots_with_no_batch_dims_saveable,
          "qkv_proj": policies.save_only_these_names(*_QKV_NAMES)}[name]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture hyper-parameters. Frozen, so it can be a static jit argument."""

  vocab_size: int = 256
  d_model: int = 64
  n_layers: int = 2
  n_heads: int = 4
  n_kv_heads: int = 2
  head_dim: int = 16
  d_ff: int = 128
  rope_theta: float = 10000.0
  # Llama-3 style RoPE scaling; None or a tuple
  # (factor, low_freq_factor, high_freq_factor, original_max_position_embeddings).
  rope_scaling: tuple[float, float, float, int] | None = None
  norm_eps: float = 1e-5
  norm_offset: float = 0.0      # Gemma stores w and scales by (1 + w): offset 1.0
  embed_scale: bool = False     # Gemma multiplies embeddings by sqrt(d_model)
  tie_embeddings: bool = True
  attn_bias: bool = False       # q/k/v projection biases (Qwen2)
  mlp_bias: bool = False
  qk_norm: bool = False         # RMSNorm on q and k per head (Qwen3)
  activation: str = "silu"      # "silu" (SwiGLU) or "gelu_tanh" (GeGLU, Gemma)
  max_seq_len: int = 2048
  dtype: str = "float32"        # compute dtype: "float32" or "bfloat16"
  remat: bool = False           # legacy switch: True = remat_policy "full"
  remat_policy: str = ""        # "" = from `remat`; else one of REMAT_POLICIES (wins over remat)
  # Attention backend (rlhf_jax/models/attention.py: BACKENDS): "auto" | "dense" |
  # "chunked" | "cudnn" | "splash". Every backend computes the same function.
  attention: str = "auto"
  # Tokens per chunk of the unembed -> log-softmax -> target gather in log-prob passes
  # (rlhf_jax/losses/logprobs.py: chunked_token_logprobs); 0 = whole [B, T, V] at once.
  logits_chunk: int = 0

  def __post_init__(self):
    if self.n_heads % self.n_kv_heads:
      raise ValueError(f"model.n_heads={self.n_heads} must be a multiple of "
                       f"model.n_kv_heads={self.n_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"model.head_dim={self.head_dim} must be even (RoPE)")
    if self.activation not in ("silu", "gelu_tanh"):
      raise ValueError(f"model.activation={self.activation!r}: expected 'silu' or 'gelu_tanh'")
    if self.dtype not in ("float32", "bfloat16", "float16"):
      raise ValueError(f"model.dtype={self.dtype!r}: expected float32, bfloat16 or float16")
    if self.remat_policy not in ("",) + REMAT_POLICIES:
      raise ValueError(f"model.remat_policy={self.remat_policy!r}: expected one of "
                       f"{', '.join(REMAT_POLICIES)} (or '' = from model.remat)")
    if self.attention not in attention.BACKENDS:
      raise ValueError(f"model.attention={self.attention!r}: expected one of "
                       f"{', '.join(attention.BACKENDS)}")
    if not isinstance(self.logits_chunk, int) or self.logits_chunk < 0:
      raise ValueError(f"model.logits_chunk={self.logits_chunk!r}: expected an int >= 0 "
                       f"(tokens per chunk; 0 = off)")
    if self.rope_scaling is not None:
      object.__setattr__(self, "rope_scaling", tuple(self.rope_scaling))

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def resolved_remat_policy(self) -> str:
    """remat_policy, or "full"/"none" from the legacy `remat` flag when it is ""."""
    return self.remat_policy or ("full" if self.remat else "none")

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
      raise ValueError(f"unknown model config keys {sorted(unknown)}; valid: {sorted(names)}")
    return cls(**d)

  def num_params(self) -> int:
    D, F, H, K, Dh, V, L = (self.d_model, self.d_ff, self.n_heads, self.n_kv_heads,
                            self.head_dim, self.vocab_size, self.n_layers)
    per_layer = D * Dh * (H + 2 * K) + H * Dh * D + 3 * D * F + 2 * D
    return L * per_layer + V * D * (1 if self.tie_embeddings else 2) + D


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
  def __call__(self, x_BTD, layer_cache, positions_BT, mask, cache_index):
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
    q_BTHd = checkpoint_name(apply_rope(q_BTHd, positions_BT, inv_freq), "query_proj")
    k_BTKd = checkpoint_name(apply_rope(k_BTKd, positions_BT, inv_freq), "key_proj")
    v_BTKd = checkpoint_name(v_BTKd, "value_proj")  # names: identity ops for remat policies

    if layer_cache is None:
      new_cache = None
      attn_BTHd = attention.attend(q_BTHd, k_BTKd, v_BTKd, mask, backend=c.attention)
    else:
      # Cached: attend to the cache (read only) and to the T new keys; the caller
      # writes the returned new K/V into the cache (no per-layer copy of the cache).
      k_BSKd, v_BSKd = (x.astype(dt) for x in layer_cache)
      new_cache = (k_BTKd.astype(layer_cache[0].dtype), v_BTKd.astype(layer_cache[1].dtype))
      attn_BTHd = attention.attend(q_BTHd, k_BSKd, v_BSKd, mask, backend=c.attention,
                                   new_k_BTKd=k_BTKd, new_v_BTKd=v_BTKd)
    attn_NHd = attn_BTHd.reshape(B * T, H, Dh)
    out_ND = nn.DenseGeneral(D, axis=(-2, -1), use_bias=False, dtype=dt,
                             param_dtype=jnp.float32, name="o",
                             kernel_init=_init(std, ("heads", "head_dim", "embed")))(attn_NHd)
    x_BTD = x_BTD + out_ND.reshape(B, T, D)

    h = RMSNorm(c.norm_eps, c.norm_offset, dt, name="mlp_norm")(x_BTD).reshape(B * T, D)

    def dense(name, n, names):
      return nn.Dense(n, use_bias=c.mlp_bias, dtype=dt, param_dtype=jnp.float32, name=name,
                      kernel_init=_init(std, names),
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, names[1:]))

    act = nn.silu if c.activation == "silu" else (lambda z: nn.gelu(z, approximate=True))
    g = act(dense("gate", c.d_ff, ("embed", "mlp"))(h)) * dense("up", c.d_ff, ("embed", "mlp"))(h)
    x_BTD = x_BTD + dense("down", D, ("mlp", "embed"))(g).reshape(B, T, D)
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
        in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast), length=c.n_layers,
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
    if attention.resolve(c.attention, mask.kind, kv_len=S, dtype=c.compute_dtype) == "dense":
      mask = mask.with_dense()  # the [B, T, S] matrix once, not once per layer
    x = self.embed(tokens_BT).astype(c.compute_dtype)
    if c.embed_scale:
      x = x * jnp.asarray(math.sqrt(c.d_model), c.compute_dtype)
    x, new_kv = self.layers(x, cache, positions_BT, mask, cache_index)
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
