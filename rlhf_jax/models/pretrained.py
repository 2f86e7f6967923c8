"""Pretrained weights in and out: Hugging Face safetensors, GGUF, our own format.

    load_pretrained(path, **overrides) -> (ModelConfig, params)
    save_pretrained(config, params, path, overwrite=False)
    import_checkpoint(src, out_dir) -> Path

`load_pretrained` reads three kinds of `path`:

* a Hugging Face model directory: `config.json` plus `model.safetensors`, or a
  sharded `model.safetensors.index.json` with its shards. model_type llama,
  mistral, qwen2 (q/k/v biases), qwen3 (QK-norm), gemma (norm offset 1,
  scaled embeddings, GeLU-tanh), gemma2 and gemma3_text (sandwich norms, sliding
  windows, soft-caps, query_pre_attn_scalar; Gemma 3: QK-norm, local RoPE base);
  tied or untied (`lm_head.weight`) output; Llama-3 or linear `rope_scaling`.
  Tensors may be float32, bfloat16 or float16.
* a `.gguf` file (llama.cpp), architecture llama, qwen2, qwen3, gemma2 or gemma3, any
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

Sliding windows are modelled: Mistral (every layer), Qwen2 / Qwen3
(use_sliding_window: the layers from max_window_layers on), Gemma 2 (even layers),
Gemma 3 (five local : one global), or a config's `layer_types` list.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np

from rlhf_jax import gguf_file
from rlhf_jax.models.transformer import ModelConfig, init_params
from rlhf_jax.models.gguf_weights import _load_gguf
from rlhf_jax.models.hf_checkpoint import _config_to_hf, _load_hf
from rlhf_jax.models.weight_layout import _params_to_hf

OUR_CONFIG_FILE = "model_config.json"
OUR_PARAMS_DIR = "params"
# Config fields that are run-time choices, not part of the weights.
RUNTIME_FIELDS = ("dtype", "remat", "remat_policy", "max_seq_len", "attention", "logits_chunk")
# Tokenizer files copied along by import_checkpoint from a directory source.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                   "special_tokens_map.json", "generation_config.json", "vocab.json",
                   "merges.txt")


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

  model_type is llama, or mistral (sliding window), qwen2 (q/k/v biases), qwen3
  (QK-norm) or gemma (norm offset 1 + embed scale + GeLU-tanh; gemma2 with
  sandwich norms, gemma3_text with sandwich norms + QK-norm) when the config
  needs it; a feature the model_type has no key for is refused. A
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
