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
optimizer state, step, and what a trainer adds: the PPO KL controller, LoRA dropout
key) plus the training loop's host counters ("loop": skipped updates, the current run
of non-finite steps). Everything else a resumed run needs is a function of
(config, seed, step): the data order (batch i = batched(data, seed)[i]), the sampling
and dropout keys (fold_in(key, step)), the minibatch permutations, the reference
log-prob cache (recomputed bit for bit if missing). So a run killed at any point and
resumed gives the same parameters and metrics.jsonl as an uninterrupted one.

SIGTERM (what cloud schedulers send before preemption) sets a flag; the trainer
saves a checkpoint at the end of the current step and `rlhf-jax train` exits with
`rlhf_jax.EXIT_PREEMPTED` (75), which launchers read as "re-queue me".
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

LOOP = "loop"  # the checkpoint's entry for the training loop's host counters


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
    self.restored_loop: dict[str, int] = {}  # the loop counters of the restored checkpoint

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def maybe_save(self, step: int, state: Any, force: bool = False,
                 loop: dict[str, int] | None = None) -> bool:
    """Save if `step` is on the save interval (or `force`); returns whether it saved.
    `loop`: the training loop's host counters {name: int}, saved beside the state and
    given back by `restore` as `restored_loop`."""
    if not force and (self.save_every <= 0 or step % self.save_every):
      return False
    if step in self._manager.all_steps():
      return False
    item = state if not loop else {**state, LOOP: {k: np.asarray(v, np.int32)
                                                   for k, v in loop.items()}}
    killer = _kill_during_save(self.directory, step)
    saved = bool(self._manager.save(step, args=ocp.args.StandardSave(item), force=True))
    if killer is not None:
      killer.join()  # SIGKILLs this process once the write is under way
    return saved

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[int, Any] | None:
    """Restore `step` (default latest) into the structure/shardings of `abstract_state`.

    abstract_state: pytree of jax.ShapeDtypeStruct (with .sharding). Returns
    (step, state) or None when there is no checkpoint.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      return None
    target = dict(abstract_state)
    saved_loop = self._saved_loop_keys(step)  # none in checkpoints written before it existed
    if saved_loop:
      target[LOOP] = {k: jax.ShapeDtypeStruct((), np.int32, sharding=_replicated_like(target))
                      for k in saved_loop}
    self.check_compatible(step, target)
    try:
      state = self._manager.restore(step, args=ocp.args.StandardRestore(target))
    except Exception as e:  # orbax raises many types; name the checkpoint in one message
      raise CheckpointError(f"cannot restore checkpoint {self.directory}/{step}: "
                            f"{type(e).__name__}: {str(e).splitlines()[0][:500]}") from None
    loop = state.pop(LOOP, {})
    self.restored_loop = {k: int(np.asarray(v.addressable_data(0))) for k, v in loop.items()}
    return step, state

  def _saved_loop_keys(self, step: int) -> list[str]:
    try:
      meta = self._manager.item_metadata(step)
    except Exception:  # unreadable: check_compatible reports it
      return []
    meta = getattr(meta, "tree", meta)
    loop = meta.get(LOOP) if hasattr(meta, "get") else None
    return sorted(loop) if hasattr(loop, "keys") else []

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


def _replicated_like(abstract_state):
  """A sharding for scalars restored beside `abstract_state`: replicated on its mesh."""
  for leaf in jax.tree.leaves(abstract_state):
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding):
      return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    if sharding is not None:
      return sharding
  return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


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


def _fault() -> tuple[int, str, str] | None:
  """RLHF_JAX_FAULT="STEP:SIGNAL[:save]" parsed as (step, signal name, where)."""
  spec = os.environ.get("RLHF_JAX_FAULT")
  if not spec:
    return None
  at, sig, *where = spec.split(":")
  return int(at), sig, (where[0] if where else "after_step")


def _signal_self(sig: str) -> None:
  sys.stdout.flush()
  sys.stderr.flush()
  os.kill(os.getpid(), getattr(signal, f"SIG{sig}"))


def maybe_inject_fault(step: int) -> None:
  """Testing hook: RLHF_JAX_FAULT="STEP:SIGNAL" (e.g. "7:KILL") signals this process
  after step STEP completes (and its checkpoint, if any, is written); "STEP:KILL:save"
  kills it *while* the checkpoint of step STEP is being written (`Checkpointer.maybe_save`).
  Used by the kill-and-resume tests and experiments/reliability; unset in normal runs."""
  fault = _fault()
  if fault and fault[2] == "after_step" and step == fault[0]:
    _signal_self(fault[1])


def _kill_during_save(directory: str, step: int) -> threading.Thread | None:
  """With RLHF_JAX_FAULT="STEP:SIGNAL:save" and `step` == STEP: a thread that sends SIGNAL
  to this process as soon as orbax has begun writing tensor data into the checkpoint's
  temporary directory (STEP.orbax-checkpoint-tmp), i.e. mid-write, before the commit
  (rename). If the write finishes first (it never did in our runs) the signal follows it."""
  fault = _fault()
  if not fault or fault[2] != "save" or fault[0] != step:
    return None
  tmp = os.path.join(directory, f"{step}.orbax-checkpoint-tmp")

  def writing() -> bool:
    for root, _, files in os.walk(tmp):
      if files and os.path.basename(root) == "d":  # ocdbt data files: tensors being written
        return True
    return False

  def watch():
    t0 = time.monotonic()
    while not writing() and not os.path.isdir(os.path.join(directory, str(step))):
      if time.monotonic() - t0 > 60:
        break
      time.sleep(0.0005)
    _signal_self(fault[1])

  t = threading.Thread(target=watch, daemon=True)
  t.start()
  return t


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
