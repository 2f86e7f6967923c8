"""Pieces every trainer shares: optimizer, sharded state creation, resume, workdir."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from typing import Any, Callable, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlhf_jax import checkpoint as ckpt_lib
from rlhf_jax import config as config_lib
from rlhf_jax import metrics as metrics_lib
from rlhf_jax import parallel
from rlhf_jax.models import lora as lora_lib


def learning_rate_schedule(opt: Any, num_steps: int) -> optax.Schedule:
  """Linear warmup 0 -> lr over warmup_steps, then cosine decay to lr * final_lr_ratio."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=opt.lr, warmup_steps=max(int(opt.warmup_steps), 0),
      decay_steps=max(int(num_steps), int(opt.warmup_steps) + 1),
      end_value=opt.lr * opt.final_lr_ratio)


def _decay_mask(params):
  """Weight decay on kernels/embeddings only, not on norm scales or biases."""
  def leaf_mask(path, _):
    names = [p.key for p in path if isinstance(p, jax.tree_util.DictKey)]
    return bool(names) and names[-1] not in ("scale", "bias")
  return jax.tree_util.tree_map_with_path(leaf_mask, params)


def make_optimizer(opt: Any, num_steps: int):
  """AdamW (Loshchilov & Hutter 2019) with global-norm clipping; returns (tx, schedule)."""
  schedule = learning_rate_schedule(opt, num_steps)
  parts = []
  if opt.grad_clip_norm and opt.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(opt.grad_clip_norm))
  parts.append(optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                           weight_decay=opt.weight_decay, mask=_decay_mask))
  return optax.chain(*parts), schedule


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
    params = jax.device_put(params, shardings["params"])
    state = jax.jit(lambda p: {"step": jnp.zeros((), jnp.int32), "params": p,
                               "opt_state": tx.init(p)},
                    out_shardings=shardings)(params)
  return state, shardings


def unboxed_init(model, rng, *example_inputs):
  """Plain float32 parameters of `model` (random init, logical-axis boxes removed)."""
  return nn.meta.unbox(jax.jit(lambda r: model.init(r, *example_inputs)["params"])(rng))


def restore_or_keep(checkpointer: ckpt_lib.Checkpointer, state, shardings):
  """(start_step, state): the latest checkpoint if there is one, else (0, state)."""
  restored = checkpointer.restore(ckpt_lib.abstract_like(state, shardings))
  if restored is None:
    return 0, state
  step, state = restored
  return int(step), state


class TrainingError(RuntimeError):
  """A run that cannot go on (e.g. config.max_bad_steps non-finite updates in a row)."""


def all_finite(grads, loss=None) -> jax.Array:
  """bool scalar: every gradient entry (and the loss, if given) is finite."""
  leaves = [jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]
  if loss is not None:
    leaves.append(jnp.all(jnp.isfinite(loss)))
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def apply_gradients(state, grads, tx, count_step: bool = True):
  """One optimizer update of state {"step", "params", "opt_state", ...} (other keys kept).

  count_step: advance state["step"] (trainers whose step is one update); online-RL
  trainers count rollout steps themselves.
  Numerical guard: if any gradient is NaN/Inf the parameters and optimizer state are
  kept as they were (the step still counts: the batch is skipped); callers report it
  as the metric skipped_update = 1 (`skipped_metric`), which `train_loop` counts.
  """
  finite = all_finite(grads)
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  new = {**state, "params": keep(optax.apply_updates(state["params"], updates),
                                 state["params"]),
         "opt_state": keep(opt_state, state["opt_state"])}
  if count_step:
    new["step"] = state["step"] + 1
  return new


NAN_STEPS_ENV = "RLHF_JAX_NAN_STEPS"


def inject_nonfinite(loss, state) -> jax.Array:
  """Testing hook for the numerical guard: with RLHF_JAX_NAN_STEPS="3,7" (set before the
  step is traced) the loss of training steps 3 and 7 (train_loop's numbering, i.e.
  state["step"] + 1 for every trainer) is multiplied by NaN, so that every gradient is
  NaN and the update must be skipped. Unset (normal runs): `loss` itself, nothing traced.
  Used by tests/test_reliability.py and experiments/reliability."""
  spec = os.environ.get(NAN_STEPS_ENV, "").strip()
  if not spec:
    return loss
  steps = jnp.asarray([int(s) for s in spec.split(",") if s.strip()], jnp.int32)
  bad = jnp.any(state["step"] + 1 == steps)
  return loss * jnp.where(bad, jnp.float32(jnp.nan), jnp.float32(1.0))


