"""The train state {"step", "params", "opt_state", ...}: sharded creation, and what is
trained (every parameter, or LoRA adapters on a frozen base written once to WORKDIR/lora/)."""
from __future__ import annotations

import dataclasses
import os
import shutil
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from rlhf_jax import checkpoint as ckpt_lib
from rlhf_jax import config as config_lib
from rlhf_jax import parallel
from rlhf_jax import workdir as workdir_lib
from rlhf_jax.models import lora as lora_lib
from rlhf_jax.workdir import LORA_DIR


def create_state(init_params_fn: Callable[[jax.Array], Any], tx, mesh, rng,
                 params=None):
  """Sharded train state {"step", "params", "opt_state"} and its shardings.

  init_params_fn(rng) returns *boxed* params (logical axis names); their names
  decide the layout of params and optimizer state on `mesh`. If `params` is
  given (pretrained weights), they replace the random init.
  """
  def init_boxed(rng):
    p = init_params_fn(rng)
    return {"step": jnp.zeros((), jnp.int32), "params": p, "opt_state": tx.init(p)}

  shardings = parallel.boxed_shardings(lambda: init_boxed(rng), mesh)
  if params is None:
    state = jax.jit(lambda r: nn.meta.unbox(init_boxed(r)), out_shardings=shardings)(rng)
  else:
    # A device copy of the given weights (may_alias=False: never the caller's own arrays)
    # donated to the init, so that the state's params are that copy, not a second one.
    params = jax.device_put(params, shardings["params"], may_alias=False)
    state = jax.jit(lambda p: {"step": jnp.zeros((), jnp.int32), "params": p,
                               "opt_state": tx.init(p)},
                    out_shardings=shardings, donate_argnums=0)(params)
  return state, shardings


def unboxed_init(model, rng, *example_inputs, path=()):
  """Plain float32 parameters of `model` (random init, logical-axis boxes removed); with
  `path` (keys) only that subtree, computed alone (jit drops the rest of the init)."""
  def init(r):
    p = model.init(r, *example_inputs)["params"]
    for k in path:
      p = p[k]
    return p
  return nn.meta.unbox(jax.jit(init)(rng))



BASE = "base"  # the train state's entry for a LoRA run's frozen base (absent otherwise)


def checkpointed(tree: dict) -> dict:
  """The part of a train state (or of its shardings) that checkpoints hold: all but the
  frozen LoRA base, which is written once to WORKDIR/lora/base."""
  return {k: v for k, v in tree.items() if k != BASE}


def jit_step(step_fn, state_shardings=None, *arg_shardings, metrics_sharding=None,
             donate: bool = False):
  """jax.jit of step_fn(state, *args) -> (state, *outputs), called as f(state, *args).

  A LoRA state's frozen base (state["base"]) reaches the compiled step as its own
  argument: an input, never a constant, never donated (the reference policy and the
  samplers hold the same arrays) and not an output; with donate=True the rest of the
  state is donated. state_shardings (and arg_shardings, metrics_sharding: the outputs
  after the state) fix the layouts; None lets jit infer them. `f.lower(state, *args)`
  lowers it (memory analysis)."""
  def split_fn(rest, base, *args):
    new, *out = step_fn(rest if base is None else {**rest, BASE: base}, *args)
    return (checkpointed(new), *out)

  kw = {"donate_argnums": 0} if donate else {}
  if state_shardings is not None:
    kw["in_shardings"] = (checkpointed(state_shardings), state_shardings.get(BASE),
                          *arg_shardings)
    if metrics_sharding is not None:
      kw["out_shardings"] = (checkpointed(state_shardings), metrics_sharding)
  jitted = jax.jit(split_fn, **kw)

  def call(state, *args):
    new, *out = jitted(checkpointed(state), state.get(BASE), *args)
    return ({**new, BASE: state[BASE]} if BASE in state else new, *out)
  call.lower = lambda state, *args: jitted.lower(checkpointed(state), state.get(BASE), *args)
  return call


