"""Checkpoints (orbax), resume, and preemption.

`Checkpointer` wraps one `orbax.checkpoint.CheckpointManager` on
WORKDIR/checkpoints: save every N steps, keep the K newest, restore the latest
into the (sharded) layout the current run expects. Orbax writes each step to a
temporary directory and renames it when complete, so a run killed mid-save
never leaves a checkpoint that looks finished.

Safety rules: we never delete or overwrite a checkpoint the run did not
write itself; a checkpoint that does not fit the current model (different
shapes) stops the run with a message naming the tensor, before anything is
written.

A checkpoint holds the whole training state: the trainer's state tree (params,
optimizer state with the non-finite guard's counters, step, and what a trainer adds: the
PPO KL controller, LoRA dropout key). Everything else a resumed run needs is a function of
(config, seed, step): the data order (batch i = batched(data, seed)[i]), the sampling
and dropout keys (fold_in(key, step)), the minibatch permutations, the reference
log-prob cache (recomputed bit for bit if missing). So a run killed at any point and
resumed gives the same parameters and metrics.jsonl as an uninterrupted one.

SIGTERM (what cloud schedulers send before preemption) sets a flag; the trainer
saves a checkpoint at the end of the current step and `rlhf-jax train` exits with
`rlhf_jax.EXIT_PREEMPTED` (75), which launchers read as "re-queue me".
"""
from __future__ import annotations

import gc
import json
import logging
import os
import signal
import sys
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp



class CheckpointError(RuntimeError):
  """A checkpoint that cannot be used by this run; the message says why."""


def _path_str(path) -> str:
  parts = []
  for p in path:
    parts.append(str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))))
  return "/".join(parts)


class Checkpointer:
  """Save / restore the train state under `directory`."""

  def __init__(self, directory: str, save_every: int, keep: int, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self.save_every = int(save_every)
    check_step_dirs(self.directory)
    mute_orbax_leftovers()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=int(keep), save_interval_steps=max(1, self.save_every),
        enable_async_checkpointing=bool(async_save), create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_handlers=ocp.StandardCheckpointHandler())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def maybe_save(self, step: int, state: Any, force: bool = False) -> bool:
    """Save if `step` is on the save interval (or `force`); returns whether it saved."""
    if not force and (self.save_every <= 0 or step % self.save_every):
      return False
    if step in self._manager.all_steps():
      return False
    return bool(self._manager.save(step, args=ocp.args.StandardSave(state), force=True))

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[int, Any] | None:
    """Restore `step` (default latest) into the structure/shardings of `abstract_state`.

    abstract_state: pytree of jax.ShapeDtypeStruct (with .sharding). Returns
    (step, state) or None when there is no checkpoint.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      return None
    target = dict(abstract_state)
    self.check_compatible(step, target)
    state = orbax_read(lambda: self._manager.restore(step, args=ocp.args.StandardRestore(target)),
                       f"cannot restore checkpoint {self.directory}/{step}")
    return step, state

  def check_compatible(self, step: int, abstract_state: Any) -> None:
    """Compare the saved tree, shapes and dtypes with the expected ones; raise naming the
    tensor. Nothing is restored (or written) before this passes."""
    where = f"{self.directory}/{step}"
    check_metadata_files(where)
    meta = orbax_read(lambda: self._manager.item_metadata(step),
                      f"checkpoint {where} is unreadable")
    meta = getattr(meta, "tree", meta)
    if meta is None:
      raise CheckpointError(f"checkpoint {where} has no readable metadata")
    leaves = jax.tree_util.tree_flatten_with_path(meta)[0]
    saved = {_path_str(p): tuple(getattr(v, "shape", ()) or ()) for p, v in leaves}
    saved_dtypes = {_path_str(p): getattr(v, "dtype", None) for p, v in leaves}
    expected = {_path_str(p): tuple(v.shape)
                for p, v in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
    expected_dtypes = {_path_str(p): v.dtype
                       for p, v in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
    missing = sorted(set(expected) - set(saved))
    extra = sorted(set(saved) - set(expected))
    if missing or extra:
      raise CheckpointError(
          f"checkpoint {where} was written by a different model/optimizer: "
          f"missing tensors {missing[:5]}{'...' if len(missing) > 5 else ''}, "
          f"unexpected tensors {extra[:5]}{'...' if len(extra) > 5 else ''}. "
          f"Use a new --workdir, or the config that wrote it.")
    for k in sorted(expected, key=lambda k: (not k.startswith("params"), k)):
      shape = expected[k]
      if saved[k] != shape:
        raise CheckpointError(
            f"checkpoint {where}: tensor '{k}' has shape {saved[k]} but this config expects "
            f"{shape} (different model shape?). Use a new --workdir, or the config that wrote "
            f"it; the existing checkpoints were left untouched.")
      if saved_dtypes[k] is not None and np.dtype(saved_dtypes[k]) != np.dtype(expected_dtypes[k]):
        raise CheckpointError(
            f"checkpoint {where}: tensor '{k}' has dtype {np.dtype(saved_dtypes[k])} but this "
            f"run expects {np.dtype(expected_dtypes[k])}")

  def wait(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()


def check_metadata_files(step_dir: str) -> None:
  """The JSON metadata files orbax keeps in a checkpoint step directory must parse; a
  truncated or corrupt one stops here with one message (before orbax logs its own)."""
  for d, _, files in os.walk(step_dir):
    for name in files:
      if name in ("_CHECKPOINT_METADATA", "_METADATA", "_sharding"):
        path = os.path.join(d, name)
        try:
          with open(path, "rb") as f:
            json.loads(f.read().decode("utf-8"))
        except (OSError, ValueError) as e:  # UnicodeDecodeError, JSONDecodeError
          raise CheckpointError(f"checkpoint {step_dir} is corrupt: {path} is not valid JSON "
                                f"({type(e).__name__}; truncated by an interrupted copy?). "
                                f"Restore it, or use a new --workdir") from None


_ORBAX_MARKERS = ("orbax", "zarr", "OCDBT", "tensorstore")


def _is_orbax_leftover(text: str) -> bool:
  return any(m in text for m in _ORBAX_MARKERS)


class _DropOrbaxTaskErrors(logging.Filter):
  """asyncio's "Task/Future exception was never retrieved" for orbax's own failed background
  reads (a damaged checkpoint: reported once, in our message)."""

  def filter(self, record):
    if "exception was never retrieved" not in str(record.msg):
      return True
    exc = record.exc_info[1] if record.exc_info else None
    return not _is_orbax_leftover(record.getMessage() + repr(exc))


def _drop_orbax_unraisables(previous):
  """sys.unraisablehook without orbax's leftovers of a failed read: its unfinished
  coroutines closed, tensorstore callbacks into its closed event loop ("RuntimeError:
  Event loop is closed", raised in asyncio's own code). Everything else goes to `previous`."""
  def hook(unraisable):
    exc, obj = unraisable.exc_value, unraisable.object
    code = getattr(obj, "cr_code", None)
    if (isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed") or (
        code is not None and _is_orbax_leftover(code.co_filename)):
      return
    previous(unraisable)
  hook.drops_orbax_leftovers = True
  return hook


def mute_orbax_leftovers() -> None:
  """Install (once) the two filters above: a damaged checkpoint then gives one message,
  not our message plus pages of tracebacks from orbax's background reads (they may arrive
  after the read failed, from other threads, until the process exits)."""
  log = logging.getLogger("asyncio")
  if not any(isinstance(f, _DropOrbaxTaskErrors) for f in log.filters):
    log.addFilter(_DropOrbaxTaskErrors())
  if not getattr(sys.unraisablehook, "drops_orbax_leftovers", False):
    sys.unraisablehook = _drop_orbax_unraisables(sys.unraisablehook)


def orbax_read(fn, what: str, error=CheckpointError):
  """fn() (an orbax read); if it fails, `error`("{what}: <the first line of orbax's
  message>"), the original dropped and its leftovers muted (`mute_orbax_leftovers`)."""
  mute_orbax_leftovers()
  try:
    return fn()
  except Exception as e:  # orbax / tensorstore raise many types for damaged checkpoints
    message = f"{what}: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:500]}"
  gc.collect()  # the failed reads, now that nothing refers to them
  raise error(message)


def check_step_dirs(directory: str) -> None:
  """`check_metadata_files` of every finished step directory (orbax reads them all when a
  manager opens `directory`)."""
  if os.path.isdir(directory):
    for name in sorted(os.listdir(directory)):
      if name.isdigit() and os.path.isdir(os.path.join(directory, name)):
        check_metadata_files(os.path.join(directory, name))


def abstract_like(tree, shardings=None):
  """ShapeDtypeStructs (with shardings) for restoring into the layout of `tree`."""
  if shardings is None:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                       sharding=getattr(x, "sharding", None)),
                        tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


