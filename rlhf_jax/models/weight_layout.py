"""The parameter layout every weight format shares: Hugging Face tensor names and orientation.

`_layer_table` lists each per-layer tensor (our module / leaf, the HF name suffix, both
shapes); `_params_from_hf` builds our param tree from any `_Source` of tensors under HF
names (safetensors, GGUF), `_params_to_hf` goes the other way for `save_pretrained`.
Transposes and reshapes only, so the conversion is bit-exact both ways.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from rlhf_jax.models.transformer import ModelConfig

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some old checkpoints carry
_FLOAT_DTYPES = ("float32", "bfloat16", "float16", "float64")  # weights are read as float32


def _layer_table(c: ModelConfig):
  """Per-layer tensors: (module, leaf, HF name suffix, HF shape, our per-layer shape)."""
  D, H, K, Dh, F = c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.d_ff
  t = [("attn_norm", "scale", "input_layernorm.weight", (D,), (D,)),
       ("q", "kernel", "self_attn.q_proj.weight", (H * Dh, D), (D, H, Dh)),
       ("k", "kernel", "self_attn.k_proj.weight", (K * Dh, D), (D, K, Dh)),
       ("v", "kernel", "self_attn.v_proj.weight", (K * Dh, D), (D, K, Dh)),
       ("o", "kernel", "self_attn.o_proj.weight", (D, H * Dh), (H, Dh, D)),
       ("mlp_norm", "scale", ("pre_feedforward_layernorm.weight" if c.post_norms
                              else "post_attention_layernorm.weight"), (D,), (D,)),
       ("gate", "kernel", "mlp.gate_proj.weight", (F, D), (D, F)),
       ("up", "kernel", "mlp.up_proj.weight", (F, D), (D, F)),
       ("down", "kernel", "mlp.down_proj.weight", (D, F), (F, D))]
  if c.attn_bias:
    t += [("q", "bias", "self_attn.q_proj.bias", (H * Dh,), (H, Dh)),
          ("k", "bias", "self_attn.k_proj.bias", (K * Dh,), (K, Dh)),
          ("v", "bias", "self_attn.v_proj.bias", (K * Dh,), (K, Dh))]
  if c.qk_norm:
    t += [("q_norm", "scale", "self_attn.q_norm.weight", (Dh,), (Dh,)),
          ("k_norm", "scale", "self_attn.k_norm.weight", (Dh,), (Dh,))]
  if c.post_norms:  # Gemma 2 / 3 sandwich norms (HF calls the attention output's norm
    # post_attention_layernorm; the MLP's input norm is then pre_feedforward_layernorm)
    t += [("post_attn_norm", "scale", "post_attention_layernorm.weight", (D,), (D,)),
          ("post_mlp_norm", "scale", "post_feedforward_layernorm.weight", (D,), (D,))]
  if c.mlp_bias:
    t += [("gate", "bias", "mlp.gate_proj.bias", (F,), (F,)),
          ("up", "bias", "mlp.up_proj.bias", (F,), (F,)),
          ("down", "bias", "mlp.down_proj.bias", (D,), (D,))]
  return t


def _to_ours(w, our_shape):
  """HF [out, in] matrix -> our [in..., out...] kernel; vectors just reshape."""
  return (w.T if w.ndim == 2 else w).reshape(our_shape)


def _to_hf(w, hf_shape):
  if len(hf_shape) == 2:
    return np.ascontiguousarray(w.reshape(hf_shape[::-1]).T)
  return np.ascontiguousarray(w.reshape(hf_shape))


def _params_from_hf(c: ModelConfig, src: "_Source", where: str, model_type: str) -> dict:
  """Our param tree from tensors in HF naming/orientation (float32 numpy)."""
  used: set[str] = set()

  def take(name, shape):
    if name not in src:
      raise ValueError(f"{where}: missing tensor {name!r} (expected shape {list(shape)} for "
                       f"model_type={model_type}, {c.n_layers} layers)")
    got = tuple(src.shape(name))
    dtype = src.dtype(name)
    if dtype is not None and dtype not in _FLOAT_DTYPES:
      raise ValueError(f"{where}: tensor {name!r} has dtype {dtype}, expected a float type "
                       f"({', '.join(_FLOAT_DTYPES)})")
    if got != tuple(shape):
      raise ValueError(f"{where}: tensor {name!r} has shape {list(got)}, expected "
                       f"{list(shape)} (from the model config: d_model={c.d_model}, "
                       f"n_heads={c.n_heads}, n_kv_heads={c.n_kv_heads}, head_dim={c.head_dim}, "
                       f"d_ff={c.d_ff}, vocab_size={c.vocab_size})")
    used.add(name)
    return src.get(name)

  V, D, L = c.vocab_size, c.d_model, c.n_layers
  params: dict[str, Any] = {"embed": {"embedding": take("model.embed_tokens.weight", (V, D))}}
  layers: dict[str, dict[str, np.ndarray]] = {}
  for mod, leaf, suffix, hf_shape, our_shape in _layer_table(c):
    stacked = np.empty((L,) + our_shape, np.float32)
    for i in range(L):
      stacked[i] = _to_ours(take(f"model.layers.{i}.{suffix}", hf_shape), our_shape)
    layers.setdefault(mod, {})[leaf] = stacked
  for i in range(L):  # HF Llama/Qwen3/Gemma attention_bias also biases o_proj: must be zero
    name = f"model.layers.{i}.self_attn.o_proj.bias"
    if name in src:
      if np.any(take(name, (D,))):
        raise ValueError(f"{where}: tensor {name!r} is nonzero; an output-projection bias is "
                         f"not supported by rlhf_jax.models.ModelConfig")
  params["layers"] = layers
  params["final_norm"] = {"scale": take("model.norm.weight", (D,))}
  if c.tie_embeddings:
    used.add("lm_head.weight")  # some tied checkpoints store a copy; HF ignores it too
  else:
    params["lm_head"] = _to_ours(take("lm_head.weight", (V, D)), (D, V))
  extra = sorted(n for n in src.names() if n not in used and not n.endswith(_IGNORED_SUFFIXES))
  if extra:
    more = f" (+{len(extra) - 5} more)" if len(extra) > 5 else ""
    raise ValueError(f"{where}: unexpected tensors {extra[:5]}{more} not used by "
                     f"model_type={model_type} with this config; the checkpoint's architecture "
                     f"is not supported (or config.json does not match the weights)")
  return params


def _params_to_hf(c: ModelConfig, params, hf_config: dict) -> dict[str, np.ndarray]:
  f32 = lambda x: np.asarray(x, np.float32)
  out = {"model.embed_tokens.weight": np.ascontiguousarray(f32(params["embed"]["embedding"]))}
  for mod, leaf, suffix, hf_shape, _ in _layer_table(c):
    stacked = f32(params["layers"][mod][leaf])
    for i in range(c.n_layers):
      out[f"model.layers.{i}.{suffix}"] = _to_hf(stacked[i], hf_shape)
  if c.attn_bias and hf_config["model_type"] != "qwen2":
    for i in range(c.n_layers):
      out[f"model.layers.{i}.self_attn.o_proj.bias"] = np.zeros((c.d_model,), np.float32)
  out["model.norm.weight"] = np.ascontiguousarray(f32(params["final_norm"]["scale"]))
  if not c.tie_embeddings:
    out["lm_head.weight"] = _to_hf(f32(params["lm_head"]), (c.vocab_size, c.d_model))
  return out


class _Source:
  """Named float32 tensors read on demand: names(), `in`, shape(name), get(name)."""

  def names(self):
    raise NotImplementedError

  def __contains__(self, name):
    return name in self._index

  def shape(self, name):
    raise NotImplementedError

  def dtype(self, name) -> str | None:
    """The stored dtype's name, None when the format decides (GGUF quantisations)."""
    return None

  def get(self, name) -> np.ndarray:
    raise NotImplementedError
