"""Run workdirs on disk: what they hold and how to read them (model config, checkpoint
parameters with a LoRA run's adapters merged, model family checks, `load_init`)."""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np

from rlhf_jax import checkpoint as ckpt_lib
from rlhf_jax import config as config_lib
from rlhf_jax.models import lora as lora_lib

LORA_DIR = "lora"  # WORKDIR/lora/{config.json, base/}: a LoRA run's frozen base, written once


def has_checkpoint(workdir: str) -> bool:
  d = os.path.join(workdir, "checkpoints")
  return os.path.isdir(d) and any(n.isdigit() and os.path.isdir(os.path.join(d, n))
                                  for n in os.listdir(d))


def is_lora_workdir(path: str) -> bool:
  """Whether `path` is a LoRA run's workdir (WORKDIR/lora/config.json written)."""
  return os.path.isfile(os.path.join(path, LORA_DIR, "config.json"))


def read_lora_config(workdir: str) -> "lora_lib.LoraConfig":
  path = os.path.join(workdir, LORA_DIR, "config.json")
  names = {f.name for f in dataclasses.fields(lora_lib.LoraConfig)}
  try:
    with open(path) as f:
      d = json.load(f)
    return lora_lib.LoraConfig(**{k: v for k, v in d.items() if k in names})
  except (OSError, AttributeError, TypeError, ValueError) as e:  # JSONDecodeError is one
    raise ckpt_lib.CheckpointError(f"{path}: not a LoRA config: {e}") from None


def read_tree(path: str, shardings=None):
  """An orbax pytree written by `_write_lora_base`: onto `shardings`, or host numpy."""
  import orbax.checkpoint as ocp
  ckptr = ocp.StandardCheckpointer()
  try:  # orbax raises assorted errors for missing / mismatched trees: one CheckpointError
    return ckpt_lib.orbax_read(lambda: _restore_tree(ckptr, path, shardings),
                               f"cannot read LoRA base weights {path}")
  finally:
    ckptr.close()


def _restore_tree(ckptr, path, shardings):
  meta = ckptr.metadata(path).item_metadata.tree
  if shardings is None:
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=cpu), meta)
  else:
    target = jax.tree.map(lambda m, s: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=s),
                          meta, shardings)
  tree = ckptr.restore(path, target)
  return tree if shardings is not None else jax.tree.map(np.asarray, tree)


def read_lora(workdir: str):
  """(LoraConfig, host numpy base parameters) of a LoRA run's workdir (WORKDIR/lora/)."""
  return (read_lora_config(workdir),
          read_tree(os.path.abspath(os.path.join(workdir, LORA_DIR, "base"))))


def read_workdir_params(workdir: str, step: int | None = None):
  """(step, host numpy parameters) of a run workdir's checkpoint (latest or `step`), with a
  LoRA run's adapters merged into its base: the parameters the run's model uses."""
  step, state = ckpt_lib.read_checkpoint(os.path.join(workdir, "checkpoints"), step)
  params = state["params"]
  if is_lora_workdir(workdir):
    if set(params) != {"lora", "full"}:
      raise ckpt_lib.CheckpointError(f"{workdir}: has {LORA_DIR}/ but checkpoint {step} holds "
                                     f"no LoRA adapters (params {sorted(params)})")
    cfg, base = read_lora(workdir)
    params = jax.tree.map(np.asarray, lora_lib.merge(base, params, cfg))
  elif set(params) == {"lora", "full"}:
    raise ckpt_lib.CheckpointError(f"{workdir}: checkpoint {step} holds LoRA adapters but the "
                                   f"base weights {os.path.join(workdir, LORA_DIR)} are missing")
  return step, params


