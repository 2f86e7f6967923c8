"""Sampler-mismatch (off-policy) importance-sampling correction (`config.rollout.is_correction`).

The tokens of a rollout are drawn from the sampler pi_s (KV-cache decoding: other kernels,
batch shapes, precision, or an older policy), while the loss treats them as samples of pi_old,
the trainer's own recomputation of the same policy's log-probs (`Rollout.old_logps_BC`;
`Rollout.sample_logps_BC` are the sampler's). The per-token PPO / GRPO surrogate l_t is
multiplied by a constant weight w_t built from the importance ratio of the two:

    log rho_t = log pi_old(y_t) - log pi_s(y_t)                      (token level)
    log rho   = sum_t log rho_t  = log [pi_old(y) / pi_s(y)]        (sequence level: the
                                   whole completion's ratio, every token of the row gets it)

    tis  w = min(rho, C)                        truncated IS: Ionides 2008; Yao et al. 2025,
                                                "Your Efficient RL Framework Secretly Brings You
                                                Off-Policy RL Training" (C = 2)
    mis  w = rho  if 1/C <= rho <= C, else 0    masked IS: IcePop (Ling Team 2025, Ring-1T:
                                                M(k) = k inside [alpha, beta], else 0); the
                                                sequence level is Seq-MIS of Liu et al. 2025,
                                                "When Speed Kills Stability"
    none w = 1                                  (the trainers then skip all of this)

w is under stop_gradient (a constant of the loss), 0 at masked positions, and computed in
log space (exp only of values <= log C, so a huge or -inf ratio gives no inf/NaN). The
sequence level uses the product of token ratios (the true likelihood ratio of the
completion, as Seq-TIS / Seq-MIS of Liu et al.); it moves exponentially with length, so long
completions are truncated / masked sooner than with a geometric mean (GSPO-style, not
offered: it is biased as an importance weight). The comparisons are closed at the cap: rho = C
is not counted as clipped (tis) and is kept (mis).

Arrays are [B, C] over completion tokens with mask_BC (ragged rows, possibly all-masked);
all arithmetic is float32.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from rlhf_jax.losses import kl as kl_lib
from rlhf_jax.losses.arrays import check_shapes, f32, is_number

MODES = ("none", "tis", "mis")
LEVELS = ("token", "sequence")


def is_weights(old_logps_BC, sample_logps_BC, mask_BC, mode="tis", cap=2.0, level="token"):
  """Importance weights for the sampler/trainer mismatch: (weights_BC, metrics).

      log rho_t = log pi_old(y_t) - log pi_s(y_t); sequence level: rho = exp(sum_t log rho_t)
      tis: w = min(rho, C);  mis: w = rho * [1/C <= rho <= C];  none: w = 1   (C = cap)

  (see the module docstring for the papers). weights_BC: float32, stop_gradient, 0 at masked
  positions. mode, level and cap are static (cap a number > 1).

  Metrics (float32 scalars, over real tokens; 0 when there are none):
    logp_abs_diff     mean |log pi_old - log pi_s|: the sampler/trainer mismatch
    kl_k1, kl_k3      KL(pi_s || pi_old) per token from the sampled tokens (`kl.kl_estimate`
                      with d = log pi_s - log pi_old: k1 = d, k3 = rho - 1 - log rho)
    log_ratio_abs_max max |log rho| (of the sequence ratio at sequence level)
    weight_mean, weight_max
    clipped_frac (tis: rho > C) or masked_frac (mis: rho outside [1/C, C]): the share of real
                      tokens (at sequence level: tokens of such sequences)
  """
  if mode not in MODES:
    raise ValueError(f"unknown is_correction mode {mode!r}; expected one of {', '.join(MODES)}")
  if level not in LEVELS:
    raise ValueError(f"unknown is_correction level {level!r}; expected one of "
                     f"{', '.join(LEVELS)}")
  if not (is_number(cap) and math.isfinite(cap) and cap > 1):
    raise ValueError(f"is_weights: cap must be a finite number > 1, got {cap!r}")
  check_shapes(old_logps_BC=old_logps_BC, sample_logps_BC=sample_logps_BC, mask_BC=mask_BC)
  sg = jax.lax.stop_gradient
  old, sample = sg(f32(old_logps_BC)), sg(f32(sample_logps_BC))
  m = f32(mask_BC) > 0
  mf = m.astype(jnp.float32)
  n = jnp.maximum(jnp.sum(mf), 1.0)

  def mean(x_BC):
    return jnp.sum(jnp.where(m, x_BC, 0.0)) / n

  log_rho_BC = jnp.where(m, old - sample, 0.0)
  log_r_BC = log_rho_BC
  if level == "sequence":
    log_r_BC = jnp.broadcast_to(jnp.sum(log_rho_BC, axis=-1, keepdims=True), log_rho_BC.shape)
  log_c = jnp.float32(math.log(cap))
  if mode == "none":
    w_BC, hit_BC = jnp.ones_like(log_r_BC), jnp.zeros(log_r_BC.shape, bool)
  elif mode == "tis":
    w_BC, hit_BC = jnp.exp(jnp.minimum(log_r_BC, log_c)), log_r_BC > log_c
  else:
    hit_BC = jnp.abs(log_r_BC) > log_c
    w_BC = jnp.where(hit_BC, 0.0, jnp.exp(jnp.clip(log_r_BC, -log_c, log_c)))
  w_BC = sg(jnp.where(m, w_BC, 0.0))

  metrics = {
      "logp_abs_diff": mean(jnp.abs(log_rho_BC)),
      "kl_k1": mean(kl_lib.kl_estimate(sample, old, "k1", mask_BC=mask_BC)),
      "kl_k3": mean(kl_lib.kl_estimate(sample, old, "k3", mask_BC=mask_BC)),
      "log_ratio_abs_max": jnp.max(jnp.where(m, jnp.abs(log_r_BC), 0.0)),
      "weight_mean": mean(w_BC),
      "weight_max": jnp.max(w_BC),
  }
  if mode != "none":
    metrics["clipped_frac" if mode == "tis" else "masked_frac"] = mean(hit_BC.astype(jnp.float32))
  return w_BC, metrics


def weights_fn(rollout_cfg):
  """None for rollout.is_correction = "none" (absent: "none"): the trainers then add nothing
  to their computation; else jitted f(old_logps_BC, sample_logps_BC, mask_BC) -> (weights_BC,
  metrics) with the section's is_cap and is_level (`is_weights`)."""
  mode = rollout_cfg.get("is_correction", "none")
  if mode == "none":
    return None
  return jax.jit(functools.partial(is_weights, mode=mode, cap=float(rollout_cfg.get("is_cap", 2.0)),
                                   level=rollout_cfg.get("is_level", "token")))
