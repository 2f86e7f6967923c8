"""Hugging Face model directories: config.json <-> ModelConfig and safetensors reading.

`_load_hf(path)` reads `config.json` plus `model.safetensors` or a sharded
`model.safetensors.index.json`; `_config_to_hf` writes the config.json of the HF
model_type that represents a ModelConfig exactly (for `save_pretrained`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from rlhf_jax.models.transformer import ModelConfig
from rlhf_jax.models.weight_layout import _Source, _params_from_hf

HF_SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")
_HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                     "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                     "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
                     "gemma3_text": "Gemma3ForCausalLM"}
_GEMMAS = ("gemma", "gemma2", "gemma3_text")


class _SafetensorsSource(_Source):
  """Tensors from one or more safetensors files, given {tensor name: file}."""

  def __init__(self, index: dict[str, Path]):
    from safetensors import safe_open
    self._index = index
    self._files = {}
    for f in sorted(set(index.values())):
      if not f.is_file():
        raise FileNotFoundError(f"{f}: safetensors shard named in the index does not exist")
      try:
        self._files[f] = safe_open(str(f), framework="numpy")
      except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"{f}: cannot read safetensors file: {e}") from None

  def names(self):
    return list(self._index)

  def shape(self, name):
    return tuple(self._files[self._index[name]].get_slice(name).get_shape())

  def dtype(self, name):
    d = str(self._files[self._index[name]].get_slice(name).get_dtype()).upper()  # e.g. BF16
    for prefix, kind in (("BF", "bfloat"), ("F", "float"), ("I", "int"), ("U", "uint")):
      if d.startswith(prefix) and d[len(prefix):].isdigit():
        return kind + d[len(prefix):]
    return d.lower()

  def get(self, name):
    return np.asarray(self._files[self._index[name]].get_tensor(name), np.float32)


def _load_hf(path: Path):
  cfg_file = path / "config.json"
  try:
    hf = json.loads(cfg_file.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{cfg_file}: not valid JSON: {e}") from None
  if not isinstance(hf, dict):
    raise ValueError(f"{cfg_file}: expected a JSON object (a Hugging Face config), got "
                     f"{type(hf).__name__}")
  config = _config_from_hf(hf, str(cfg_file))
  single, index_file = path / "model.safetensors", path / "model.safetensors.index.json"
  if single.is_file():
    from safetensors import safe_open
    try:
      with safe_open(str(single), framework="numpy") as f:
        index = {k: single for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for corrupt files
      raise ValueError(f"{single}: cannot read safetensors file: {e}") from None
  elif index_file.is_file():
    try:
      weight_map = json.loads(index_file.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise ValueError(f"{index_file}: expected JSON with a 'weight_map' of tensor name -> "
                       f"shard file ({e!r})") from None
    index = {k: path / v for k, v in weight_map.items()}
  else:
    found = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt*"))
    hint = (f" (found {found[:3]}: PyTorch pickles are not read; convert to safetensors)"
            if found else "")
    raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json{hint}")
  where = str(single if single.is_file() else index_file)
  params = _params_from_hf(config, _SafetensorsSource(index), where, hf["model_type"])
  return config, params


def _config_from_hf(hf: dict, where: str) -> ModelConfig:
  """ModelConfig from a Hugging Face config.json dict."""
  mt = hf.get("model_type")
  if mt not in HF_SUPPORTED:
    raise ValueError(f"{where}: model_type={mt!r} is not supported; expected one of "
                     f"{list(HF_SUPPORTED)}")
  archs = hf.get("architectures") or []
  if not isinstance(archs, list) or any(
      not (isinstance(a, str) and a.endswith("ForCausalLM")) for a in archs):
    raise ValueError(f"{where}: architectures={archs!r}: only causal language models "
                     f"(e.g. {_HF_ARCHITECTURES[mt]!r}) are supported; a classification / "
                     f"other head has no language-model output to import")

  def req(key):
    if hf.get(key) is None:
      raise ValueError(f"{where}: missing key {key!r} (model_type={mt})")
    if not isinstance(hf[key], int) or isinstance(hf[key], bool) or hf[key] <= 0:
      raise ValueError(f"{where}: {key}={hf[key]!r}: expected a positive integer")
    return hf[key]

  D, H = int(req("hidden_size")), int(req("num_attention_heads"))
  rope_params = hf.get("rope_parameters") or {}  # transformers >= 5 nests RoPE settings here
  theta = hf.get("rope_theta", rope_params.get("rope_theta", 10000.0))
  scaling = hf.get("rope_scaling")
  if scaling is None and rope_params.get("rope_type", "default") != "default":
    scaling = rope_params
  if float(hf.get("partial_rotary_factor", 1.0)) != 1.0:
    raise ValueError(f"{where}: partial_rotary_factor={hf['partial_rotary_factor']} is not "
                     f"supported (RoPE on the whole head only)")
  act = hf.get("hidden_activation") or hf.get("hidden_act") or "silu"
  if mt in _GEMMAS:
    if act not in ("gelu", "gelu_pytorch_tanh", "gelu_tanh", "gelu_new"):
      raise ValueError(f"{where}: hidden_act={act!r}: expected a GeLU for gemma")
    activation = "gelu_tanh"  # Gemma's reference uses the tanh approximation whatever it says
  elif act == "silu" or act == "swish":
    activation = "silu"
  else:
    raise ValueError(f"{where}: hidden_act={act!r} is not supported for {mt}; expected 'silu'")
  vocab, layers, d_ff = int(req("vocab_size")), int(req("num_hidden_layers")), int(
      req("intermediate_size"))
  window, pattern = _window_from_hf(hf, mt, layers, where)
  rope_scaling, linear = _rope_scaling_from_hf(scaling, where)
  head_dim = int(hf.get("head_dim") or D // H)
  gemma23 = mt in ("gemma2", "gemma3_text")
  qpas = float(hf.get("query_pre_attn_scalar") or 0.0) if gemma23 else 0.0
  extra = dict(sliding_window=window, window_pattern=pattern, rope_linear_factor=linear,
               query_pre_attn_scalar=0.0 if qpas == head_dim else qpas,
               attn_softcap=float(hf.get("attn_logit_softcapping") or 0.0) if gemma23 else 0.0,
               final_softcap=float(hf.get("final_logit_softcapping") or 0.0) if gemma23 else 0.0,
               post_norms=gemma23,
               rope_local_theta=float(hf.get("rope_local_base_freq", 10000.0))
               if mt == "gemma3_text" else 0.0)
  try:
    return ModelConfig(
        vocab_size=vocab, d_model=D, n_layers=layers,
        n_heads=H, n_kv_heads=int(hf.get("num_key_value_heads") or H),
        head_dim=head_dim, d_ff=d_ff,
        rope_theta=float(theta), rope_scaling=rope_scaling,
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        norm_offset=1.0 if mt in _GEMMAS else 0.0, embed_scale=mt in _GEMMAS,
        tie_embeddings=bool(hf.get("tie_word_embeddings", mt in _GEMMAS)),
        attn_bias=True if mt == "qwen2" else bool(hf.get("attention_bias", False)),
        mlp_bias=bool(hf.get("mlp_bias", False)) if mt == "llama" else False,
        qk_norm=mt in ("qwen3", "gemma3_text"), activation=activation,
        max_seq_len=int(hf.get("max_position_embeddings", 2048)), **extra)
  except (TypeError, ValueError) as e:  # e.g. heads not a multiple of kv heads
    raise ValueError(f"{where}: {e}") from None


def _window_from_hf(hf, mt, n_layers, where):
  """(sliding_window, window_pattern) of a HF config: `layer_types` when given, else each
  family's default (Mistral: every layer; Qwen2/3 with use_sliding_window: the layers from
  max_window_layers on; Gemma 2: even layers; Gemma 3: all but every
  sliding_window_pattern-th)."""
  window = hf.get("sliding_window")
  if mt in ("llama", "gemma") or not window:
    return 0, ""
  types = hf.get("layer_types")
  if isinstance(types, list) and len(types) == n_layers:
    local = [t == "sliding_attention" for t in types]
  elif mt == "mistral":
    local = [True] * n_layers
  elif mt in ("qwen2", "qwen3"):
    first = int(hf.get("max_window_layers", 0) or 0)
    local = [bool(hf.get("use_sliding_window")) and i >= first for i in range(n_layers)]
  elif mt == "gemma2":
    local = [i % 2 == 0 for i in range(n_layers)]
  else:
    n = int(hf.get("sliding_window_pattern", 6))
    local = [(i + 1) % n != 0 for i in range(n_layers)]
  if not any(local):
    return 0, ""
  if not isinstance(window, int) or window <= 0:
    raise ValueError(f"{where}: sliding_window={window!r}: expected a positive integer")
  flags = "".join("L" if x else "G" for x in local)
  period = next(p for p in range(1, n_layers + 1)
                if all(flags[i] == flags[i % p] for i in range(n_layers)))
  pattern = flags[:period]
  return int(window), "" if pattern == "L" else pattern


def _rope_scaling_from_hf(scaling, where):
  """(llama3 rope_scaling tuple or None, linear factor)."""
  if not scaling:
    return None, 1.0
  kind = scaling.get("rope_type", scaling.get("type"))
  if kind in (None, "default"):
    return None, 1.0
  if kind == "linear":
    return None, float(scaling["factor"])
  if kind != "llama3":
    raise ValueError(f"{where}: rope_scaling type {kind!r} is not supported; expected 'llama3', "
                     f"'linear' or none")
  try:
    return (float(scaling["factor"]), float(scaling["low_freq_factor"]),
            float(scaling["high_freq_factor"]),
            int(scaling["original_max_position_embeddings"])), 1.0
  except KeyError as e:
    raise ValueError(f"{where}: rope_scaling (llama3) is missing key {e}") from None


def _config_to_hf(c: ModelConfig) -> dict:
  """config.json for the HF model_type that represents `c` exactly."""
  gemma_like = (c.norm_offset != 0.0, c.embed_scale, c.activation == "gelu_tanh")
  if any(gemma_like):
    if not (all(gemma_like) and c.norm_offset == 1.0):
      raise ValueError(f"save_pretrained: norm_offset={c.norm_offset}, "
                       f"embed_scale={c.embed_scale}, activation={c.activation!r} has no "
                       f"Hugging Face model_type; Gemma needs norm_offset=1.0, "
                       f"embed_scale=True, activation='gelu_tanh' together")
    mt = ("gemma3_text" if c.qk_norm else "gemma2") if c.post_norms else "gemma"
  elif c.qk_norm:
    mt = "qwen3"
  elif c.attn_bias and not c.mlp_bias:
    mt = "qwen2"
  elif c.sliding_window and not c.mlp_bias:
    mt = "mistral"
  else:
    mt = "llama"
  if (mt == "gemma" and c.qk_norm) or (mt in _GEMMAS + ("qwen3",) and c.mlp_bias):
    raise ValueError(f"save_pretrained: Hugging Face model_type {mt} cannot hold "
                     f"qk_norm={c.qk_norm} with mlp_bias={c.mlp_bias}")
  _check_expressible(c, mt)
  act = "gelu_pytorch_tanh" if mt in _GEMMAS else "silu"
  d = {"architectures": [_HF_ARCHITECTURES[mt]], "model_type": mt,
       "vocab_size": c.vocab_size, "hidden_size": c.d_model, "intermediate_size": c.d_ff,
       "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads,
       "num_key_value_heads": c.n_kv_heads, "head_dim": c.head_dim, "hidden_act": act,
       "max_position_embeddings": c.max_seq_len, "rms_norm_eps": c.norm_eps,
       "rope_theta": c.rope_theta, "rope_scaling": None,
       "tie_word_embeddings": c.tie_embeddings, "torch_dtype": "float32"}
  if mt in _GEMMAS:
    d["hidden_activation"] = act
  if mt != "qwen2":
    d["attention_bias"] = c.attn_bias
  else:
    d["use_sliding_window"] = False
  if mt == "llama":
    d["mlp_bias"] = c.mlp_bias
  if c.rope_scaling is not None:
    factor, low, high, orig = c.rope_scaling
    d["rope_scaling"] = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                         "high_freq_factor": high, "original_max_position_embeddings": orig}
  if c.rope_linear_factor != 1.0:
    d["rope_scaling"] = {"rope_type": "linear", "factor": c.rope_linear_factor}
  local = c.local_layers
  if mt in ("gemma2", "gemma3_text"):
    d.update(query_pre_attn_scalar=c.query_pre_attn_scalar or c.head_dim,
             attn_logit_softcapping=c.attn_softcap or None,
             final_logit_softcapping=c.final_softcap or None,
             sliding_window=c.sliding_window or None)
    if mt == "gemma3_text":
      d["rope_local_base_freq"] = c.rope_local_theta or c.rope_theta
      period = c.window_pattern
      if period and period == "L" * (len(period) - 1) + "G":
        d["sliding_window_pattern"] = len(period)
  elif c.sliding_window:
    d["sliding_window"] = c.sliding_window
    if mt in ("qwen2", "qwen3"):
      d.update(use_sliding_window=True, max_window_layers=local.index(True))
  if c.sliding_window:
    d["layer_types"] = ["sliding_attention" if x else "full_attention" for x in local]
  return d


def _check_expressible(c: ModelConfig, mt: str):
  """Refuse config features the HF model_type `mt` has no key for."""
  local = c.local_layers
  bad = []
  if mt not in ("gemma2", "gemma3_text"):
    bad += [k for k in ("attn_softcap", "final_softcap", "query_pre_attn_scalar",
                        "rope_local_theta", "post_norms") if getattr(c, k)]
  if mt == "gemma2" and c.rope_local_theta:
    bad.append("rope_local_theta")
  if mt == "gemma3_text" and c.rope_linear_factor != 1.0 and not c.rope_local_theta:
    bad.append("rope_linear_factor without rope_local_theta")
  if mt == "gemma" and c.sliding_window:
    bad.append("sliding_window")
  if mt == "mistral" and not all(local):
    bad.append(f"window_pattern={c.window_pattern!r} (Mistral: every layer local)")
  if mt in ("qwen2", "qwen3") and any(local) and list(local) != sorted(local):
    bad.append(f"window_pattern={c.window_pattern!r} (Qwen: local from max_window_layers on)")
  if bad:
    raise ValueError(f"save_pretrained: Hugging Face model_type {mt} cannot hold "
                     f"{', '.join(bad)}")
