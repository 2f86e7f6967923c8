"""Array helpers every loss shares (one place each): float32 casting, number and shape
checks, masked and weighted means."""
from __future__ import annotations

import numbers

import jax.numpy as jnp


def f32(x):
  return jnp.asarray(x, jnp.float32)


def is_number(x):
  """A real Python/numpy number (bools excluded); traced values are not numbers."""
  return isinstance(x, numbers.Real) and not isinstance(x, bool)


def check_shapes(**arrays):
  """ValueError unless the given (non-None) arrays are [B, T] of one shape."""
  shapes = {k: tuple(v.shape) for k, v in arrays.items() if v is not None}
  if len(set(shapes.values())) != 1 or len(next(iter(shapes.values()))) != 2:
    raise ValueError(f"expected [B, T] arrays of one shape, got {shapes}")


def masked_mean(x, mask, axis=None):
  """sum(x * mask) / max(sum(mask), 1) over `axis` (all axes by default)."""
  mask = mask.astype(jnp.float32)
  return jnp.sum(x * mask, axis=axis) / jnp.maximum(jnp.sum(mask, axis=axis), 1.0)


def weighted_mean(x_B, weights_B=None):
  """sum_b w_b x_b / sum_b w_b (plain mean when weights_B is None; 0 if all weights are 0).

  Rows with weight 0 are ignored (padding rows of a partial batch): they get
  zero gradient and even a NaN/inf value there does not reach the result
  (gradients stay finite as long as the ignored inputs are finite).
  """
  x_B = x_B.astype(jnp.float32)
  if weights_B is None:
    return jnp.mean(x_B)
  w_B = weights_B.astype(jnp.float32)
  total = jnp.sum(w_B)
  safe_total = jnp.where(total > 0, total, 1.0)
  # where() rather than x * w so a NaN/inf in an ignored row cannot leak in.
  return jnp.sum(jnp.where(w_B > 0, x_B * w_B, 0.0)) / safe_total
