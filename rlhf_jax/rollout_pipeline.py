"""Asynchronous rollouts and disaggregated placement for PPO and the GRPO family
(`config.rollout.max_staleness`, `config.rollout.devices`; issue #18).

Staleness. With rollout.max_staleness = k the rollout of step t (0-based: the state's step
before its update) is sampled by the policy of a fixed lag,

    rollout(t) = sample(theta_{max(0, t - k)}, prompts(t), key(seed, t))

where theta_s are the parameters at the start of step s (after s updates). The sampler is
never handed "whatever is newest": a background thread only changes *when* a rollout is
computed, not *what*, so a run is a function of (config, seed, k). At the start of step t the
trainer submits the job of step t + k with theta_t (and at the first step the jobs of the k
steps before it, all with theta_start), then waits for the rollout of step t: the sampler works
on step t+1 .. t+k while the update of step t runs. k = 0 is the synchronous loop (the trainers
keep their own code path for it, bitwise unchanged).

What is stale and what is not. Only the sampler's part is computed with the lagged
parameters: generation (and its log-probs, `Rollout.sample_logps_BC`), the reward and DAPO's
dynamic-sampling refills. The trainer then finishes the rollout with the *current* parameters
(`finish`): the old-policy log-probs pi_old (always recomputed when k > 0), the reference
log-probs, PPO's value pass (old values of the current critic) and everything derived from
them (KL penalties, advantages). pi_old / pi_sampler is the ratio that `rollout.is_correction`
corrects; with k > 0 the is/* metrics (`losses.is_correction`) are logged even when the
correction is off, and `staleness` = min(t, k) (policy versions between sampler and trainer).

Resume. A checkpoint of step s (the state before step s) cannot recompute the rollouts of
steps s .. s+k-1 (their parameters are older than the checkpoint), so they are written next
to it, WORKDIR/rollout_queue/step_<s>.npz (numpy arrays + one JSON string, no pickle; written
to a temporary name and renamed, before the orbax checkpoint of the same step; files of
steps no checkpoint keeps are removed; nothing else in that directory is touched). A resumed
run reads them back and continues bitwise. A missing file (e.g. a checkpoint of a k = 0 run)
is replaced by sampling those steps with theta_s, with a printed warning.

One process only (k > 0): with several hosts the sampler thread's collectives would
interleave with the trainer's differently on each process.

Placement. rollout.devices = n > 0: the last n devices sample (a data-parallel sub-mesh, the
parameters replicated on each), the first D - n train (config.mesh.shape applies to them);
the policy is sent to the sampler each time it samples (`jax.device_put` to the sampler's
shardings). n = 0: one mesh does both.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import re
import time
from typing import Any, Callable, NamedTuple

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from rlhf_jax import config as config_lib
from rlhf_jax import parallel, rollout as rollout_lib

QUEUE_DIR = "rollout_queue"
_QUEUE_FILE = re.compile(r"^step_(\d+)\.npz$")


class Sampled(NamedTuple):
  """The sampler's part of one step: the rollout (old_logps_BC = the sampler's log-probs,
  no reference log-probs), its rollout_stats (before any refill) and FLOPs / token counts."""
  ro: rollout_lib.Rollout
  stats: dict
  counts: dict


def staleness(config) -> int:
  return int(config.rollout.get("max_staleness", 0))


def sampler_devices(config) -> int:
  return int(config.rollout.get("devices", 0))


def enabled(config) -> bool:
  """Whether the trainers use the pipeline (k > 0 or a separate sampler sub-mesh)."""
  return staleness(config) > 0 or sampler_devices(config) > 0


def meshes(config):
  """(trainer mesh, sampler mesh or None): rollout.devices = n > 0 gives the last n devices
  to the sampler (pure data parallelism) and the others to the trainer (config.mesh.shape)."""
  devices = jax.devices()
  n = sampler_devices(config)
  if staleness(config) > 0 and jax.process_count() > 1:
    # the sampler thread's collectives would interleave with the trainer's in an order that
    # differs between processes
    raise config_lib.ConfigError(
        f"config.rollout.max_staleness={staleness(config)}: asynchronous rollouts run on one "
        f"process only ({jax.process_count()} here); use 0 on several hosts")
  if n <= 0:
    return parallel.make_mesh(config.mesh.shape), None
  return (parallel.make_mesh(config.mesh.shape, devices[:len(devices) - n]),
          parallel.make_mesh((-1, 1, 1), devices[len(devices) - n:]))


def to_sampler_fn(sampler_mesh) -> Callable:
  """params -> params on the sampler's devices (replicated there); identity when colocated."""
  if sampler_mesh is None:
    return lambda params: params
  replicated = NamedSharding(sampler_mesh, PartitionSpec())
  return lambda params: jax.device_put(params, jax.tree.map(lambda _: replicated, params))