def skipped_metric(grads) -> jax.Array:
  """float32 1.0 when `apply_gradients` skipped this update (non-finite gradients)."""
  return 1.0 - all_finite(grads).astype(jnp.float32)


def make_update(loss_fn, tx, count_step: bool = True, frozen: "Frozen | None" = None):
  """update(state, *args) -> (state, metrics) for loss_fn(params, *args) -> (loss, metrics):
  value_and_grad + optimizer update; adds grad_norm to the metrics. Not jitted.

  With LoRA (`frozen` enabled) the frozen base comes right after the state,
  update(state, base, *args) (call it as update(state, *frozen.args, *args)); loss_fn
  sees the merged parameters and gradients reach only state["params"] (adapters + fully
  trained leaves). The base is an argument, never a constant of the compiled step.
  """
  frozen = frozen or Frozen()

  def update(state, *args):
    base, args = frozen.split_args(args)
    rng, carry = dropout_rng(state)

    def loss(trained):
      value, metrics = loss_fn(frozen.merge(base, trained, rng), *args)
      return inject_nonfinite(value, state), metrics
    (_, metrics), grads = jax.value_and_grad(loss, has_aux=True)(state["params"])
    return ({**apply_gradients(state, grads, tx, count_step), **carry},
            {**metrics, "grad_norm": optax.tree.norm(grads),
             "skipped_update": skipped_metric(grads)})
  return update


def aggregation_weight(aggregation: str):
  """weight(micro_batch) for `make_accumulating_update`: the micro-batch's share of a
  loss aggregated with `aggregation` (rlhf_jax/losses/ppo.py): its real tokens for
  token_mean, its non-empty sequences for the seq_mean_* modes."""
  if aggregation == "token_mean":
    return lambda mb: jnp.sum(mb["mask"].astype(jnp.float32))
  return lambda mb: jnp.sum((mb["mask"].sum(axis=1) > 0).astype(jnp.float32))


def make_accumulating_update(loss_fn, tx, micro_batches: int, weight_fn, count_step=True,
                             frozen: "Frozen | None" = None, metric_weights=None,
                             summed_metrics=()):
  """Like `make_update` (update(state, [base,] *consts, batch)), with the batch (the last
  argument; `consts` such as reference parameters are passed whole to every part) split
  into `micro_batches` equal parts along axis 0 whose gradients are summed with weights
  weight_fn(part) / sum(weights) (lax.scan, one part in memory at a time). For a loss
  that is a weighted mean over the batch (rows, tokens or sequences;
  `aggregation_weight`), the update equals the whole-batch update. Metrics are the same
  weighted means over the parts (so ratio_min/max are averages), unless
  metric_weights(part) -> {name: weight} gives a metric its own (unnormalised) weight,
  e.g. the count its ratio is taken over, so that the combined value is the whole-batch
  one; metrics named in `summed_metrics` (counts) are added up. LoRA dropout uses one
  mask for all parts.
  """
  if micro_batches == 1:
    return make_update(loss_fn, tx, count_step, frozen)
  frozen = frozen or Frozen()

  def update(state, *args):
    base, args = frozen.split_args(args)
    *consts, batch = args
    rng, carry = dropout_rng(state)

    def loss(trained, part):
      value, metrics = loss_fn(frozen.merge(base, trained, rng), *consts, part)
      return inject_nonfinite(value, state), metrics
    grad_fn = jax.value_and_grad(loss, has_aux=True)
    parts = jax.tree.map(lambda x: x.reshape(micro_batches, -1, *x.shape[1:]), batch)
    w = jax.vmap(weight_fn)(parts)
    w = w / jnp.maximum(jnp.sum(w), 1e-12)
    first = jax.tree.map(lambda x: x[0], parts)
    _, m_shape = jax.eval_shape(loss, state["params"], first)
    zeros = (jax.tree.map(jnp.zeros_like, state["params"]),
             jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), m_shape))
    if metric_weights is None and not summed_metrics:
      def body(acc, xs):
        part, wi = xs
        (_, m), g = grad_fn(state["params"], part)
        return jax.tree.map(lambda a, b: a + wi * b, acc, (g, m)), None

      (grads, metrics), _ = jax.lax.scan(body, zeros, (parts, w))
    else:
      # Per-metric weights: accumulate sum_i w_ik m_ik and sum_i w_ik, divide at the end.
      own = metric_weights or (lambda part: {})

      def weights_of(part, wi):
        mw = own(part)
        return {k: (jnp.float32(1.0) if k in summed_metrics else
                    jnp.asarray(mw[k], jnp.float32) if k in mw else wi) for k in m_shape}

      def body(acc, xs):
        part, wi = xs
        (_, m), g = grad_fn(state["params"], part)
        g_acc, m_acc, w_acc = acc
        mw = weights_of(part, wi)
        return (jax.tree.map(lambda a, b: a + wi * b, g_acc, g),
                {k: m_acc[k] + mw[k] * m[k] for k in m_acc},
                {k: w_acc[k] + mw[k] for k in w_acc}), None

      w_zeros = {k: jnp.float32(0.0) for k in m_shape}
      (grads, m_sum, w_sum), _ = jax.lax.scan(body, (*zeros, w_zeros), (parts, w))
      metrics = {k: m_sum[k] if k in summed_metrics else
                 jnp.where(w_sum[k] > 0, m_sum[k] / jnp.maximum(w_sum[k], 1e-30), 0.0)
                 for k in m_sum}
    return ({**apply_gradients(state, grads, tx, count_step), **carry},
            {**metrics, "grad_norm": optax.tree.norm(grads),
             "skipped_update": skipped_metric(grads)})
  return update


