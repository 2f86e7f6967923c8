"""Device mesh and sharding rules: the one place that maps logical axes to devices.

Parameters carry logical axis names (set in `rlhf_jax.models`), e.g. a query
projection kernel is ("layers", "embed", "heads", "head_dim"). `LOGICAL_RULES`
maps each logical name onto mesh axes of one `jax.sharding.Mesh` with axes

    data    pure data parallelism (parameters replicated)
    fsdp    data parallelism with parameters/optimizer state sharded (ZeRO-3)
    tensor  tensor (model) parallelism over heads / MLP width / vocabulary

Batches are sharded over ("data", "fsdp"). The same code runs on one CPU,
8 simulated CPU devices, a GPU or a TPU pod slice.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis name -> mesh axis (or tuple of mesh axes, or None = replicated)
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
)


def mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, int, int]:
  """Resolve a (data, fsdp, tensor) shape where at most one entry is -1 (= fill)."""
  shape = [int(s) for s in shape]
  if len(shape) != 3:
    raise ValueError(f"mesh.shape must have 3 entries (data, fsdp, tensor), got {shape}")
  if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"mesh.shape={shape}: entries must be positive, with at most one -1")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise ValueError(f"mesh.shape={shape}: {num_devices} devices not divisible by {known}")
    shape[shape.index(-1)] = num_devices // known
  if math.prod(shape) != num_devices:
    raise ValueError(f"mesh.shape={shape} needs {math.prod(shape)} devices, "
                     f"but {num_devices} are available")
  return tuple(shape)


def make_mesh(shape: Sequence[int] = (-1, 1, 1), devices=None) -> Mesh:
  """A Mesh with axes ("data", "fsdp", "tensor")."""
  devices = list(jax.devices() if devices is None else devices)
  resolved = mesh_shape(shape, len(devices))
  return Mesh(np.asarray(devices).reshape(resolved), MESH_AXES)


def logical_to_sharding(logical_specs, mesh: Mesh, rules=LOGICAL_RULES):
  """Tree of logical PartitionSpecs -> tree of NamedShardings on `mesh`."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, list(rules))


def boxed_shardings(init_fn: Callable[[], Any], mesh: Mesh, rules=LOGICAL_RULES):
  """Shardings for the (boxed) pytree that `init_fn()` returns, without running it.

  Leaves created under `nn.with_logical_partitioning` (parameters, and optax
  states derived from boxed parameters) are sharded by their names; all other
  leaves (step counters, scalars) are replicated.
  """
  abstract = jax.eval_shape(init_fn)
  specs = nn.get_partition_spec(abstract)
  return logical_to_sharding(specs, mesh, rules)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Shard the leading (batch) dimension over data x fsdp; the rest replicated.

  One sharding fits every batch array of rank >= 1 (tokens [B, T], margins [B]).
  """
  return NamedSharding(mesh, P(("data", "fsdp")))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def shard_batch(batch: dict, mesh: Mesh) -> dict:
  """Place a host batch (dict of numpy arrays, batch-major) on the mesh."""
  batch_size = mesh.shape["data"] * mesh.shape["fsdp"]
  out = {}
  for k, v in batch.items():
    v = np.asarray(v)
    if v.shape[0] % batch_size:
      raise ValueError(f"batch[{k!r}] has leading size {v.shape[0]}, not divisible by "
                       f"data*fsdp = {batch_size} devices")
    out[k] = jax.device_put(v, batch_sharding(mesh))
  return out