def finish(ro: rollout_lib.Rollout, logps_fn, params, ref_params, micro: int, *,
           need_old: bool, need_ref: bool) -> rollout_lib.Rollout:
  """The trainer's part of a rollout: old-policy log-probs under the *current* `params`
  (need_old; else the sampler's stay) and reference log-probs (need_ref), as
  `rollout.generate_rollout` computes them (micro-batched, masked, float32)."""
  t0 = time.perf_counter()
  mask_f = ro.completion_mask_BC.astype(np.float32)

  def logps(p):
    out = rollout_lib.micro_batched(lambda s, g: logps_fn(p, s, g), micro, ro.sequences_BS,
                                    ro.segment_ids_BS)
    return (out * mask_f).astype(np.float32)
  old = logps(params) if need_old else ro.old_logps_BC
  ref = logps(ref_params) if need_ref else None
  timings = {**ro.timings, "logprobs": ro.timings.get("logprobs", 0.0)
             + time.perf_counter() - t0}
  return ro._replace(old_logps_BC=old, ref_logps_BC=ref, timings=timings)


def mismatch_fn(rollout_cfg):
  """f(old, sample, mask) -> (weights or None, metrics): rollout.is_correction's weights
  (`losses.is_correction.weights_fn`), or with the correction off the same is/* metrics
  (mode none) and no weights: with k > 0 the mismatch is logged either way."""
  from rlhf_jax.losses import is_correction as is_lib
  fn = is_lib.weights_fn(rollout_cfg)
  if fn is not None:
    return fn
  metrics = jax.jit(lambda o, s, m: is_lib.is_weights(o, s, m, mode="none")[1])
  return lambda o, s, m: (None, metrics(o, s, m))


# ----------------------------------------------------------------------------
# The queue: rollouts of a fixed lag, computed by one background thread
# ----------------------------------------------------------------------------

class Pipeline:
  """rollout(t, params_t) -> (Sampled of step t, its staleness): `job(sampler_params, t,
  get_batch(t)) -> Sampled` run with theta_{max(0, t - k)} (module docstring); the batch is
  read on the calling thread. k = 0: inline, no thread."""

  def __init__(self, job: Callable[[Any, int, Any], Sampled], *, k: int, start: int,
               num_steps: int, get_batch: Callable[[int], Any], to_sampler: Callable,
               workdir: str | None):
    self.job, self.k, self.start, self.num_steps = job, int(k), int(start), int(num_steps)
    self.get_batch, self.to_sampler = get_batch, to_sampler
    self.dir = os.path.join(workdir, QUEUE_DIR) if workdir else None
    self.pending: dict[int, Any] = {}  # step -> Future (or a Sampled read from a file)
    self.pool = (concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sampler")
                 if self.k > 0 else None)
    self._loaded = self._load(start) if self.k > 0 and start > 0 else {}

  def _submit(self, t: int, sampler_params) -> None:
    if t < self.num_steps and t not in self.pending:
      self.pending[t] = self.pool.submit(self.job, sampler_params, t, self.get_batch(t))

  def rollout(self, t: int, params) -> tuple[Sampled, int]:
    if self.k == 0:
      return self.job(self.to_sampler(params), t, self.get_batch(t)), 0
    sampler_params = self.to_sampler(params)  # theta_t: sent to the sampler once
    if t == self.start:  # fill: the steps before t + k, read back or sampled with theta_t
      for s in range(t, t + self.k):
        if s in self._loaded:
          self.pending[s] = self._loaded.pop(s)
        else:
          self._submit(s, sampler_params)
    self._submit(t + self.k, sampler_params)
    out = self.pending.pop(t)
    out = out.result() if isinstance(out, concurrent.futures.Future) else out
    return out, min(t, self.k)

  def next(self, t: int, params, counts: dict, finish: Callable, passes: Callable):
    """(rollout, stats) of step t for a trainer: `rollout`, then finish(ro) (the trainer's
    log-prob passes with the current parameters); the sampler's counts and passes(ro) (the
    FLOPs of those passes) are added to `counts`, `staleness` to the stats."""
    s, lag = self.rollout(t, params)
    ro = finish(s.ro)
    for name, v in s.counts.items():
      counts[name] = counts.get(name, 0) + v
    counts["flops/logprob_passes"] = counts.get("flops/logprob_passes", 0) + passes(ro)
    stats = dict(s.stats)
    if ro.ref_logps_BC is not None:  # as rollout_stats gives it (of the refilled rollout)
      m = ro.completion_mask_BC.astype(np.float32)
      stats["kl_ref_k1"] = float(((ro.old_logps_BC - ro.ref_logps_BC) * m).sum()
                                 / max(m.sum(), 1.0))
    stats["staleness"] = float(lag)
    return ro, stats

  # -- checkpointed queue ------------------------------------------------------

  def path(self, step: int) -> str:
    return os.path.join(self.dir, f"step_{step}.npz")

  def save(self, step: int, kept_steps) -> None:
    """Write the rollouts the checkpoint of `step` cannot recompute (steps step ..
    step+k-1), then remove our files of steps no checkpoint keeps (< step)."""
    if self.k == 0 or not self.dir:
      return
    todo = {t: v for t, v in self.pending.items() if step <= t < step + self.k}
    results = {t: v.result() if isinstance(v, concurrent.futures.Future) else v
               for t, v in todo.items()}
    if not results or not parallel.is_primary():  # the last step: nothing is pending
      return
    os.makedirs(self.dir, exist_ok=True)
    arrays, meta = {}, {"k": self.k, "step": step, "steps": sorted(results), "rollouts": {}}
    for t, s in results.items():
      meta["rollouts"][str(t)] = _encode(s, f"r{t}_", arrays)
    arrays["meta"] = np.asarray(json.dumps(meta))
    tmp = self.path(step) + ".tmp.npz"
    with open(tmp, "wb") as f:
      np.savez(f, **arrays)
    os.replace(tmp, self.path(step))
    keep = set(kept_steps) | {step}
    for name in os.listdir(self.dir):
      m = _QUEUE_FILE.match(name)
      if m and int(m.group(1)) < step and int(m.group(1)) not in keep:
        os.remove(os.path.join(self.dir, name))

  def _load(self, step: int) -> dict[int, Sampled]:
    want = list(range(step, min(step + self.k, self.num_steps)))
    path = self.path(step) if self.dir else None
    if not want:
      return {}
    if not path or not os.path.exists(path):
      _warn(f"{path}: missing; the rollouts of steps {want} are sampled again with the "
            f"parameters of step {step} (not the run an uninterrupted one would give)")
      return {}
    with np.load(path, allow_pickle=False) as z:
      meta = json.loads(str(z["meta"]))
      out = {int(t): _decode(spec, z) for t, spec in meta["rollouts"].items()}
    if meta["k"] != self.k:
      _warn(f"{path} was written with rollout.max_staleness={meta['k']}, this run has "
            f"{self.k}; its rollouts are used as far as they go")
    missing = [t for t in want if t not in out]
    if missing:
      _warn(f"{path} lacks the rollouts of steps {missing}; they are sampled with the "
            f"parameters of step {step}")
    return {t: v for t, v in out.items() if t in want}

  def checkpointer(self, inner):
    """`inner` (a `checkpoint.Checkpointer`) that writes the queue before each checkpoint."""
    return _QueueCheckpointer(inner, self) if self.k > 0 else inner

  def close(self) -> None:
    if self.pool is not None:
      self.pool.shutdown(wait=True, cancel_futures=True)


