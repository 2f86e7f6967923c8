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

SIGTERM (what cloud schedulers send before preemption) sets a flag; the
trainer saves a checkpoint at the end of the current step and exits 0.
"""
from __future__ import annotations

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
    self.check_compatible(step, abstract_state)
    try:
      state = self._manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
    except Exception as e:  # orbax raises many types; name the checkpoint in one message
      raise CheckpointError(f"cannot restore checkpoint {self.directory}/{step}: "
                            f"{type(e).__name__}: {str(e).splitlines()[0][:500]}") from None
    return step, state

  def check_compatible(self, step: int, abstract_state: Any) -> None:
    """Compare the saved tree and shapes with the expected ones; raise naming the tensor."""
    where = f"{self.directory}/{step}"
    try:
      meta = self._manager.item_metadata(step)
    except Exception as e:
      raise CheckpointError(f"checkpoint {where} is unreadable: {type(e).__name__}: {e}") from None
    meta = getattr(meta, "tree", meta)
    if meta is None:
      raise CheckpointError(f"checkpoint {where} has no readable metadata")
    saved = {_path_str(p): tuple(getattr(v, "shape", ()) or ())
             for p, v in jax.tree_util.tree_flatten_with_path(meta)[0]}
    expected = {_path_str(p): tuple(v.shape)
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

  def wait(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_like(tree, shardings=None):
  """ShapeDtypeStructs (with shardings) for restoring into the layout of `tree`."""
  if shardings is None:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                       sharding=getattr(x, "sharding", None)),
                        tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


class PreemptionGuard:
  """Turns SIGTERM into a flag the training loop polls (save, then exit 0)."""

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


def maybe_inject_fault(step: int) -> None:
  """Testing hook: RLHF_JAX_FAULT="STEP:SIGNAL" (e.g. "7:KILL") signals this process
  after step STEP completes. Used by the kill-and-resume tests; unset in normal runs."""
  spec = os.environ.get("RLHF_JAX_FAULT")
  if not spec:
    return
  at, sig = spec.split(":")
  if step == int(at):
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), getattr(signal, f"SIG{sig}"))


def params_equal(a, b) -> bool:
  """Bitwise equality of two parameter trees (host copies)."""
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(
      np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def read_checkpoint(directory: str, step: int | None = None):
  """(step, state as host numpy tree) of a checkpoint directory, for analysis/tests."""
  if not os.path.isdir(directory):
    raise CheckpointError(f"no checkpoint directory at {directory}")
  manager = ocp.CheckpointManager(os.path.abspath(directory),
                                  item_handlers=ocp.StandardCheckpointHandler())
  step = manager.latest_step() if step is None else step
  if step is None:
    raise CheckpointError(f"no finished checkpoint in {directory}")
  # Restore onto this process's first device whatever topology wrote it (a run on 8 devices
  # or a pod slice feeds a later run / export on another one).
  meta = manager.item_metadata(step)
  meta = getattr(meta, "tree", meta)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device),
                        meta)
  state = manager.restore(step, args=ocp.args.StandardRestore(target))
  manager.close()
  return step, jax.tree.map(np.asarray, state)