def prepare_workdir(workdir: str, config) -> None:
  """Create workdir and write the resolved config.json (atomic)."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "config.json")
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(config_lib.to_json(config))
  os.replace(tmp, path)


def is_workdir(path: str) -> bool:
  """Whether `path` is one of our run directories (model_config.json + checkpoints/)."""
  return (os.path.isfile(os.path.join(path, "model_config.json"))
          and os.path.isdir(os.path.join(path, "checkpoints")))


def read_model_config(workdir: str):
  """The ModelConfig of a run workdir (WORKDIR/model_config.json), errors naming the file."""
  from rlhf_jax.models import ModelConfig
  path = os.path.join(workdir, "model_config.json")
  try:
    with open(path) as f:
      d = json.load(f)
    if not isinstance(d, dict):
      raise ValueError(f"expected a JSON object, got {type(d).__name__}")
    return ModelConfig.from_dict(d)
  except (TypeError, ValueError) as e:  # JSONDecodeError is a ValueError
    raise ckpt_lib.CheckpointError(f"{path}: expected a JSON ModelConfig object: {e}") from None


# The top-level parameters of each model family a workdir can hold (`family_of`).
FAMILIES = {"language model": {"embed", "layers", "final_norm"},
            "reward model (backbone + scalar head)": {"backbone", "head"},
            "policy + value model (PPO)": {"policy", "value"}}


LM_OR_RM = ("language model", "reward model (backbone + scalar head)")


def family_of(params) -> str:
  """Which model family a parameter tree is (FAMILIES), from its top-level names."""
  names = set(params)
  for family, need in FAMILIES.items():
    if need <= names:
      return family
  return f"unknown model (top-level parameters {sorted(names)})"


def read_workdir_model(workdir: str, step: int | None = None, families=None):
  """(ModelConfig, host numpy params) of a run workdir, checked before use: the params must
  be of one of `families` (FAMILIES keys; None = any) and their tensors must have exactly
  the shapes model_config.json implies (CheckpointError naming the tensor otherwise)."""
  from rlhf_jax.models import init_params
  from rlhf_jax.models.heads import init_scalar_params
  mcfg = read_model_config(workdir)
  _, params = read_workdir_params(workdir, step)
  family = family_of(params)
  if family not in (families or FAMILIES):
    want = " or ".join(families or FAMILIES)
    raise ckpt_lib.CheckpointError(
        f"{workdir}: holds a {family}, but a {want} is needed here (a policy starts from an "
        f"SFT/DPO run or pretrained weights; a critic or a reward model from a reward-model run)")
  key = jax.random.PRNGKey(0)
  lm = jax.eval_shape(lambda: init_params(mcfg, key))
  if family == "language model":
    expected, got = lm, params
  elif family.startswith("reward model"):
    expected, got = jax.eval_shape(lambda: init_scalar_params(mcfg, key)), params
  else:  # PPO: the policy is checked; the critic's layout depends on ppo.critic
    expected, got = lm, params["policy"]
  _check_tree(got, expected, f"{workdir} (its checkpoint vs its model_config.json)")
  return mcfg, params


def _check_tree(params, expected, where: str) -> None:
  """Same tree and shapes and float dtypes as `expected`; CheckpointError naming the tensor."""
  got = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(params)}
  want = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(expected)}
  missing, extra = sorted(want.keys() - got.keys()), sorted(got.keys() - want.keys())
  if missing or extra:
    raise ckpt_lib.CheckpointError(f"{where}: parameter tree does not match: missing "
                                   f"{missing[:5]}, unexpected {extra[:5]}")
  for k, x in want.items():
    if tuple(np.shape(got[k])) != tuple(x.shape):
      raise ckpt_lib.CheckpointError(f"{where}: tensor {k} has shape {tuple(np.shape(got[k]))}, "
                                     f"expected {tuple(x.shape)}")
    if not np.issubdtype(np.asarray(got[k]).dtype, np.floating) and not str(
        np.asarray(got[k]).dtype) == "bfloat16":
      raise ckpt_lib.CheckpointError(f"{where}: tensor {k} has dtype {np.asarray(got[k]).dtype}, "
                                     f"expected a float type")


def load_init(init_from: str, dtype: str, remat: bool, remat_policy: str = "",
              families=("language model",), *, attention: str = "auto", logits_chunk: int = 0):
  """(ModelConfig, params) to start from: a run workdir (latest checkpoint's params, e.g.
  an SFT run feeding a reward model or DPO; a LoRA run's adapters merged into its base),
  or anything `load_pretrained` reads."""
  from rlhf_jax.models import load_pretrained
  if is_workdir(init_from):
    mcfg, params = read_workdir_model(init_from, families=families)
  else:
    mcfg, params = load_pretrained(init_from)
  return dataclasses.replace(mcfg, dtype=dtype, remat=remat, remat_policy=remat_policy,
                             attention=attention, logits_chunk=logits_chunk), params


def save_json(path: str, obj) -> None:
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)