class PreemptionGuard:
  """Turns SIGTERM into a flag the training loop polls (save, then stop; `rlhf-jax train`
  then exits with EXIT_PREEMPTED)."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    self._previous = signal.signal(signal.SIGTERM, self._handler)
    return self

  def _handler(self, signum, frame):
    logging.warning("SIGTERM received: will checkpoint after this step and exit.")
    self.requested = True

  def __exit__(self, *exc):
    signal.signal(signal.SIGTERM, self._previous or signal.SIG_DFL)
    return False

  def any_requested(self) -> bool:
    """Whether ANY process got SIGTERM (multi-host: all must save the same step together,
    so the flag is OR-ed across processes every step; no collective with one process)."""
    if jax.process_count() == 1:
      return self.requested
    from jax.experimental import multihost_utils
    return bool(np.max(multihost_utils.process_allgather(np.int32(self.requested))))


def params_equal(a, b) -> bool:
  """Bitwise equality of two parameter trees (host copies)."""
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(
      np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def read_checkpoint(directory: str, step: int | None = None):
  """(step, state as host numpy tree) of a checkpoint directory, for analysis/tests."""
  if not os.path.isdir(directory):
    raise CheckpointError(f"no checkpoint directory at {directory}")
  check_step_dirs(os.path.abspath(directory))
  mute_orbax_leftovers()
  manager = ocp.CheckpointManager(os.path.abspath(directory),
                                  item_handlers=ocp.StandardCheckpointHandler())
  try:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no finished checkpoint in {directory}")
    where = os.path.join(os.path.abspath(directory), str(step))
    check_metadata_files(where)
    # Restore onto this process's first device whatever topology wrote it (a run on 8
    # devices or a pod slice feeds a later run / export on another one).
    def read():
      meta = manager.item_metadata(step)
      meta = getattr(meta, "tree", meta)
      device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
      target = jax.tree.map(
          lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device), meta)
      return manager.restore(step, args=ocp.args.StandardRestore(target))
    state = orbax_read(read, f"cannot read checkpoint {where}")
  finally:
    manager.close()
  return step, jax.tree.map(np.asarray, state)
