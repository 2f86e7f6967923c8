"""Fault and NaN injection for the reliability tests and experiments/reliability: wrappers
installed around the normal code, never on its path (a normal run imports nothing here).

`python -m rlhf_jax.faults ARGS` is `python -m rlhf_jax.launch ARGS` (e.g. `train
--config=... --workdir=...`) with the injections its environment asks for installed first:

  RLHF_JAX_FAULT="STEP:SIGNAL"       send SIGNAL (KILL, TERM, ...) to this process after
                                     training step STEP completes (and its checkpoint, if
                                     any, is written)
  RLHF_JAX_FAULT="STEP:SIGNAL:save"  ... *while* the checkpoint of step STEP is being written:
                                     as soon as orbax has begun writing tensor data into
                                     STEP.orbax-checkpoint-tmp, before the commit (rename)
  RLHF_JAX_NAN_STEPS="3,7"           the loss of training steps 3 and 7 (the loop's
                                     numbering: state["step"] + 1 for every trainer) is
                                     multiplied by NaN, so every gradient is NaN and the
                                     update must be skipped by the non-finite guard

In-process (tests): `undo = install(fault="7:TERM", nan_steps=(3, 7))`, then `undo()`.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time

FAULT_ENV = "RLHF_JAX_FAULT"
NAN_STEPS_ENV = "RLHF_JAX_NAN_STEPS"


def parse_fault(spec: str) -> tuple[int, str, str]:
  """"STEP:SIGNAL[:save]" -> (step, signal name, "after_step" or "save")."""
  at, sig, *where = spec.split(":")
  where = where[0] if where else "after_step"
  if where not in ("after_step", "save") or not hasattr(signal, f"SIG{sig}"):
    raise ValueError(f"{FAULT_ENV}={spec!r}: expected STEP:SIGNAL or STEP:SIGNAL:save, e.g. 7:KILL")
  return int(at), sig, where


def _signal_self(sig: str) -> None:
  sys.stdout.flush()
  sys.stderr.flush()
  os.kill(os.getpid(), getattr(signal, f"SIG{sig}"))


def _kill_when_writing(directory: str, step: int, sig: str) -> threading.Thread:
  """A thread that sends `sig` to this process as soon as orbax has begun writing tensor
  data into STEP.orbax-checkpoint-tmp (mid-write); if the write finishes first (it never
  did in our runs) the signal follows it."""
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
    _signal_self(sig)

  t = threading.Thread(target=watch, daemon=True)
  t.start()
  return t


def _faulty_maybe_save(maybe_save, fault):
  """Checkpointer.maybe_save with `fault` = (step, signal, where) injected."""
  at, sig, where = fault
  fired = []

  def wrapped(self, step, *args, **kwargs):
    if where == "save" and step == at:
      manager_save = self._manager.save

      def save_and_die(*a, **kw):  # only when maybe_save really writes this step
        killer = _kill_when_writing(self.directory, step, sig)
        saved = manager_save(*a, **kw)
        killer.join()  # the signal arrives once the write is under way
        return saved
      self._manager.save = save_and_die
      try:
        return maybe_save(self, step, *args, **kwargs)
      finally:
        del self._manager.save
    saved = maybe_save(self, step, *args, **kwargs)
    if where == "after_step" and step == at and not fired:
      fired.append(step)
      _signal_self(sig)
    return saved
  return wrapped


def _nan_make_step(make_step, steps):
  """step_lib.make_step whose loss is multiplied by NaN at training steps `steps`."""
  import jax.numpy as jnp

  def make(loss_fn, tx, *args, **kwargs):
    factor = {}

    def poisoned(params, *a):
      value, metrics = loss_fn(params, *a)
      return value * factor["x"], metrics
    update = make_step(poisoned, tx, *args, **kwargs)

    def step(state, *a):
      bad = jnp.any(state["step"] + 1 == jnp.asarray(steps, jnp.int32))
      factor["x"] = jnp.where(bad, jnp.float32(jnp.nan), jnp.float32(1.0))
      return update(state, *a)
    return step
  return make


def install(fault: str | None = None, nan_steps=()) -> callable:
  """Install the injections (see the module doc); returns a function that removes them.
  Must run before the trainer builds its step (NaN) / opens its checkpointer (fault)."""
  from rlhf_jax import checkpoint as ckpt_lib
  from rlhf_jax.trainers import step as step_lib
  undo = []
  if fault:
    original = ckpt_lib.Checkpointer.maybe_save
    ckpt_lib.Checkpointer.maybe_save = _faulty_maybe_save(original, parse_fault(fault))
    undo.append(lambda: setattr(ckpt_lib.Checkpointer, "maybe_save", original))
  steps = [int(s) for s in nan_steps]
  if steps:
    original_make = step_lib.make_step
    step_lib.make_step = _nan_make_step(original_make, steps)
    undo.append(lambda: setattr(step_lib, "make_step", original_make))
  return lambda: [u() for u in reversed(undo)] and None


def install_from_env() -> callable:
  """`install` with RLHF_JAX_FAULT / RLHF_JAX_NAN_STEPS of the environment."""
  spec = os.environ.get(NAN_STEPS_ENV, "")
  return install(os.environ.get(FAULT_ENV) or None,
                 [s for s in spec.split(",") if s.strip()])


if __name__ == "__main__":
  from rlhf_jax import launch
  install_from_env()
  launch.cli()
