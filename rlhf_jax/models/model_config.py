"""`ModelConfig`: the architecture hyper-parameters of the one decoder (transformer.py).

Frozen (a static jit argument). Besides the Llama-family basics it drives the
per-layer attention features of Mistral, Qwen2 and Gemma 2 / 3, all off by default
(a config that does not set them runs exactly the Llama-family code path):

  sliding_window, window_pattern   local attention on the layers marked "L" in the
                                   pattern (cycled over the layers; "" = all local):
                                   a query at index i sees keys j with i - j < window
                                   (Mistral ""; Gemma 2 "LG"; Gemma 3 "LLLLLG")
  rope_local_theta                 RoPE base of the local layers (Gemma 3: 1e4)
  rope_linear_factor               HF rope_type "linear": positions / factor on the
                                   layers that use rope_theta (Gemma 3 4B+: 8)
  query_pre_attn_scalar            attention scale 1 / sqrt(this) (Gemma)
  attn_softcap, final_softcap      cap * tanh(x / cap) on attention scores / logits (Gemma 2)
  post_norms                       sandwich norms: RMSNorm on the attention and MLP
                                   outputs too (Gemma 2 / 3)

The remat policies (`REMAT_POLICIES`) live here too.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from rlhf_jax.models import attention

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
  # Per-layer attention features (module docstring); every default = off.
  sliding_window: int = 0       # keys a local layer's query sees (itself included); 0 = off
  window_pattern: str = ""      # "L" local / "G" global per layer, cycled; "" = all local
  rope_local_theta: float = 0.0  # RoPE base of the local layers; 0 = rope_theta
  rope_linear_factor: float = 1.0  # positions / factor on the rope_theta layers (HF "linear")
  query_pre_attn_scalar: float = 0.0  # scores * this^-0.5; 0 = head_dim^-0.5
  attn_softcap: float = 0.0     # scores -> cap * tanh(scores / cap); 0 = off
  final_softcap: float = 0.0    # logits -> cap * tanh(logits / cap); 0 = off
  post_norms: bool = False      # RMSNorm after attention and after the MLP as well

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
    if not isinstance(self.sliding_window, int) or self.sliding_window < 0:
      raise ValueError(f"model.sliding_window={self.sliding_window!r}: expected an int >= 0 "
                       f"(0 = off)")
    if set(self.window_pattern) - set("LG") or (self.window_pattern and not self.sliding_window):
      raise ValueError(f"model.window_pattern={self.window_pattern!r}: expected a string of "
                       f"'L' (local) and 'G' (global), with model.sliding_window > 0")
    for key in ("attn_softcap", "final_softcap", "query_pre_attn_scalar", "rope_local_theta"):
      if getattr(self, key) < 0:
        raise ValueError(f"model.{key}={getattr(self, key)!r}: expected >= 0 (0 = off)")
    if self.rope_linear_factor <= 0:
      raise ValueError(f"model.rope_linear_factor={self.rope_linear_factor!r}: expected > 0")

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def resolved_remat_policy(self) -> str:
    """remat_policy, or "full"/"none" from the legacy `remat` flag when it is ""."""
    return self.remat_policy or ("full" if self.remat else "none")

  @property
  def local_layers(self) -> tuple[bool, ...]:
    """Per layer: whether it attends within `sliding_window` (all False when off)."""
    pattern = (self.window_pattern or "L") if self.sliding_window else "G"
    return tuple(pattern[i % len(pattern)] == "L" for i in range(self.n_layers))

  @property
  def per_layer_attention(self) -> bool:
    """Whether layers differ (a window or a local RoPE base): the scan then carries a
    per-layer flag."""
    return any(self.local_layers)

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
    per_layer += 2 * D if self.post_norms else 0
    return L * per_layer + V * D * (1 if self.tie_embeddings else 2) + D
