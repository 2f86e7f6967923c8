"""Reward-model loss: Bradley–Terry pairwise preference likelihood."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.losses.arrays import weighted_mean  # noqa: F401 (re-exported)


def pairwise_accuracy(chosen_B, rejected_B, weights_B=None):
  """Fraction of rows with chosen > rejected; ties count 0.5."""
  hit_B = jnp.where(chosen_B > rejected_B, 1.0, jnp.where(chosen_B == rejected_B, 0.5, 0.0))
  return weighted_mean(hit_B, weights_B)


def bradley_terry_loss(r_chosen_B, r_rejected_B, margin_B=None, center_coef=0.0, weights_B=None):
  """Pairwise reward-model loss with optional margin and reward centring: (loss, metrics).

      L = mean_b[ -log sigmoid(r_c - r_r - m) ] + eta * mean_b[ (r_c + r_r)^2 ]

  - Bradley & Terry (1952), as used for RLHF reward models by Ouyang et al.
    (2022, InstructGPT): P(y_c > y_r) = sigmoid(r_c - r_r).
  - m = margin_B (default 0): the preference-strength margin of Touvron et al.
    (2023, Llama 2); the pair must be separated by at least m.
  - eta = center_coef: the centring auxiliary loss of Eisenstein et al. (2023,
    "Helping or Herding?"), which pins the otherwise free reward offset near 0
    (they use 0.01).

  -log sigmoid is computed as -log_sigmoid (stable for any magnitude). All
  means are over batch rows, weighted by weights_B if given (weight 0 = padding
  row, ignored). Metrics (float32 scalars): loss, bt_loss, center_loss,
  accuracy (r_c > r_r, ties count 0.5; the margin is not used here), margin
  (mean r_c - r_r), chosen_reward, rejected_reward.
  """
  r_c = r_chosen_B.astype(jnp.float32)
  r_r = r_rejected_B.astype(jnp.float32)
  diff_B = r_c - r_r
  logit_B = diff_B if margin_B is None else diff_B - margin_B.astype(jnp.float32)
  bt_loss = weighted_mean(-jax.nn.log_sigmoid(logit_B), weights_B)
  center_loss = weighted_mean(jnp.square(r_c + r_r), weights_B)
  loss = bt_loss + center_coef * center_loss
  metrics = {
      "loss": loss,
      "bt_loss": bt_loss,
      "center_loss": center_loss,
      "accuracy": pairwise_accuracy(r_c, r_r, weights_B),
      "margin": weighted_mean(diff_B, weights_B),
      "chosen_reward": weighted_mean(r_c, weights_B),
      "rejected_reward": weighted_mean(r_r, weights_B),
  }
  return loss, metrics
