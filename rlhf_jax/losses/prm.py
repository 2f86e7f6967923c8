"""Process-reward-model loss: per-step binary cross-entropy at step-end tokens.

A PRM (Uesato et al. 2022, "Solving math word problems with process- and
outcome-based feedback"; Lightman et al. 2023, "Let's Verify Step by Step")
predicts, at the last token of every solution step, whether the step is correct.
With z_bt the scalar head's logit at token t of row b, m_bt = 1 at labelled
step ends (0 elsewhere, padding included), y_bt in {0, 1} the step label and
w_bt = m_bt * (y_bt + negative_weight * (1 - y_bt)):

    L = sum_bt w_bt * [ -y_bt log sigmoid(z_bt) - (1 - y_bt) log sigmoid(-z_bt) ]
        / sum_bt w_bt                                      (0 when there are no steps)

p(correct) = sigmoid(z). negative_weight > 1 up-weights wrong steps (they are the
minority: one per corrupted solution under the first-error convention).
Metrics: loss, step_accuracy (fraction of masked steps with (z > 0) == y,
unweighted), accuracy_correct / accuracy_wrong (the same within each class, 0 when
the class is absent), num_steps, positive_frac.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _ratio(num, den):
  return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


def prm_step_loss(logits_BT, step_mask_BT, step_labels_BT, negative_weight: float = 1.0):
  """(loss, metrics) of the formula in the module docstring; float32 throughout."""
  z = logits_BT.astype(jnp.float32)
  m = (step_mask_BT != 0).astype(jnp.float32)
  y = (step_labels_BT != 0).astype(jnp.float32)
  # where() so a NaN/inf logit at an unmasked position cannot reach the loss.
  nll = jnp.where(m > 0, -(y * jax.nn.log_sigmoid(z) + (1 - y) * jax.nn.log_sigmoid(-z)), 0.0)
  w = m * (y + negative_weight * (1 - y))
  loss = _ratio(jnp.sum(w * nll), jnp.sum(w))
  hit = ((z > 0).astype(jnp.float32) == y).astype(jnp.float32) * m
  n = jnp.sum(m)
  n_pos, n_neg = jnp.sum(m * y), jnp.sum(m * (1 - y))
  metrics = {
      "loss": loss,
      "step_accuracy": _ratio(jnp.sum(hit), n),
      "accuracy_correct": _ratio(jnp.sum(hit * y), n_pos),
      "accuracy_wrong": _ratio(jnp.sum(hit * (1 - y)), n_neg),
      "num_steps": n,
      "positive_frac": _ratio(n_pos, n),
  }
  return loss, metrics
