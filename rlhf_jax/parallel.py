"""Device mesh and sharding rules: the one place that maps logical axes to devices.

Parameters carry logical axis names (set in `rlhf_jax.models`), e.g. a query
projection kernel is ("layers", "embed", "heads", "head_dim"). `LOGICAL_RULES`
maps each logical name onto mesh axes of one `jax.sharding.Mesh` with axes

    data    pure data parallelism (parameters replicated)
    fsdp    data parallelism with parameters/optimizer state sharded (ZeRO-3)
    tensor  tensor (model) parallelism over heads / MLP width / vocabulary

Batches are sharded over ("data", "fsdp"). The same code runs on one CPU,
8 simulated CPU devices, a GPU or a TPU pod slice.

Multi-host (several processes, JAX's multi-controller runtime): every process
runs the same program; `initialize_distributed` connects them before anything
touches a device, the mesh spans all processes' devices (`jax.devices()`), and
each process builds only the rows of a global batch that its own devices hold
(`shard_batch` -> `jax.make_array_from_process_local_data`). Files shared by
all processes (workdir, tokenizer, data caches) are written by process 0
(`primary_first`, `is_primary`); orbax writes checkpoints collectively.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")


# ----------------------------------------------------------------------------
# Multi-host
# ----------------------------------------------------------------------------

def initialize_distributed(dcfg) -> bool:
  """Connect this process to the others (config.distributed); returns whether it did.

  Call before anything touches a device. Explicit settings come from the config,
  else from $RLHF_JAX_COORDINATOR_ADDRESS / $RLHF_JAX_NUM_PROCESSES /
  $RLHF_JAX_PROCESS_ID, else JAX auto-detects them (Cloud TPU VMs, SLURM, Open MPI).
  `cpu_collectives="gloo"` enables cross-process collectives on CPU (how the tests
  run two processes on one machine).
  """
  if not dcfg.enabled:
    return False
  from jax._src import distributed as _dist  # is_initialized() is not public
  if _dist.global_state.client is not None:
    return True
  env = os.environ.get
  address = dcfg.coordinator_address or env("RLHF_JAX_COORDINATOR_ADDRESS") or None
  num = int(dcfg.num_processes or env("RLHF_JAX_NUM_PROCESSES") or 0) or None
  pid = int(dcfg.process_id) if int(dcfg.process_id) >= 0 else (
      int(env("RLHF_JAX_PROCESS_ID")) if env("RLHF_JAX_PROCESS_ID") else None)
  if address and (num is None or pid is None):
    raise ValueError("config.distributed.coordinator_address is set, so "
                     "distributed.num_processes and distributed.process_id (or "
                     "$RLHF_JAX_NUM_PROCESSES / $RLHF_JAX_PROCESS_ID) must be set too")
  if num is not None and pid is not None and not 0 <= pid < num:
    raise ValueError(f"config.distributed.process_id={pid} must be in [0, num_processes={num})")
  if dcfg.cpu_collectives:
    jax.config.update("jax_cpu_collectives_implementation", dcfg.cpu_collectives)
  jax.distributed.initialize(coordinator_address=address, num_processes=num, process_id=pid)
  return True


def is_primary() -> bool:
  """Whether this is process 0, the one that writes shared files and metrics."""
  return jax.process_index() == 0


def sync(name: str) -> None:
  """Barrier over all processes (no-op with one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


@contextlib.contextmanager
def primary_first(name: str):
  """Process 0 runs the block first (creating shared files: data caches, tokenizer),
  then the others run it (finding the files there). No-op with one process."""
  if not is_primary():
    sync(name)
  yield
  if is_primary():
    sync(name)


def to_host(x) -> np.ndarray:
  """numpy value of a (possibly multi-process, sharded) array, on every process."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)

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
    ("cache_seq", None),
)

# Logical axes of one KV-cache array (k or v), [layers, batch, slots, kv heads, head_dim]
# (`models.transformer.init_cache`): rows over ("data", "fsdp") like every batch, kv heads
# over "tensor" like the k/v projections that fill them, slots and head_dim whole.
KV_CACHE_AXES = ("layers", "batch", "cache_seq", "kv_heads", "head_dim")


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
      raise ValueError(f"mesh.shape={shape}: the {num_devices} available device(s) are not "
                       f"divisible by {known}")
    shape[shape.index(-1)] = num_devices // known
  if math.prod(shape) != num_devices:
    raise ValueError(f"mesh.shape={shape} needs {math.prod(shape)} devices, "
                     f"but {num_devices} device(s) are available")
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


def fitted_spec(mesh: Mesh, logical_axes: Sequence[str | None], shape: Sequence[int],
                rules=LOGICAL_RULES) -> P:
  """The PartitionSpec of an array of `shape` with `logical_axes`, each dimension split
  only as far as its size allows: a dimension mapped to mesh axes (a0, a1, ...) keeps the
  longest prefix whose device count divides its size (the rest replicated), e.g. 2 cache
  rows on ("data", "fsdp") = (2, 2) are split over "data" only."""
  if len(logical_axes) != len(shape):
    raise ValueError(f"logical axes {tuple(logical_axes)} do not match shape {tuple(shape)}")
  spec = nn.logical_to_mesh_axes(tuple(logical_axes), list(rules))
  out = []
  for axes, size in zip(tuple(spec) + (None,) * (len(shape) - len(spec)), shape):
    names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    keep = []
    for name in names:
      if size % (math.prod(mesh.shape[a] for a in keep) * mesh.shape[name]):
        break
      keep.append(name)
    out.append(None if not keep else keep[0] if len(keep) == 1 else tuple(keep))
  return P(*out)


def kv_cache_sharding(mesh: Mesh, shape: Sequence[int], rules=LOGICAL_RULES) -> NamedSharding:
  """Sharding of one KV-cache array [L, B, S, K, Dh] (`KV_CACHE_AXES`) on `mesh`: rows
  over ("data", "fsdp"), kv heads over "tensor", each as far as the sizes divide
  (`fitted_spec`)."""
  return NamedSharding(mesh, fitted_spec(mesh, KV_CACHE_AXES, shape, rules))


def mesh_of(tree) -> Mesh | None:
  """The mesh the arrays of `tree` live on: that of its first leaf placed with a
  NamedSharding on more than one device; None when there is none (host arrays,
  tracers, a single device)."""
  for leaf in jax.tree.leaves(tree):
    if not isinstance(leaf, jax.Array) or isinstance(leaf, jax.core.Tracer):
      continue
    sharding = leaf.sharding
    if isinstance(sharding, NamedSharding) and isinstance(sharding.mesh, Mesh) and (
        sharding.mesh.size > 1):
      return sharding.mesh
  return None


def local_rows(global_rows: int, mesh: Mesh) -> np.ndarray:
  """Indices of the rows of a [global_rows, ...] batch that this process's devices hold
  under `batch_sharding(mesh)`, in order (all rows with one process)."""
  idx = batch_sharding(mesh).addressable_devices_indices_map((global_rows,))
  starts = sorted({(s[0].start or 0, s[0].stop or global_rows) for s in idx.values()})
  return np.concatenate([np.arange(a, b) for a, b in starts])


def shard_batch(batch: dict, mesh: Mesh) -> dict:
  """Place a host batch (dict of numpy arrays, batch-major, the GLOBAL batch) on the mesh.

  With several processes each one passes only its own rows (`local_rows`) to
  `jax.make_array_from_process_local_data`; the arrays are global either way.
  """
  batch_size = mesh.shape["data"] * mesh.shape["fsdp"]
  sharding = batch_sharding(mesh)
  out = {}
  for k, v in batch.items():
    v = np.asarray(v)
    if v.shape[0] % batch_size:
      raise ValueError(f"batch[{k!r}] has leading size {v.shape[0]}, not divisible by "
                       f"data*fsdp = {batch_size} devices")
    if jax.process_count() == 1:
      out[k] = jax.device_put(v, sharding)
    else:
      rows = local_rows(v.shape[0], mesh)
      out[k] = jax.make_array_from_process_local_data(sharding, v[rows], v.shape)
  return out
