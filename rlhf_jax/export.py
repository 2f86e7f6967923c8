"""`rlhf-jax export WORKDIR OUT_DIR [--step=N] [--overwrite]`: a run as a Hugging Face model.

Reads a run's workdir (model_config.json + checkpoints/, the latest checkpoint or
`--step`), merges a LoRA run's adapters into its base (WORKDIR/lora/, see
`rlhf_jax.models.lora`), and writes OUT_DIR with `models.save_pretrained`:
config.json + model.safetensors (float32, Hugging Face tensor names and [out, in]
orientation), plus the run's tokenizer files and a generation_config.json with its
bos / eos / pad ids (also written into config.json).

What is exported:

* SFT, DPO, GRPO runs: the policy.
* PPO runs: the policy (params["policy"]); the critic is not part of a causal LM and
  is left out (a message says so).
* Reward models are refused: their scalar head r = w . h + b has no exact Hugging
  Face counterpart (LlamaForSequenceClassification's `score` has no bias), and the
  backbone alone is not a language model worth sampling. Use
  `rlhf_jax.trainers.reward_model.load_reward_model(WORKDIR)` instead.

The Hugging Face model_type is the one that represents the architecture exactly
(`save_pretrained`: llama, qwen2 for q/k/v biases, qwen3 for QK-norm, gemma), so a
run initialised from a Llama / Qwen2 / Qwen3 / Gemma checkpoint exports that
family; a Mistral source (the Llama layout without sliding-window attention, which
is not modelled) is written back as model_type mistral. The conversion is
transposes and reshapes only: `load_pretrained(OUT_DIR)` gives bit-identical
parameters and logits.

Errors (not a workdir, no such step, non-empty OUT_DIR without --overwrite) print
one line naming the path and exit 1; nothing is written before they are checked.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

USAGE = "rlhf-jax export WORKDIR OUT_DIR [--step=N] [--overwrite]"


class ExportError(ValueError):
  """A workdir / step / output directory that cannot be exported; the message says why."""


def checkpoint_steps(workdir: str) -> list[int]:
  """Finished checkpoint steps under WORKDIR/checkpoints, ascending."""
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit() and os.path.isdir(os.path.join(d, n)))


def source_model_type(workdir: str, _depth: int = 0) -> str | None:
  """The Hugging Face model_type (or GGUF architecture) a run started from: its
  config.json's init_from, followed through other run workdirs; None when it started
  from a random init or from something without one."""
  from rlhf_jax import workdir as workdir_lib
  try:
    with open(os.path.join(workdir, "config.json")) as f:
      src = json.load(f).get("init_from") or ""
  except (OSError, json.JSONDecodeError):
    return None
  if not src or _depth > 16:
    return None
  if workdir_lib.is_workdir(src):
    return source_model_type(src, _depth + 1)
  cfg = os.path.join(src, "config.json")
  if os.path.isfile(cfg):
    try:
      with open(cfg) as f:
        return json.load(f).get("model_type")
    except (OSError, json.JSONDecodeError):
      return None
  return None


def export(workdir: str, out_dir: str, step: int | None = None, overwrite: bool = False) -> dict:
  """Write WORKDIR's parameters (LoRA merged) as a Hugging Face directory OUT_DIR.
  Returns a summary dict; raises ExportError (one line naming the path) on bad inputs."""
  from rlhf_jax.models import ModelConfig, save_pretrained
  from rlhf_jax.models.pretrained import TOKENIZER_FILES
  from rlhf_jax.tokenizer import load_tokenizer
  from rlhf_jax import workdir as workdir_lib

  if not os.path.isdir(workdir):
    raise ExportError(f"{workdir}: no such directory; expected a run workdir "
                      f"(model_config.json + checkpoints/ written by rlhf-jax train)")
  if not workdir_lib.is_workdir(workdir):
    raise ExportError(f"{workdir}: not a run workdir (expected model_config.json and "
                      f"checkpoints/ written by rlhf-jax train)")
  if os.path.abspath(out_dir) == os.path.abspath(workdir):
    raise ExportError(f"{out_dir}: OUT_DIR must not be the workdir itself")
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise ExportError(f"{out_dir}: exists and is not a directory")
  if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
    raise ExportError(f"{out_dir}: directory exists and is not empty; pass --overwrite to "
                      f"replace its model files")
  steps = checkpoint_steps(workdir)
  if not steps:
    raise ExportError(f"{os.path.join(workdir, 'checkpoints')}: no finished checkpoint")
  if step is not None and step not in steps:
    raise ExportError(f"{os.path.join(workdir, 'checkpoints')}: no checkpoint for step {step} "
                      f"(available: {steps})")
  with open(os.path.join(workdir, "model_config.json")) as f:
    mcfg = ModelConfig.from_dict(json.load(f))

  step, params = workdir_lib.read_workdir_params(workdir, step)
  notes = []
  if set(params) == {"backbone", "head"}:
    raise ExportError(f"{workdir}: is a reward model (backbone + scalar head); its head "
                      f"w.h + b has no exact Hugging Face counterpart, so it is not exported. "
                      f"Load it with rlhf_jax.trainers.reward_model.load_reward_model")
  if set(params) == {"policy", "value"}:
    params = params["policy"]
    notes.append("PPO run: exported the policy; the critic is left out")

  save_pretrained(mcfg, params, out_dir, overwrite=overwrite)
  tokenizer = load_tokenizer(workdir)
  ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id,
         "pad_token_id": tokenizer.pad_id}
  cfg_path = os.path.join(out_dir, "config.json")
  with open(cfg_path) as f:
    hf_config = json.load(f)
  source = source_model_type(workdir)
  if source == "mistral" and hf_config["model_type"] == "llama" and not mcfg.mlp_bias:
    hf_config.update(model_type="mistral", architectures=["MistralForCausalLM"],
                     sliding_window=None)
    for k in ("attention_bias", "mlp_bias"):
      hf_config.pop(k, None)
  hf_config.update(ids)
  with open(cfg_path, "w") as f:
    f.write(json.dumps(hf_config, indent=2) + "\n")
  copied = []
  for name in TOKENIZER_FILES:
    if os.path.isfile(os.path.join(workdir, name)):
      shutil.copy2(os.path.join(workdir, name), os.path.join(out_dir, name))
      copied.append(name)
  if "generation_config.json" not in copied:
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
      f.write(json.dumps({**ids, "do_sample": False}, indent=2) + "\n")
  return {"step": step, "model_type": hf_config["model_type"],
          "lora_merged": workdir_lib.is_lora_workdir(workdir), "tokenizer_files": copied,
          "notes": notes}


def main(argv) -> int:
  p = argparse.ArgumentParser(prog="rlhf-jax export", usage=USAGE,
                              description="Write a run's parameters (LoRA adapters merged) as "
                                          "a Hugging Face model directory.")
  p.add_argument("workdir", help="run directory (model_config.json + checkpoints/)")
  p.add_argument("out_dir", help="output Hugging Face directory")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  p.add_argument("--overwrite", action="store_true",
                 help="replace the model files of a non-empty OUT_DIR")
  try:
    args = p.parse_args(list(argv))
  except SystemExit as e:  # argparse printed the usage line
    return int(e.code or 0)
  from rlhf_jax.checkpoint import CheckpointError
  try:
    info = export(args.workdir, args.out_dir, args.step, args.overwrite)
  except (ExportError, CheckpointError, FileExistsError, FileNotFoundError, ValueError) as e:
    if os.environ.get("RLHF_JAX_DEBUG"):
      raise
    print(f"error: {e}", file=sys.stderr)
    return 1
  for note in info["notes"]:
    print(f"note: {note}")
  print(f"exported {args.workdir} (step {info['step']}"
        + (", LoRA adapters merged" if info["lora_merged"] else "")
        + f") -> {args.out_dir} (model_type={info['model_type']}, tokenizer: "
        + (", ".join(info["tokenizer_files"]) or "none") + ")")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
