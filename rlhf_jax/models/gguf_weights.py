"""GGUF (llama.cpp) weights: tensor names, Q/K un-permutation, RoPE scaling, ModelConfig.

`_load_gguf(path)` reads a `.gguf` file of architecture llama, qwen2, qwen3, gemma,
gemma2 or gemma3, any quantisation `gguf.quants.dequantize` knows, into our param tree
(via the HF names of `weight_layout`).

Gemma in llama.cpp: the converter stores every RMSNorm weight as 1 + w (llama.cpp's
norm has no offset), so 1 is subtracted back (exact for stored weights >= 0.5); the
local/global layer pattern, the local RoPE base (1e4) and the query scale follow
llama.cpp's gemma2 / gemma3 graphs (llama-model.cpp), which the metadata does not carry.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from rlhf_jax import gguf_file
from rlhf_jax.models.transformer import ModelConfig
from rlhf_jax.models.weight_layout import _Source, _params_from_hf

GGUF_SUPPORTED = ("llama", "qwen2", "qwen3", "gemma", "gemma2", "gemma3")
_GEMMA_BLOCK = {"ffn_norm.weight": "pre_feedforward_layernorm.weight",  # gemma2 / gemma3
                "post_attention_norm.weight": "post_attention_layernorm.weight",
                "post_ffw_norm.weight": "post_feedforward_layernorm.weight"}
# llama.cpp's model sizes whose query scale is (d_model / n_heads)^-0.5: the 27Bs
_GEMMA_QUERY_BY_WIDTH = {"gemma2": 46, "gemma3": 62}  # by block count
_GGUF_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight",
                "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
_GGUF_BLOCK = {"attn_norm.weight": "input_layernorm.weight",
               "attn_q.weight": "self_attn.q_proj.weight",
               "attn_k.weight": "self_attn.k_proj.weight",
               "attn_v.weight": "self_attn.v_proj.weight", "attn_q.bias": "self_attn.q_proj.bias",
               "attn_k.bias": "self_attn.k_proj.bias", "attn_v.bias": "self_attn.v_proj.bias",
               "attn_output.weight": "self_attn.o_proj.weight",
               "attn_output.bias": "self_attn.o_proj.bias",
               "attn_q_norm.weight": "self_attn.q_norm.weight",
               "attn_k_norm.weight": "self_attn.k_norm.weight",
               "ffn_norm.weight": "post_attention_layernorm.weight",
               "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
               "ffn_down.weight": "mlp.down_proj.weight", "ffn_gate.bias": "mlp.gate_proj.bias",
               "ffn_up.bias": "mlp.up_proj.bias", "ffn_down.bias": "mlp.down_proj.bias"}


def unpermute_llama_qk(w: np.ndarray, n_head: int) -> np.ndarray:
  """Undo llama.cpp's Q/K row permutation (interleaved -> rotate-half RoPE layout).

  w: [n_head * head_dim, ...] rows as stored in a llama GGUF (numpy order).
  """
  head_dim = w.shape[0] // n_head
  return w.reshape(n_head, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_llama_qk(w: np.ndarray, n_head: int) -> np.ndarray:
  """llama.cpp's conversion permutation (inverse of `unpermute_llama_qk`)."""
  head_dim = w.shape[0] // n_head
  return w.reshape(n_head, 2, head_dim // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class _GGUFSource(_Source):
  """GGUF tensors under HF names, dequantised to float32, Q/K un-permuted for llama."""

  def __init__(self, reader, where, arch, n_heads, n_kv_heads, skip=()):
    self._where = where
    self._tensors = {t.name: t for t in reader.tensors if t.name not in skip}
    self._index = {}
    self._unknown = []
    self._norm_shift = arch.startswith("gemma")  # stored 1 + w (module docstring)
    block = {**_GGUF_BLOCK, **_GEMMA_BLOCK} if arch in ("gemma2", "gemma3") else _GGUF_BLOCK
    for name in self._tensors:
      hf = self._hf_name(name, block)
      if hf is None:
        self._unknown.append(name)
      else:
        self._index[hf] = name
    self._heads = {}
    if arch == "llama":  # only llama.cpp's LlamaModel conversion permutes Q/K
      for hf in self._index:
        if ".self_attn.q_proj." in hf:
          self._heads[hf] = n_heads
        elif ".self_attn.k_proj." in hf:
          self._heads[hf] = n_kv_heads

  @staticmethod
  def _hf_name(name, block):
    if name in _GGUF_GLOBAL:
      return _GGUF_GLOBAL[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in block:
      return f"model.layers.{parts[1]}.{block[parts[2]]}"
    return None

  def names(self):
    return list(self._index) + self._unknown

  def shape(self, name):
    return tuple(int(n) for n in reversed(self._tensors[self._index[name]].shape))

  def get(self, name):
    from gguf.quants import dequantize
    t = self._tensors[self._index[name]]
    try:
      data = np.asarray(t.data)  # plain ndarray view: memmap slicing is slow
      w = np.asarray(dequantize(data, t.tensor_type), np.float32).reshape(self.shape(name))
    except NotImplementedError as e:
      raise ValueError(f"{self._where}: tensor {t.name!r}: {e}") from None
    if name in self._heads:
      w = unpermute_llama_qk(w, self._heads[name])
    if self._norm_shift and t.name.endswith("norm.weight"):
      w = w - np.float32(1.0)
    return w


def _load_gguf(path: Path):
  where = str(path)
  reader = gguf_file.reader(path)
  arch = gguf_file.field(reader, "general.architecture", where=where)
  if arch not in GGUF_SUPPORTED:
    raise ValueError(f"{where}: GGUF architecture {arch!r} is not supported; expected one of "
                     f"{list(GGUF_SUPPORTED)}")
  tensors = {t.name: t for t in reader.tensors}

  def meta(key, default=...):
    return gguf_file.field(reader, f"{arch}.{key}", default, where)

  D, H = int(meta("embedding_length")), int(meta("attention.head_count"))
  K = meta("attention.head_count_kv", H)
  if isinstance(K, list):
    if len(set(K)) != 1:
      raise ValueError(f"{where}: per-layer {arch}.attention.head_count_kv={K} not supported")
    K = K[0]
  Dh = int(meta("attention.key_length", D // H))
  rope_dim = int(meta("rope.dimension_count", Dh))
  if rope_dim != Dh:
    raise ValueError(f"{where}: {arch}.rope.dimension_count={rope_dim} != head_dim {Dh}: "
                     f"partial RoPE is not supported")
  if "token_embd.weight" not in tensors:
    raise ValueError(f"{where}: missing tensor 'token_embd.weight'")
  V = int(meta("vocab_size", int(tensors["token_embd.weight"].shape[-1])))
  theta = _short_float(meta("rope.freq_base", 10000.0))
  scaling_type = meta("rope.scaling.type", "none")
  linear = 1.0
  if scaling_type == "linear":
    linear = _short_float(meta("rope.scaling.factor", 1.0))
  elif scaling_type not in ("none", "", None):
    raise ValueError(f"{where}: {arch}.rope.scaling.type={scaling_type!r} is not supported")
  rope_scaling = None
  if "rope_freqs.weight" in tensors:
    from gguf.quants import dequantize
    t = tensors.pop("rope_freqs.weight")
    rope_scaling = _llama3_scaling_from_rope_freqs(
        np.asarray(dequantize(t.data, t.tensor_type), np.float64).reshape(-1), Dh, theta, where)
  L = int(meta("block_count"))
  gemma = {}
  if arch.startswith("gemma"):
    gemma = dict(norm_offset=1.0, embed_scale=True, activation="gelu_tanh")
  if arch in ("gemma2", "gemma3"):
    window = int(meta("attention.sliding_window", 0) or 0)
    # llama.cpp writes the pattern as a period n ("L" * (n - 1) + "G") or, in newer
    # conversions, as one bool per layer (True: sliding window).
    pattern = meta("attention.sliding_window_pattern", 2 if arch == "gemma2" else 6)
    if isinstance(pattern, list):
      if len(pattern) != L:
        raise ValueError(f"{where}: {arch}.attention.sliding_window_pattern has {len(pattern)} "
                         f"entries; expected one per layer ({L})")
      pattern = "".join("L" if bool(x) else "G" for x in pattern)
    else:
      pattern = "L" * (int(pattern) - 1) + "G"
    gemma.update(post_norms=True, sliding_window=window,
                 window_pattern=pattern if window else "",
                 attn_softcap=_short_float(meta("attn_logit_softcapping", 0.0) or 0.0),
                 final_softcap=_short_float(meta("final_logit_softcapping", 0.0) or 0.0),
                 rope_local_theta=10000.0 if arch == "gemma3" else 0.0,
                 query_pre_attn_scalar=float(D // H) if L == _GEMMA_QUERY_BY_WIDTH[arch]
                 else 0.0)
  config = ModelConfig(
      vocab_size=V, d_model=D, n_layers=L, n_heads=H, n_kv_heads=int(K),
      head_dim=Dh, d_ff=int(meta("feed_forward_length")), rope_theta=theta,
      rope_scaling=rope_scaling, rope_linear_factor=linear,
      norm_eps=_short_float(meta("attention.layer_norm_rms_epsilon", 1e-5)),
      tie_embeddings="output.weight" not in tensors,
      attn_bias="blk.0.attn_q.bias" in tensors, mlp_bias="blk.0.ffn_up.bias" in tensors,
      qk_norm="blk.0.attn_q_norm.weight" in tensors,
      max_seq_len=int(meta("context_length", 2048)), **gemma)
  src = _GGUFSource(reader, where, arch, H, int(K), skip=("rope_freqs.weight",))
  return config, _params_from_hf(config, src, where, f"{arch} (GGUF)")


def _short_float(x) -> float:
  """GGUF stores float32: 9.999999747e-06 -> 1e-05, the shortest decimal of that float32."""
  return float(str(np.float32(x)))


def _llama3_scaling_from_rope_freqs(freqs, head_dim, theta, where):
  """Llama-3 (factor, low, high, orig) whose per-frequency factors equal `freqs`.

  llama.cpp stores wavelength multipliers inv_freq / scaled_inv_freq; the real
  Llama-3.x models use low 1, high 4, original context 8192 with factor 8 or 32.
  """
  inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
  if freqs.shape != inv.shape:
    raise ValueError(f"{where}: tensor 'rope_freqs.weight' has {freqs.size} entries, expected "
                     f"{inv.size} (head_dim / 2)")
  factor = float(freqs.max())
  cand = (factor, 1.0, 4.0, 8192)
  low_wl, high_wl = cand[3] / cand[1], cand[3] / cand[2]
  wl = 2 * math.pi / inv
  smooth = (cand[3] / wl - cand[1]) / (cand[2] - cand[1])
  expected = np.where(wl < high_wl, 1.0,
                      np.where(wl > low_wl, factor, 1.0 / ((1 - smooth) / factor + smooth)))
  if not np.allclose(freqs, expected, rtol=1e-4):
    raise ValueError(f"{where}: tensor 'rope_freqs.weight' is not Llama-3 RoPE scaling with "
                     f"factor={factor}, low_freq_factor=1, high_freq_factor=4, original context "
                     f"8192; other RoPE scalings are not supported")
  return cand