def rows_weight(part) -> jax.Array:
  """weight_fn of `make_accumulating_update` for a loss that is a mean over batch rows."""
  return jnp.float32(jax.tree.leaves(part)[0].shape[0])


# ----------------------------------------------------------------------------
# What is trained: every parameter, or LoRA adapters on a frozen base
# ----------------------------------------------------------------------------

LORA_DIR = "lora"  # WORKDIR/lora/{config.json, base/}: a LoRA run's frozen base, written once


@dataclasses.dataclass(eq=False)
class Frozen:
  """The parameters the optimizer does not train, and how the trained ones combine
  with them into the model's parameters.

  Full fine-tuning (`Frozen()`): nothing is frozen; merge/full return the trained
  parameters themselves, `params` is None and step functions take no extra argument.
  LoRA (`rlhf_jax.models.lora`): `params` is the base model, held once (sharded like
  the model), never updated, and passed to every jitted step as its argument after
  the state (`args`, `in_shardings`); the trained tree is {"lora": ..., "full": ...}.
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

  @property
  def args(self) -> tuple:
    """Extra leading arguments of a step function: (base,) under LoRA, else ()."""
    return (self.params,) if self.enabled else ()

  @property
  def in_shardings(self) -> tuple:
    """Their shardings, for jax.jit(in_shardings=(state, *frozen.in_shardings, ...))."""
    return (self.shardings,) if self.enabled else ()

  def split_args(self, args: tuple):
    """(base or None, the remaining args) of a step called with (*frozen.args, *rest)."""
    return (args[0], args[1:]) if self.enabled else (None, args)

  def model_shardings(self, shardings):
    """Shardings of the model's parameters (of `full(...)`), given the state's."""
    return self.shardings if self.enabled else shardings["params"]


def dropout_rng(state):
  """(key for this update's LoRA dropout or None, state entries to carry forward).
  LoRA dropout keys live in state["lora_rng"], so a resumed run draws the same masks."""
  if "lora_rng" not in state:
    return None, {}
  carry, key = jax.random.split(state["lora_rng"])
  return key, {"lora_rng": carry}


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
  resuming = bool(workdir) and _has_checkpoint(workdir)
  lora_dir = os.path.join(workdir, LORA_DIR) if workdir else None
  if cfg is None:
    if resuming and is_lora_workdir(workdir):
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


def _has_checkpoint(workdir: str) -> bool:
  d = os.path.join(workdir, "checkpoints")
  return os.path.isdir(d) and any(n.isdigit() and os.path.isdir(os.path.join(d, n))
                                  for n in os.listdir(d))


def is_lora_workdir(path: str) -> bool:
  """Whether `path` is a LoRA run's workdir (WORKDIR/lora/config.json written)."""
  return os.path.isfile(os.path.join(path, LORA_DIR, "config.json"))


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
    save_json(os.path.join(d, "config.json"),
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


def _read_lora_config(workdir: str) -> "lora_lib.LoraConfig":
  path = os.path.join(workdir, LORA_DIR, "config.json")
  names = {f.name for f in dataclasses.fields(lora_lib.LoraConfig)}
  try:
    with open(path) as f:
      d = json.load(f)
    return lora_lib.LoraConfig(**{k: v for k, v in d.items() if k in names})
  except (OSError, AttributeError, TypeError, ValueError) as e:  # JSONDecodeError is one
    raise ckpt_lib.CheckpointError(f"{path}: not a LoRA config: {e}") from None


def _read_tree(path: str, shardings=None):
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


def _resume_lora_base(workdir: str, cfg, shardings):
  if not is_lora_workdir(workdir):
    raise ckpt_lib.CheckpointError(
        f"{workdir}/checkpoints were not written by a LoRA run (no "
        f"{os.path.join(workdir, LORA_DIR, 'config.json')}); config.lora.rank="
        f"{cfg.rank} needs a new --workdir (or resume with config.lora.rank=0)")
  saved = _read_lora_config(workdir)
  if saved != cfg:
    raise config_lib.ConfigError(
        f"config.lora differs from the one {workdir} was started with "
        f"({os.path.join(workdir, LORA_DIR, 'config.json')}: {saved.to_dict()}; now "
        f"{cfg.to_dict()}); resume with the same config.lora or use a new --workdir")
  return _read_tree(os.path.abspath(os.path.join(workdir, LORA_DIR, "base")), shardings)


def read_lora(workdir: str):
  """(LoraConfig, host numpy base parameters) of a LoRA run's workdir (WORKDIR/lora/)."""
  return (_read_lora_config(workdir),
          _read_tree(os.path.abspath(os.path.join(workdir, LORA_DIR, "base"))))


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


def open_run(config, workdir: str, state, shardings, model_config, tokenizer, extra=None):
  """Checkpointer + resume + the workdir files every trainer writes: (checkpointer, start, state).

  Restores the latest checkpoint if there is one (refusing one that does not fit,
  before anything is written), then writes config.json, model_config.json, the
  tokenizer, and `extra` {filename: json-able}.
  """
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                       config.checkpoint.every, config.checkpoint.keep,
                                       config.checkpoint.async_save)
  start, state = restore_or_keep(checkpointer, state, shardings)
  if start and parallel.is_primary():
    print(f"resumed from step {start}", flush=True)
  if parallel.is_primary():  # multi-host: one writer for the shared workdir files
    prepare_workdir(workdir, config)
    save_json(os.path.join(workdir, "model_config.json"), model_config.to_dict())
    tokenizer.save(workdir)  # the workdir is self-contained: a later run can init_from it
    for name, obj in (extra or {}).items():
      save_json(os.path.join(workdir, name), obj)
  parallel.sync("open_run")
  return checkpointer, start, state


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


def build_tokenizer(config, workdir: str, examples: Callable[[], Iterable]):
  """config.tokenizer.path, else init_from's tokenizer, else train SentencePiece.

  `examples()` yields (prompt messages, completion text) pairs; a trained
  tokenizer learns from them rendered as the model will see them (chat
  template + completion). It is kept as WORKDIR/tokenizer.model so that a
  resumed run uses the exact same vocabulary.
  """
  from rlhf_jax import tokenizer as tok_lib
  t = config.tokenizer
  style = t.chat_style or None
  if t.path or config.init_from:
    return tok_lib.load_tokenizer(t.path or config.init_from, chat_style=style)
  with parallel.primary_first("build_tokenizer"):  # multi-host: process 0 trains it
    return _train_or_load_tokenizer(t, style, workdir, examples)


def _train_or_load_tokenizer(t, style, workdir, examples):
  from rlhf_jax import tokenizer as tok_lib
  prefix = os.path.join(workdir, "tokenizer")
  if os.path.exists(prefix + ".model"):
    return tok_lib.load_tokenizer(prefix + ".model", chat_style=style or "plain")
  corpus = prefix + "_corpus.txt"
  with open(corpus, "w") as f:
    for msgs, completion in examples():
      f.write(tok_lib.render_chat(msgs, style or "plain") + completion + "\n")
  # Trained under a temporary name, then renamed: a run killed mid-training never leaves a
  # truncated tokenizer.model that its resumed run would load.
  tmp = f"{prefix}.tmp{os.getpid()}"
  tok_lib.train_sentencepiece([corpus], tmp, vocab_size=t.vocab_size, model_type=t.model_type)
  os.replace(tmp + ".vocab", prefix + ".vocab")
  os.replace(tmp + ".model", prefix + ".model")
  return tok_lib.load_tokenizer(prefix + ".model", chat_style=style or "plain")


def write_samples(workdir, step, model_config, params, tokenizer, prompts, references, rng,
                  sample_cfg) -> float:
  """Sample completions for chat `prompts` (lists of messages), append them with their
  `references` to WORKDIR/samples.jsonl; returns the exact-match rate."""
  from rlhf_jax import sampling
  from rlhf_jax.data.sft import encode_prompt
  ids = [encode_prompt(tokenizer, p) for p in prompts]
  P = max(len(x) for x in ids)
  tokens = np.full((len(ids), P), tokenizer.pad_id, np.int32)
  mask = np.zeros((len(ids), P), np.int32)
  for i, x in enumerate(ids):
    tokens[i, P - len(x):], mask[i, P - len(x):] = x, 1
  greedy = sample_cfg.temperature <= 0
  out = sampling.generate(model_config, params, tokens, mask, rng,
                          max_new_tokens=sample_cfg.max_new_tokens, greedy=greedy,
                          temperature=1.0 if greedy else sample_cfg.temperature,
                          eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
  toks, m = parallel.to_host(out.tokens_BN), parallel.to_host(out.mask_BN)
  rows = []
  for i, (msgs, ref) in enumerate(zip(prompts, references)):
    text = tokenizer.decode([int(t) for t, k in zip(toks[i], m[i]) if k and t != tokenizer.eos_id])
    rows.append({"prompt": msgs[-1]["content"], "completion": text, "reference": ref,
                 "exact_match": text.strip() == ref.strip()})
  if parallel.is_primary():
    metrics_lib.append_jsonl(os.path.join(workdir, "samples.jsonl"), step, rows)
  return float(np.mean([r["exact_match"] for r in rows]))


def policy_init(config, tokenizer, families=("language model",)):
  """(ModelConfig, params or None): from config.init_from (see `load_init`; a run workdir
  must hold one of `families`), else the architecture in config.model with the
  tokenizer's vocabulary (random init)."""
  if config.init_from:
    mcfg, params = load_init(config.init_from, config.model.dtype, config.model.remat,
                             config.model.remat_policy, families,
                             attention=config.model.attention,
                             logits_chunk=config.model.logits_chunk)
  else:
    mcfg, params = config_lib.model_config(config, vocab_size=tokenizer.vocab_size), None
  if mcfg.vocab_size < tokenizer.vocab_size:
    raise config_lib.ConfigError(f"model vocab_size={mcfg.vocab_size} is smaller than the "
                                 f"tokenizer's vocabulary ({tokenizer.vocab_size})")
  return mcfg, params


def host_metrics(metrics: dict) -> dict:
  return {k: float(v) for k, v in jax.device_get(metrics).items()}


def save_json(path: str, obj) -> None:
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)


def train_loop(config, workdir: str, *, state, start: int, train_step, get_batch, mesh,
               checkpointer, schedule, evaluate=None, desc="train", progress_keys=("loss",),
               count_tokens=None, extra_metrics=None, shard_batches=True):
  """The loop every trainer shares; returns the last logged row plus step/preempted.

  For step = start+1 .. config.num_steps: batch = get_batch(step - 1) (host
  numpy, deterministic in the step), state, m = train_step(state, batch on the
  mesh). Every `log_every` steps a metrics row (train metrics + learning_rate +
  tokens_per_second) goes to metrics.jsonl / TensorBoard; every `eval_every`
  steps (and at step 0 and the last step) `evaluate(params, step) -> dict` adds
  eval metrics. Checkpoints every `checkpoint.every` steps and at the end;
  SIGTERM checkpoints and returns early with preempted=True (`rlhf-jax train` then
  exits with EXIT_PREEMPTED). The loop's own counters (skipped updates, the current
  run of non-finite steps) are saved in the checkpoint too, so that a resumed run
  logs exactly what an uninterrupted one does. `extra_metrics`
  (e.g. data statistics) are added to every row. `count_tokens(batch)` gives
  the tokens a batch trains on (tokens_per_second); trainers that measure their
  own throughput pass None. shard_batches=False hands host batches to
  train_step as they are (online RL: the step samples its own batch).
  """
  primary = parallel.is_primary()  # multi-host: process 0 logs, all processes compute
  writer = metrics_lib.MetricsWriter(
      workdir, start, enabled=primary,
      extra_sinks=metrics_lib.config_sinks(config, workdir) if primary else ())
  progress = metrics_lib.Progress(start, config.num_steps, desc=desc, enabled=primary)
  throughput = metrics_lib.Throughput()
  t_start = time.perf_counter()
  elapsed = lambda: writer.prior_elapsed + time.perf_counter() - t_start  # across resumes
  last = {}
  if start == 0 and evaluate is not None and config.eval_every:
    last = writer.write(0, {**evaluate(state["params"], 0), "elapsed_s": elapsed()})
  preempted, step = False, start
  max_bad = int(config.get("max_bad_steps", 3))
  restored = checkpointer.restored_loop if start else {}
  # All skipped updates of the run (across resumes) and the current run of them in a row.
  skipped_total, bad_run = restored.get("skipped_updates", 0), restored.get("bad_run", 0)
  loop_state = lambda: {"skipped_updates": skipped_total, "bad_run": bad_run}
  with ckpt_lib.PreemptionGuard() as preemption:
    for step in range(start + 1, config.num_steps + 1):
      batch = get_batch(step - 1)
      state, m = train_step(state, parallel.shard_batch(batch, mesh) if shard_batches else batch)
      if "skipped_update" in m and float(m["skipped_update"]) > 0:  # numerical guard
        bad_run += 1
        skipped_total += 1
        if primary:
          progress.write(f"step {step} (batch {step - 1}): non-finite loss/gradients, update "
                         f"skipped ({bad_run} in a row, {skipped_total} in this run)")
        if max_bad and bad_run >= max_bad:
          checkpointer.close()
          progress.close()
          writer.close()
          raise TrainingError(
              f"{bad_run} consecutive non-finite updates (steps {step - bad_run + 1}-{step}, "
              f"config.max_bad_steps={max_bad}); parameters were not updated by them, the last "
              f"checkpoint is {checkpointer.latest_step()}. Lower optimizer.lr, check the data "
              f"of those batches, or raise max_bad_steps")
      else:
        bad_run = 0
      if count_tokens is not None:
        throughput.add(count_tokens(batch))
      if step % config.log_every == 0 or step == config.num_steps:
        row = {**host_metrics(m), **(extra_metrics or {}), "skipped_updates": skipped_total}
        row["learning_rate"] = float(schedule(step - 1))
        if count_tokens is not None:
          row["tokens_per_second"] = throughput.rate()
        if evaluate is not None and config.eval_every and (
            step % config.eval_every == 0 or step == config.num_steps):
          row.update(evaluate(state["params"], step))
          throughput.restart()  # eval / sampling time is not training throughput
        row["elapsed_s"] = elapsed()
        last = writer.write(step, row)
        progress.update(0, **{k: row[k] for k in progress_keys if k in row})
      progress.update(1)
      checkpointer.maybe_save(step, state, force=step == config.num_steps, loop=loop_state())
      ckpt_lib.maybe_inject_fault(step)
      if preemption.any_requested() and step < config.num_steps:
        checkpointer.maybe_save(step, state, force=True, loop=loop_state())
        preempted = True
        print(f"preempted: saved checkpoint at step {step}; rerun the same command to resume",
              flush=True)
        break
    checkpointer.close()  # waits for the last write; a SIGTERM now only sets the flag
  progress.close()
  writer.close()
  return {"step": step, "preempted": preempted, **last}
