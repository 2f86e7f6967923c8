"""Pretrained weights in and out: Hugging Face safetensors, GGUF, our own format.

    load_pretrained(path, **overrides) -> (ModelConfig, params)
    save_pretrained(config, params, path, overwrite=False)
    import_checkpoint(src, out_dir) -> Path

`load_pretrained` reads three kinds of `path`:

* a Hugging Face model directory: `config.json` plus `model.safetensors`, or a
  sharded `model.safetensors.index.json` with its shards. model_type llama,
  mistral, qwen2 (q/k/v biases), qwen3 (QK-norm) and gemma (norm offset 1,
  scaled embeddings, GeLU-tanh); tied or untied (`lm_head.weight`) output;
  Llama-3 `rope_scaling`. Tensors may be float32, bfloat16 or float16.
* a `.gguf` file (llama.cpp), architecture llama, qwen2 or qwen3, any
  quantisation `gguf.quants.dequantize` knows. llama.cpp stores the rows of
  the llama Q and K projections permuted for its interleaved RoPE; they are
  permuted back to the Hugging Face "rotate half" layout our model uses.
  Llama-3.x GGUFs carry their RoPE scaling as a `rope_freqs.weight` tensor;
  it is matched to the standard Llama-3 parameters (low 1, high 4, original
  context 8192) or refused.
* a directory written by `import_checkpoint`: `model_config.json`
  (`ModelConfig.to_dict`) and an orbax checkpoint under `params/`.

Parameters come back as float32 numpy arrays in exactly the tree of
`init_params(config, rng)` (layers stacked on a leading axis L); they stay on
the host, so the caller decides where they go (`jax.device_put` with the
shardings of `rlhf_jax.parallel`). Orientation, HF [out, in] -> ours:

    q_proj.weight [H*Dh, D] -> layers.q.kernel [L, D, H, Dh]   (k, v alike with K)
    o_proj.weight [D, H*Dh] -> layers.o.kernel [L, H, Dh, D]
    gate/up_proj.weight [F, D] -> [L, D, F];  down_proj.weight [D, F] -> [L, F, D]
    lm_head.weight [V, D] -> lm_head [D, V];  embed_tokens.weight [V, D] as is

The conversion is transposes and reshapes only, so HF export and import are
bit-exact. Runtime-only config fields (dtype, remat, max_seq_len) are not
part of a checkpoint; set them with `load_pretrained(path, dtype="bfloat16")`.

Mistral / Qwen2 sliding-window attention is not modelled: the imported model
is exact for sequences no longer than the window (a warning says so).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import warnings
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from rlhf_jax import gguf_file
from rlhf_jax.models.transformer import ModelConfig, init_params

OUR_CONFIG_FILE = "model_config.json"
OUR_PARAMS_DIR = "params"
HF_SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "gemma")
GGUF_SUPPORTED = ("llama", "qwen2", "qwen3")
# Config fields that are run-time choices, not part of the weights.
RUNTIME_FIELDS = ("dtype", "remat", "remat_policy", "max_seq_len", "attention", "logits_chunk")
# Tokenizer files copied along by import_checkpoint from a directory source.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                   "special_tokens_map.json", "generation_config.json", "vocab.json",
                   "merges.txt")
_HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                     "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                     "gemma": "GemmaForCausalLM"}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some old checkpoints carry
_FLOAT_DTYPES = ("float32", "bfloat16", "float16", "float64")  # weights are read as float32


# ----------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------

def load_pretrained(path, **overrides) -> tuple[ModelConfig, dict]:
  """(ModelConfig, float32 numpy params) from a HF dir, a .gguf file or our dir.

  `overrides` may set the run-time fields dtype, remat, max_seq_len.
  Raises FileNotFoundError for a missing path or a directory without a
  config, ValueError for an unsupported architecture, a missing, unexpected or
  wrong-shaped tensor; every message names the path and the tensor or key.
  """
  path = Path(path)
  if not path.exists():
    raise FileNotFoundError(
        f"{path}: no such file or directory; expected a Hugging Face model directory "
        f"(config.json + model.safetensors), a .gguf file, or a directory written by "
        f"import_checkpoint (model_config.json + params/)")
  if path.is_file():
    if not gguf_file.is_gguf(path):
      raise ValueError(f"{path}: not a GGUF file (no 'GGUF' magic); expected a .gguf file or a "
                       f"model directory")
    config, params = _load_gguf(path)
  elif (path / OUR_CONFIG_FILE).is_file():
    config, params = _load_ours(path)
  elif (path / "config.json").is_file():
    config, params = _load_hf(path)
  else:
    raise FileNotFoundError(
        f"{path}: directory has no config.json (Hugging Face format) and no "
        f"{OUR_CONFIG_FILE} (import_checkpoint format)")
  if overrides:
    bad = sorted(set(overrides) - set(RUNTIME_FIELDS))
    if bad:
      raise ValueError(f"load_pretrained({path}): cannot override {bad}; only the run-time "
                       f"fields {list(RUNTIME_FIELDS)} may be overridden")
    config = dataclasses.replace(config, **overrides)
  _check_params(config, params, str(path))
  return config, params


def save_pretrained(config: ModelConfig, params, path, *, overwrite: bool = False) -> Path:
  """Write a Hugging Face model directory: config.json + model.safetensors (float32).

  model_type is llama, or qwen2 (q/k/v biases), qwen3 (QK-norm) or gemma
  (norm offset 1 + embed scale + GeLU-tanh) when the config needs it; a
  Llama/Qwen3 with attention biases gets an all-zero o_proj.bias. Refuses a
  non-empty existing directory unless `overwrite=True`. Returns the path.
  """
  path = Path(path)
  if path.exists() and not path.is_dir():
    raise FileExistsError(f"{path}: exists and is not a directory")
  if path.is_dir() and any(path.iterdir()) and not overwrite:
    raise FileExistsError(f"{path}: directory exists and is not empty; pass overwrite=True "
                          f"to replace its model files")
  params = nn.meta.unbox(params)  # accept init_params(..., boxed=True) too
  _check_params(config, params, "save_pretrained(params)")
  hf_config = _config_to_hf(config)
  tensors = _params_to_hf(config, params, hf_config)
  from safetensors.numpy import save_file
  path.mkdir(parents=True, exist_ok=True)
  (path / "model.safetensors.index.json").unlink(missing_ok=True)  # a stale shard index
  (path / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
  save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
  return path


def import_checkpoint(src, out_dir) -> Path:
  """Convert `src` (anything `load_pretrained` reads) into our format in `out_dir`.

  Writes out_dir/model_config.json, out_dir/params (orbax StandardCheckpointer)
  and the tokenizer: HF tokenizer files are copied; a GGUF's vocabulary is
  written as tokenizer.json + tokenizer_config.json, so `load_tokenizer(out_dir)`
  works. Refuses an existing non-empty `out_dir`. Returns out_dir.
  """
  import orbax.checkpoint as ocp
  src, out_dir = Path(src), Path(out_dir).absolute()
  if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
    raise FileExistsError(f"{out_dir}: already exists and is not empty; import_checkpoint "
                          f"will not overwrite it")
  config, params = load_pretrained(src)
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / OUR_CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(out_dir / OUR_PARAMS_DIR, params)
  ckptr.wait_until_finished()
  ckptr.close()
  if src.is_dir():
    for name in TOKENIZER_FILES:
      if (src / name).is_file():
        shutil.copy2(src / name, out_dir / name)
  elif gguf_file.has_tokenizer(src):
    from rlhf_jax.tokenizer import load_tokenizer
    load_tokenizer(src).save(out_dir)
  return out_dir


# ----------------------------------------------------------------------------
# Parameter layout shared by every format (HF names and orientation)
# ----------------------------------------------------------------------------

def _layer_table(c: ModelConfig):
  """Per-layer tensors: (module, leaf, HF name suffix, HF shape, our per-layer shape)."""
  D, H, K, Dh, F = c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.d_ff
  t = [("attn_norm", "scale", "input_layernorm.weight", (D,), (D,)),
       ("q", "kernel", "self_attn.q_proj.weight", (H * Dh, D), (D, H, Dh)),
       ("k", "kernel", "self_attn.k_proj.weight", (K * Dh, D), (D, K, Dh)),
       ("v", "kernel", "self_attn.v_proj.weight", (K * Dh, D), (D, K, Dh)),
       ("o", "kernel", "self_attn.o_proj.weight", (D, H * Dh), (H, Dh, D)),
       ("mlp_norm", "scale", "post_attention_layernorm.weight", (D,), (D,)),
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


def _check_params(config: ModelConfig, params, where: str):
  """Tree structure and shapes must be those of init_params(config)."""
  expected = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
  exp_paths = {jax.tree_util.keystr(p): x.shape
               for p, x in jax.tree_util.tree_leaves_with_path(expected)}
  got_paths = {jax.tree_util.keystr(p): np.shape(x)
               for p, x in jax.tree_util.tree_leaves_with_path(params)}
  if exp_paths.keys() != got_paths.keys():
    missing = sorted(exp_paths.keys() - got_paths.keys())
    extra = sorted(got_paths.keys() - exp_paths.keys())
    raise ValueError(f"{where}: parameter tree does not match the config: missing {missing}, "
                     f"unexpected {extra}")
  for k, shape in exp_paths.items():
    if tuple(got_paths[k]) != tuple(shape):
      raise ValueError(f"{where}: parameter {k} has shape {got_paths[k]}, expected {shape}")


# ----------------------------------------------------------------------------
# Hugging Face directories
# ----------------------------------------------------------------------------

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
  if mt == "gemma":
    if act not in ("gelu", "gelu_pytorch_tanh", "gelu_tanh", "gelu_new"):
      raise ValueError(f"{where}: hidden_act={act!r}: expected a GeLU for gemma")
    activation = "gelu_tanh"  # Gemma's reference uses the tanh approximation whatever it says
  elif act == "silu" or act == "swish":
    activation = "silu"
  else:
    raise ValueError(f"{where}: hidden_act={act!r} is not supported for {mt}; expected 'silu'")
  window = hf.get("sliding_window")
  uses_window = mt == "mistral" or (mt in ("qwen2", "qwen3") and hf.get("use_sliding_window"))
  if window and uses_window:
    warnings.warn(f"{where}: sliding_window={window} is not modelled; the imported model is "
                  f"exact only for sequences of at most {window} tokens")
  vocab, layers, d_ff = int(req("vocab_size")), int(req("num_hidden_layers")), int(
      req("intermediate_size"))
  rope_scaling = _rope_scaling_from_hf(scaling, where)
  try:
    return ModelConfig(
        vocab_size=vocab, d_model=D, n_layers=layers,
        n_heads=H, n_kv_heads=int(hf.get("num_key_value_heads") or H),
        head_dim=int(hf.get("head_dim") or D // H), d_ff=d_ff,
        rope_theta=float(theta), rope_scaling=rope_scaling,
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        norm_offset=1.0 if mt == "gemma" else 0.0, embed_scale=mt == "gemma",
        tie_embeddings=bool(hf.get("tie_word_embeddings", mt == "gemma")),
        attn_bias=True if mt == "qwen2" else bool(hf.get("attention_bias", False)),
        mlp_bias=bool(hf.get("mlp_bias", False)) if mt == "llama" else False,
        qk_norm=mt == "qwen3", activation=activation,
        max_seq_len=int(hf.get("max_position_embeddings", 2048)))
  except (TypeError, ValueError) as e:  # e.g. heads not a multiple of kv heads
    raise ValueError(f"{where}: {e}") from None


def _rope_scaling_from_hf(scaling, where):
  if not scaling:
    return None
  kind = scaling.get("rope_type", scaling.get("type"))
  if kind in (None, "default"):
    return None
  if kind != "llama3":
    raise ValueError(f"{where}: rope_scaling type {kind!r} is not supported; expected 'llama3' "
                     f"or none")
  try:
    return (float(scaling["factor"]), float(scaling["low_freq_factor"]),
            float(scaling["high_freq_factor"]), int(scaling["original_max_position_embeddings"]))
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
    mt = "gemma"
  elif c.qk_norm:
    mt = "qwen3"
  elif c.attn_bias and not c.mlp_bias:
    mt = "qwen2"
  else:
    mt = "llama"
  if (mt == "gemma" and c.qk_norm) or (mt in ("gemma", "qwen3") and c.mlp_bias):
    raise ValueError(f"save_pretrained: Hugging Face model_type {mt} cannot hold "
                     f"qk_norm={c.qk_norm} with mlp_bias={c.mlp_bias}")
  act = "gelu_pytorch_tanh" if mt == "gemma" else "silu"
  d = {"architectures": [_HF_ARCHITECTURES[mt]], "model_type": mt,
       "vocab_size": c.vocab_size, "hidden_size": c.d_model, "intermediate_size": c.d_ff,
       "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads,
       "num_key_value_heads": c.n_kv_heads, "head_dim": c.head_dim, "hidden_act": act,
       "max_position_embeddings": c.max_seq_len, "rms_norm_eps": c.norm_eps,
       "rope_theta": c.rope_theta, "rope_scaling": None,
       "tie_word_embeddings": c.tie_embeddings, "torch_dtype": "float32"}
  if mt == "gemma":
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
  return d


# ----------------------------------------------------------------------------
# GGUF (llama.cpp)
# ----------------------------------------------------------------------------

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
    for name in self._tensors:
      hf = self._hf_name(name)
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
  def _hf_name(name):
    if name in _GGUF_GLOBAL:
      return _GGUF_GLOBAL[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _GGUF_BLOCK:
      return f"model.layers.{parts[1]}.{_GGUF_BLOCK[parts[2]]}"
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
  if scaling_type not in ("none", "", None):
    raise ValueError(f"{where}: {arch}.rope.scaling.type={scaling_type!r} is not supported")
  rope_scaling = None
  if "rope_freqs.weight" in tensors:
    from gguf.quants import dequantize
    t = tensors.pop("rope_freqs.weight")
    rope_scaling = _llama3_scaling_from_rope_freqs(
        np.asarray(dequantize(t.data, t.tensor_type), np.float64).reshape(-1), Dh, theta, where)
  config = ModelConfig(
      vocab_size=V, d_model=D, n_layers=int(meta("block_count")), n_heads=H, n_kv_heads=int(K),
      head_dim=Dh, d_ff=int(meta("feed_forward_length")), rope_theta=theta,
      rope_scaling=rope_scaling,
      norm_eps=_short_float(meta("attention.layer_norm_rms_epsilon", 1e-5)),
      tie_embeddings="output.weight" not in tensors,
      attn_bias="blk.0.attn_q.bias" in tensors, mlp_bias="blk.0.ffn_up.bias" in tensors,
      qk_norm="blk.0.attn_q_norm.weight" in tensors,
      max_seq_len=int(meta("context_length", 2048)))
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


# ----------------------------------------------------------------------------
# Our own format (import_checkpoint)
# ----------------------------------------------------------------------------

def _load_ours(path: Path):
  import orbax.checkpoint as ocp
  cfg_file = path / OUR_CONFIG_FILE
  try:
    config = ModelConfig.from_dict(json.loads(cfg_file.read_text()))
  except (json.JSONDecodeError, TypeError) as e:
    raise ValueError(f"{cfg_file}: expected a JSON ModelConfig dict: {e}") from None
  except ValueError as e:
    raise ValueError(f"{cfg_file}: {e}") from None
  params_dir = (path / OUR_PARAMS_DIR).absolute()
  if not params_dir.is_dir():
    raise FileNotFoundError(f"{params_dir}: missing orbax parameter checkpoint (written by "
                            f"import_checkpoint next to {OUR_CONFIG_FILE})")
  cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
  target = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=cpu),
      jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0))))
  from rlhf_jax.checkpoint import orbax_read
  ckptr = ocp.StandardCheckpointer()
  try:  # orbax raises assorted errors for tree/shape mismatch: one ValueError
    restored = orbax_read(lambda: ckptr.restore(params_dir, target),
                          f"{params_dir}: cannot restore parameters for the config in "
                          f"{cfg_file}", ValueError)
  finally:
    ckptr.close()
  return config, jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), restored)