@contextlib.contextmanager
def closing(pipeline: Pipeline | None):
  """Stop the sampler thread when the run ends (also on an error); None: nothing."""
  try:
    yield pipeline
  finally:
    if pipeline is not None:
      pipeline.close()


class _QueueCheckpointer:
  def __init__(self, inner, pipeline: Pipeline):
    self._inner, self._pipeline = inner, pipeline

  def maybe_save(self, step: int, state, force: bool = False) -> bool:
    every = self._inner.save_every
    if (force or (every > 0 and step % every == 0)) and step not in self._inner.all_steps():
      self._pipeline.save(step, self._inner.all_steps())
    return self._inner.maybe_save(step, state, force)

  def __getattr__(self, name):
    return getattr(self._inner, name)


def _warn(msg: str) -> None:
  if parallel.is_primary():
    print(f"warning: rollout queue: {msg}", flush=True)


_ARRAYS = ("sequences_BS", "segment_ids_BS", "completion_mask_BC", "sample_logps_BC",
           "old_logps_BC", "rewards_B", "lengths_B", "finished_B")


def _encode(s: Sampled, prefix: str, arrays: dict) -> dict:
  """Sampled -> JSON-able spec; its arrays go into `arrays` under `prefix` names. Floats in
  JSON round-trip exactly (repr)."""
  ro = s.ro
  for name in _ARRAYS:
    arrays[prefix + name] = np.asarray(getattr(ro, name))
  parts = sorted(ro.reward_parts)
  for i, k in enumerate(parts):
    arrays[f"{prefix}part{i}"] = np.asarray(ro.reward_parts[k])
  if ro.ref_logps_BC is not None:
    arrays[prefix + "ref_logps_BC"] = np.asarray(ro.ref_logps_BC)
  return {"prefix": prefix, "parts": parts, "prompt_len": int(ro.prompt_len),
          "texts": list(ro.texts), "timings": {k: float(v) for k, v in ro.timings.items()},
          "ref": ro.ref_logps_BC is not None,
          "stats": {k: float(v) for k, v in s.stats.items()},
          "counts": {k: int(v) for k, v in s.counts.items()}}


def _decode(spec: dict, z) -> Sampled:
  p = spec["prefix"]
  fields = {name: z[p + name] for name in _ARRAYS}
  ro = rollout_lib.Rollout(
      **fields, ref_logps_BC=z[p + "ref_logps_BC"] if spec["ref"] else None,
      reward_parts={k: z[f"{p}part{i}"] for i, k in enumerate(spec["parts"])},
      prompt_len=spec["prompt_len"], texts=spec["texts"], timings=spec["timings"])
  return Sampled(ro, spec["stats"], spec["counts"])
