"""The optimizer every trainer uses: AdamW with warmup-cosine schedule and clipping."""
from __future__ import annotations

from typing import Any

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
  """AdamW (Loshchilov & Hutter 2019) with global-norm clipping; returns (tx, schedule)."""
  schedule = learning_rate_schedule(opt, num_steps)
  parts = []
  if opt.grad_clip_norm and opt.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(opt.grad_clip_norm))
  parts.append(optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                           weight_decay=opt.weight_decay, mask=_decay_mask))
  return optax.chain(*parts), schedule


def all_finite(grads, loss=None) -> jax.Array:
  """bool scalar: every gradient entry (and the loss, if given) is finite."""
  leaves = [jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]
  if loss is not None:
    leaves.append(jnp.all(jnp.isfinite(loss)))
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)

