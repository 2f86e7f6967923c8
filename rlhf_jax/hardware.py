"""The hardware presets: accelerator slices as JAX sees them (`HARDWARE`).

A size preset (`rlhf_jax.presets.apply`) plans its mesh for one of these; the value of
`config.hardware` ("auto" or one of these names) decides what a run does when the
devices present are not the planned ones (`rlhf_jax.config.resolve_mesh`), and
`rlhf_jax.memory_plan.fits` checks a config against one's HBM.
"""
from __future__ import annotations

import dataclasses

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Hardware:
  """An accelerator slice as JAX sees it: `devices` jax.devices() of `hbm_bytes` each."""
  name: str
  devices: int
  hbm_bytes: int
  hosts: int
  mesh: tuple[int, int, int]   # default (data, fsdp, tensor) for models that need sharding
  note: str
  platform: str = "tpu"        # jax.default_backend() there: which attention "auto" picks


# Default meshes: FSDP over every device. AdamW training keeps 16 bytes per parameter
# (fp32 params, grads, mu, nu); sharding them over fsdp (ZeRO-3) divides that by the
# device count at the price of one all-gather (forward and backward) and one
# reduce-scatter per layer, which fast intra-slice links (TPU ICI, NVLink) hide behind
# the matmuls at these sizes. Tensor parallelism stays 1: models up to 8B fit without
# it, and batch sharding over more devices is cheaper than splitting every matmul.
HARDWARE: dict[str, Hardware] = {
    "v5e-8": Hardware(
        "v5e-8", devices=8, hbm_bytes=16 * GiB, hosts=1, mesh=(1, 8, 1),
        note="8 TPU v5e chips (1 host, 16 GiB HBM each): FSDP over all 8; replicated "
             "AdamW state would cap the model at ~0.5B params"),
    "v5p-32": Hardware(
        "v5p-32", devices=16, hbm_bytes=95 * GiB, hosts=4, mesh=(1, 16, 1),
        note="16 TPU v5p chips = 32 TensorCores (JAX sees one device per chip, megacore), "
             "4 hosts, one ICI slice, 95 GiB HBM each: FSDP over all 16"),
    "8xH100": Hardware(
        "8xH100", devices=8, hbm_bytes=80 * GiB, hosts=1, mesh=(1, 8, 1),
        note="8 NVIDIA H100 80GB on NVLink (1 host): FSDP over all 8", platform="gpu"),
}


def replan(shape, planned: str, target: str) -> tuple[int, int, int]:
  """A size preset's mesh `shape` planned for hardware `planned`, planned again for
  `target`: pure data parallelism over all of target's devices when the plan was (a
  `Size.data_parallel` model), else target's default mesh (`rlhf_jax.presets.mesh_for`)."""
  if tuple(shape) == (HARDWARE[planned].devices, 1, 1):
    return (HARDWARE[target].devices, 1, 1)
  return HARDWARE[target].mesh
