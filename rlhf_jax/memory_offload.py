"""Optimizer-state offload to host memory: the AdamW moments in pinned host RAM, on the
accelerator only for the update.
"""
from __future__ import annotations


def offload_opt_state(shardings: dict) -> dict:
  """The train-state shardings with state["opt_state"] in pinned host memory.

  Pass them as the step's in/out shardings (and to `jax.device_put` the state) and
  wrap the step with `with_offloaded_opt_state`: the AdamW moments (8N bytes)
  then live in host RAM and visit the accelerator only for the update, after the
  backward pass has freed its activations, so the step's peak loses them. Costs
  a host<->device copy of the moments per step (PCIe/DMA). Same numbers, bit for
  bit. Not a config knob yet: the trainers build their state and step themselves.
  """
  return {**shardings,
          "opt_state": _with_memory_kind(shardings["opt_state"], "pinned_host")}


def with_offloaded_opt_state(step, shardings: dict):
  """step(state, *args) -> (state, metrics) whose state["opt_state"] arrives and leaves
  in host memory (`offload_opt_state(shardings)`), moved to the device inside the jit
  for the update only."""
  import jax
  on_device = _with_memory_kind(shardings["opt_state"], "device")
  on_host = _with_memory_kind(shardings["opt_state"], "pinned_host")

  def offloaded(state, *args):
    state = {**state, "opt_state": jax.device_put(state["opt_state"], on_device)}
    new_state, metrics = step(state, *args)
    return {**new_state, "opt_state": jax.device_put(new_state["opt_state"], on_host)}, metrics

  return offloaded


def _with_memory_kind(shardings, kind: str):
  import jax
  return jax.tree.map(lambda s: s.with_memory_kind(kind), shardings)