@dataclasses.dataclass(eq=False)
class Frozen:
  """The parameters the optimizer does not train, and how the trained ones combine
  with them into the model's parameters.

  Full fine-tuning (`Frozen()`): nothing is frozen; merge/full return the trained
  parameters themselves and `params` is None.
  LoRA (`rlhf_jax.models.lora`): `params` is the base model, held once (sharded like
  the model), never updated; it is also the train state's "base" entry (`BASE`), which
  `jit_step` hands to the compiled step as its own never-donated argument and the
  checkpoints leave out (`checkpointed`). The trained tree is {"lora": ..., "full": ...}.
  """
  lora: Any = None           # lora_lib.LoraConfig, None = full fine-tuning
  params: Any = None         # the frozen base (device arrays)
  shardings: Any = None      # its shardings
  _merge_fn: Any = dataclasses.field(default=None, repr=False)

  @property
  def enabled(self) -> bool:
    return self.lora is not None

  def merge(self, base, trained, rng=None):
    """The model's parameters from the base and the trained tree (pure; inside jit)."""
    return trained if self.lora is None else lora_lib.merge(base, trained, self.lora, rng)

  def full(self, trained):
    """The model's parameters for samplers and evaluation (one jitted merge)."""
    if self.lora is None:
      return trained
    if self._merge_fn is None:
      self._merge_fn = jax.jit(lambda base, t: lora_lib.merge(base, t, self.lora),
                               out_shardings=self.shardings)  # laid out like the base
    return self._merge_fn(self.params, trained)

  def initial(self, params, *path):
    """The initial policy (the reference of DPO / KL penalties / eval_kl), subtree `path`:
    under LoRA the frozen base itself (B = 0, so the initial merged model equals it
    exactly; no copy), else a copy of `params` taken before any update."""
    src = self.params if self.enabled else params
    for k in path:
      src = src[k]
    return src if self.enabled else jax.tree.map(jnp.copy, src)

  def model_shardings(self, shardings):
    """Shardings of the model's parameters (of `full(...)`), given the state's."""
    return self.shardings if self.enabled else shardings["params"]


def lora_config(config, always_trained=()) -> "lora_lib.LoraConfig | None":
  """config.lora as a LoraConfig (None when rank is 0), errors as ConfigError."""
  c = config.get("lora")
  if c is None or not c.rank:
    return None
  try:
    return lora_lib.LoraConfig.from_config(c, always_trained)
  except ValueError as e:
    raise config_lib.ConfigError(str(e)) from None


def create_train_state(init_params_fn: Callable[[jax.Array], Any], tx, mesh, rng, params=None,
                       *, config=None, always_trained=(), workdir: str | None = None):
  """(state, shardings, frozen) for a trainer: `create_state`, or its LoRA version.

  Full fine-tuning (config.lora.rank == 0): exactly `create_state`, frozen = Frozen().
  LoRA (rank > 0): state["params"] is the trained tree of `rlhf_jax.models.lora`
  (adapters + leaves named in config.lora.trainable + `always_trained`, e.g. a scalar
  head that must learn), the optimizer state covers only those, and frozen.params is
  the base (`params`, else the random init of `rng`) with the layout a full run would
  give it. Adapters are initialised from a key derived from `rng`. The base is written
  once to WORKDIR/lora/ and read back from there on resume, so the workdir is
  self-contained (`load_init`, `rlhf-jax export` merge it with the adapters).
  Prints trainable_params / total_params once.
  """
  cfg = lora_config(config, always_trained) if config is not None else None
  resuming = bool(workdir) and workdir_lib.has_checkpoint(workdir)
  lora_dir = os.path.join(workdir, LORA_DIR) if workdir else None
  if cfg is None:
    if resuming and workdir_lib.is_lora_workdir(workdir):
      raise ckpt_lib.CheckpointError(
          f"{workdir}: its checkpoints hold LoRA adapters ({lora_dir}); resume it with the "
          f"config.lora it was started with, or use a new --workdir")
    state, shardings = create_state(init_params_fn, tx, mesh, rng, params)
    n = lora_lib.num_params(state["params"])
    if parallel.is_primary():
      print(f"parameters: trainable_params={n:,} total_params={n:,} (full fine-tuning)",
            flush=True)
    return state, shardings, Frozen()

  boxed = jax.eval_shape(init_params_fn, rng)
  base_shardings = parallel.logical_to_sharding(nn.get_partition_spec(boxed), mesh)
  if resuming:
    base = _resume_lora_base(workdir, cfg, base_shardings)
  elif params is not None:
    base = jax.device_put(params, base_shardings)
  else:
    base = jax.jit(lambda r: nn.meta.unbox(init_params_fn(r)), out_shardings=base_shardings)(rng)
  rng_lora = jax.random.fold_in(rng, 0x10AA)

  def init_boxed(base_values):
    rebox = lambda box, v: box.replace_boxed(v) if isinstance(box, nn.LogicallyPartitioned) else v
    trained = lora_lib.init_trainable(
        jax.tree.map(rebox, boxed, base_values,
                     is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)), cfg, rng_lora)
    s = {"step": jnp.zeros((), jnp.int32), "params": trained, "opt_state": tx.init(trained)}
    if cfg.dropout > 0:
      s["lora_rng"] = jax.random.fold_in(rng, 0xD509)
    return s

  try:
    shardings = parallel.boxed_shardings(lambda: init_boxed(base), mesh)
  except ValueError as e:
    raise config_lib.ConfigError(str(e)) from None
  state = jax.jit(lambda b: nn.meta.unbox(init_boxed(b)), out_shardings=shardings)(base)
  state[BASE], shardings[BASE] = base, base_shardings  # not trained, not checkpointed
  frozen = Frozen(cfg, base, base_shardings)
  n_trained = lora_lib.num_params(state["params"])
  n_total = (lora_lib.num_params(base) + lora_lib.num_params(state["params"]["lora"]))
  if parallel.is_primary():
    print(f"parameters: trainable_params={n_trained:,} total_params={n_total:,} "
          f"({100.0 * n_trained / n_total:.2f}% trained; LoRA rank {cfg.rank} on "
          f"{','.join(cfg.target_modules)}"
          + (f", fully trained: {','.join(cfg.trainable)}" if cfg.trainable else "") + ")",
          flush=True)
  if not resuming:
    _write_lora_base(workdir, frozen, {"trainable_params": n_trained, "total_params": n_total})
  return state, shardings, frozen


