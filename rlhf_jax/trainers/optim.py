"""The optimizer every trainer uses: AdamW with warmup-cosine schedule and clipping,
wrapped in the non-finite guard (`skip_nonfinite`)."""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


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
  """AdamW (Loshchilov & Hutter 2019) with global-norm clipping, inside the non-finite
  guard (`skip_nonfinite`); returns (tx, schedule)."""
  schedule = learning_rate_schedule(opt, num_steps)
  parts = []
  if opt.grad_clip_norm and opt.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(opt.grad_clip_norm))
  parts.append(optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                           weight_decay=opt.weight_decay, mask=_decay_mask))
  return skip_nonfinite(optax.chain(*parts)), schedule


def all_finite(grads, loss=None) -> jax.Array:
  """bool scalar: every gradient entry (and the loss, if given) is finite."""
  leaves = [jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]
  if loss is not None:
    leaves.append(jnp.all(jnp.isfinite(loss)))
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)



class GuardState(NamedTuple):
  """State of `skip_nonfinite`: the wrapped optimizer's, and the guard's counters (int32
  scalars, checkpointed with the optimizer state, so a resumed run counts on)."""
  inner: Any
  skipped_updates: jax.Array  # non-finite updates skipped in the whole run
  bad_run: jax.Array          # of them, the current run of consecutive ones


def skip_nonfinite(inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """The numerical guard as an optax wrapper (in the spirit of `optax.apply_if_finite`):
  if any gradient entry is NaN/Inf the update is zero and `inner`'s state is kept as it
  was (the parameters do not move; the training step still counts: the batch is
  skipped); the skip is counted in GuardState.skipped_updates and .bad_run (reset by the
  next finite update). Unlike apply_if_finite it never applies a non-finite update:
  `rlhf_jax.trainers.loop` stops the run after config.max_bad_steps in a row."""
  def init(params):
    zero = jnp.zeros((), jnp.int32)
    return GuardState(inner.init(params), zero, zero)

  def update(grads, state, params=None):
    finite = all_finite(grads)
    updates, inner_state = inner.update(grads, state.inner, params)
    updates = jax.tree.map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)), updates)
    inner_state = jax.tree.map(lambda n, o: jnp.where(finite, n, o), inner_state, state.inner)
    bad = jnp.logical_not(finite).astype(jnp.int32)
    return updates, GuardState(inner_state, state.skipped_updates + bad,
                               jnp.where(finite, 0, state.bad_run + 1))
  return optax.GradientTransformation(init, update)


def guard_counters(opt_state) -> tuple[int, int]:
  """(skipped_updates, bad_run) of the `skip_nonfinite` state in `opt_state` (host ints);
  (0, 0) for an optimizer without the guard."""
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, GuardState))
           if isinstance(s, GuardState)]
  if not found:
    return 0, 0
  skipped, bad_run = jax.device_get((found[0].skipped_updates, found[0].bad_run))
  return int(skipped), int(bad_run)