def _write_lora_base(workdir, frozen: Frozen, counts: dict) -> None:
  """WORKDIR/lora/base (orbax) + WORKDIR/lora/config.json, the latter last (it marks a
  complete directory). A previous launch's copy is replaced only when that launch
  never checkpointed (the caller checks)."""
  import orbax.checkpoint as ocp
  if not workdir:
    return
  d = os.path.abspath(os.path.join(workdir, LORA_DIR))
  if parallel.is_primary():  # multi-host: one process manages the directory ...
    _remove_own_lora_files(d)
    os.makedirs(d, exist_ok=True)
  parallel.sync("lora_base_dir")
  ckptr = ocp.StandardCheckpointer()  # ... orbax writes the (sharded) base collectively
  ckptr.save(os.path.join(d, "base"), frozen.params)
  ckptr.wait_until_finished()
  ckptr.close()
  if parallel.is_primary():
    workdir_lib.save_json(os.path.join(d, "config.json"),
              {**frozen.lora.to_dict(), "scale": frozen.lora.scale, **counts})
  parallel.sync("lora_base")


def _remove_own_lora_files(d: str) -> None:
  """Delete a previous launch's WORKDIR/lora/{base/, config.json} (and our temporary files
  there), and nothing else: a directory holding anything we did not write is refused."""
  if not os.path.exists(d):
    return
  names = os.listdir(d)
  ours = lambda n: n in ("base", "config.json") or n.startswith(("base.orbax-checkpoint-tmp",
                                                                 "config.json.tmp"))
  foreign = sorted(n for n in names if not ours(n))
  if foreign:
    raise ckpt_lib.CheckpointError(
        f"{d}: holds files rlhf-jax did not write ({foreign[:5]}); it would replace this "
        f"directory's LoRA base weights. Move them, or use a new --workdir")
  for n in names:
    p = os.path.join(d, n)
    shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)


def _resume_lora_base(workdir: str, cfg, shardings):
  if not workdir_lib.is_lora_workdir(workdir):
    raise ckpt_lib.CheckpointError(
        f"{workdir}/checkpoints were not written by a LoRA run (no "
        f"{os.path.join(workdir, LORA_DIR, 'config.json')}); config.lora.rank="
        f"{cfg.rank} needs a new --workdir (or resume with config.lora.rank=0)")
  saved = workdir_lib.read_lora_config(workdir)
  if saved != cfg:
    raise config_lib.ConfigError(
        f"config.lora differs from the one {workdir} was started with "
        f"({os.path.join(workdir, LORA_DIR, 'config.json')}: {saved.to_dict()}; now "
        f"{cfg.to_dict()}); resume with the same config.lora or use a new --workdir")
  return workdir_lib.read_tree(os.path.abspath(os.path.join(workdir, LORA_DIR, "base")), shardings)


