"""The GRPO family of critic-free policy losses: GRPO, DAPO, Dr. GRPO, GSPO; DAPO's overlong penalty.

One function, `grpo_loss`, with the knobs that tell the variants apart:

  variant                          aggregation               clip (eps_low, eps_high)   importance   KL (beta, kind)
  GRPO (Shao et al. 2024)          seq_mean_token_mean       (0.2, 0.2)                 token        (0.04, k3)
  DAPO (Yu et al. 2025)            token_mean                (0.2, 0.28) clip-higher    token        (0, -)
  Dr. GRPO (Liu et al. 2025)       seq_mean_token_sum_norm   (0.2, 0.2)                 token        (0, -)
  GSPO (Zheng et al. 2025)         seq_mean_token_mean       (3e-4, 4e-4)               sequence     (0, -)

(DeepSeekMath states beta = 0.04 but not eps; 0.2 is the usual default, as in
TRL. DAPO's values are from its sec. 4.1, GSPO's from its sec. 5.1.)

Advantages come from `advantages.group_advantages` (GRPO / DAPO / GSPO: with
std scaling; Dr. GRPO: scale_by_std=False) or any other estimator
(`rloo_advantages`, `reinforce_plus_plus_advantages`), as [B] (one per
sequence, broadcast over its tokens) or [B, T]. DAPO's dynamic sampling
(dropping groups whose rewards are all equal) is a trainer decision; such
groups already get zero advantage. Per-token arrays are [B, T] over
completion tokens with mask_BT (ragged, rows may be all-masked).
All arithmetic is float32.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.losses import kl as kl_lib
from rlhf_jax.losses.arrays import check_shapes, f32, is_number
from rlhf_jax.losses.ppo import (AGGREGATIONS, aggregate, check_aggregation, check_clip,
                                 clipped_surrogate, masked_log_ratio, policy_metrics,
                                 token_mean)

IMPORTANCE_LEVELS = ("token", "sequence")
# Where the KL to the reference policy enters (`config.grpo.kl_mode`): "loss" adds
# kl_coef * k_t to the per-token loss (GRPO, Shao et al. 2024, eq. 3); "reward" subtracts it
# from the reward before the advantages (`kl.kl_penalty_rewards`: RLOO, REINFORCE++);
# "none" leaves it out (DAPO, Dr. GRPO, GSPO).
KL_MODES = ("loss", "reward", "none")

__all__ = ["AGGREGATIONS", "IMPORTANCE_LEVELS", "KL_MODES", "aggregate", "grpo_loss",
           "importance_log_ratio", "overlong_penalty"]


def importance_log_ratio(logps_BC, old_logps_BC, mask_BC, importance="token"):
  """Per-token log importance ratio log w_t, float32 [B, C], 0 at masked positions.

  token     log w_{i,t} = logp_{i,t} - old_logp_{i,t}                    (PPO / GRPO)
  sequence  log w_{i,t} = sg[log s_i] + logp_{i,t} - sg[logp_{i,t}]       (GSPO-token, Zheng et al. 2025, sec. 4.3)
            log s_i     = (1/|y_i|) sum_t (logp_{i,t} - old_logp_{i,t})   (GSPO sec. 4.1: s_i = (pi/pi_old)(y_i|x)^(1/|y_i|))

  sg = stop_gradient. In the sequence form every token of row i carries the
  value s_i and d w_{i,t} / d logp_{i,t} = s_i, so with per-sequence
  advantages and the seq_mean_token_mean aggregation the loss and its
  gradient equal GSPO's sequence-level objective
  (1/G) sum_i min(s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i), whose
  gradient is s_i A_i (1/|y_i|) sum_t grad logp_{i,t} (GSPO sec. 4.2); token
  advantages A_{i,t} give GSPO-token. Rows without real tokens give 0.
  """
  if importance not in IMPORTANCE_LEVELS:
    raise ValueError(f"unknown importance level {importance!r}; expected one of "
                     f"{', '.join(IMPORTANCE_LEVELS)}")
  log_ratio_BC = masked_log_ratio(logps_BC, old_logps_BC, mask_BC)
  if importance == "token":
    return log_ratio_BC
  m = f32(mask_BC) > 0
  n_B = jnp.sum(m.astype(jnp.float32), axis=-1)
  log_s_B = jnp.sum(log_ratio_BC, axis=-1) / jnp.maximum(n_B, 1.0)
  lp = jnp.where(m, f32(logps_BC), 0.0)
  sg = jax.lax.stop_gradient
  return jnp.where(m, sg(log_s_B)[:, None] + lp - sg(lp), 0.0)


def grpo_loss(logps_BC, old_logps_BC, advantages_BC, mask_BC, *, ref_logps_BC=None,
              aggregation="seq_mean_token_mean", max_len=None, clip_eps_low=0.2,
              clip_eps_high=None, dual_clip=None, importance="token", kl_beta=0.0, kl_kind="k3",
              is_weights_BC=None):
  """GRPO-family clipped policy loss with an optional KL loss term: (loss, metrics).

      w_t  = exp(log w_t)                                   (`importance_log_ratio`)
      l_t  = max(-A_t w_t, -A_t clip(w_t, 1 - eps_low, 1 + eps_high))   [+ dual clip]
             + beta * k(logp_t, ref_logp_t)
      loss = aggregate_t(l_t)                               (`ppo.aggregate`, mode `aggregation`)

  is_weights_BC (None: off): sampler-mismatch weights c_t (`is_correction.is_weights`,
  constants) multiply the surrogate term before the aggregation, whose normaliser is
  unchanged (a token with c_t = 0 still counts); the KL term is not weighted.

  GRPO (Shao et al. 2024, eq. 3) maximises the clipped surrogate minus
  beta * D_KL with the k3 estimator D_KL = pi_ref/pi - log(pi_ref/pi) - 1
  (eq. 4) *inside* the per-sequence token mean, so the KL term here uses the
  same aggregation as the surrogate. Clip-higher (eps_high > eps_low) is
  DAPO's (Yu et al. 2025, sec. 3.1); eps_high=None means eps_high = eps_low.
  importance="sequence" is GSPO (Zheng et al. 2025; their eps are ~3e-4 /
  4e-4, not 0.2).

  Arguments: logps_BC, log-probs of the sampled completion tokens under the
  policy being trained; old_logps_BC, under the sampling policy pi_old (None:
  on-policy, old = stop_gradient(logp), so the ratio is 1 and the gradient is
  A grad log pi -- the single-update GRPO of DeepSeekMath); advantages_BC, [B]
  or [B, C] constants; ref_logps_BC, under the reference model (needed when
  kl_beta != 0; also reported as `kl` when given); kl_kind in k1/k2/k3
  (`kl.kl_estimate`); dual_clip as in `ppo.clipped_surrogate`; max_len for
  seq_mean_token_sum_norm (the generation budget; default T).

  Metrics (float32, under stop_gradient): loss; policy_loss (the aggregated
  surrogate alone); kl (mean over real tokens of the KL estimate; 0 without
  ref_logps_BC) and kl_loss (the aggregated KL term, before the beta factor);
  clip_frac, clip_frac_low (w < 1 - eps_low with A < 0), clip_frac_high
  (w > 1 + eps_high with A > 0), dual_clip_frac: fractions of real tokens
  whose gradient the clip zeroes (for GSPO all tokens of a clipped sequence
  count, as in the GSPO paper's clipping-fraction plots); approx_kl (k3 of
  KL(pi_old || pi) from the token ratios); ratio_mean / ratio_min /
  ratio_max over real tokens (w_t; for GSPO each token carries its row's s_i).
  """
  check_clip(clip_eps_low, clip_eps_high, dual_clip)
  check_aggregation(aggregation, max_len)
  if kl_kind not in kl_lib.KL_KINDS:
    raise ValueError(f"unknown KL estimator kind {kl_kind!r}; expected one of {', '.join(kl_lib.KL_KINDS)}")
  if ref_logps_BC is None and not (is_number(kl_beta) and kl_beta == 0):
    raise ValueError(f"grpo_loss: kl_beta={kl_beta} needs ref_logps_BC (reference-model log-probs); "
                     "pass kl_beta=0.0 to train without a KL term")
  if is_number(kl_beta) and kl_beta < 0:
    raise ValueError(f"grpo_loss: kl_beta must be >= 0, got {kl_beta}")
  if old_logps_BC is None:
    old_logps_BC = jax.lax.stop_gradient(logps_BC)
  adv = f32(advantages_BC)
  if adv.ndim == 1:
    adv = adv[:, None] * jnp.ones(jnp.shape(mask_BC), jnp.float32)
  check_shapes(logps_BC=logps_BC, old_logps_BC=old_logps_BC, advantages_BC=adv, mask_BC=mask_BC,
                ref_logps_BC=ref_logps_BC, is_weights_BC=is_weights_BC)
  adv = jax.lax.stop_gradient(adv)

  log_w = importance_log_ratio(logps_BC, old_logps_BC, mask_BC, importance)
  w = jnp.exp(log_w)
  surrogate_BC, low, high, dual = clipped_surrogate(w, adv, clip_eps_low, clip_eps_high, dual_clip)
  if is_weights_BC is not None:  # rollout.is_correction
    surrogate_BC = surrogate_BC * jax.lax.stop_gradient(f32(is_weights_BC))
  policy_loss = aggregate(surrogate_BC, mask_BC, aggregation, max_len)
  if ref_logps_BC is not None:
    kl_BC = kl_lib.kl_estimate(logps_BC, ref_logps_BC, kl_kind, mask_BC=mask_BC)
    kl_loss = aggregate(kl_BC, mask_BC, aggregation, max_len)
    kl_mean = token_mean(jax.lax.stop_gradient(kl_BC), mask_BC)
  else:
    kl_loss = kl_mean = jnp.zeros((), jnp.float32)
  loss = policy_loss + f32(kl_beta) * kl_loss

  token_log_ratio = masked_log_ratio(logps_BC, old_logps_BC, mask_BC)
  metrics = policy_metrics(policy_loss, w, token_log_ratio, low, high, dual, mask_BC, "policy_loss")
  metrics.update(loss=jax.lax.stop_gradient(loss), kl=kl_mean,
                 kl_loss=jax.lax.stop_gradient(kl_loss))
  return loss, metrics


def overlong_penalty(lengths_B, max_len, cache_len):
  """DAPO soft overlong punishment (Yu et al. 2025, sec. 3.4), float32 [B].

      R(y) = 0                               |y| <= L_max - L_cache
           = ((L_max - L_cache) - |y|) / L_cache    L_max - L_cache < |y| <= L_max
           = -1                              |y| > L_max

  with L_max = max_len, L_cache = cache_len, |y| = lengths_B (completion
  tokens). Added to the task reward before computing advantages (DAPO: L_max =
  20480 with L_cache = 4096 of a 16384 + 4096 budget). Needs
  0 < cache_len <= max_len.
  """
  if is_number(cache_len) and is_number(max_len) and not 0 < cache_len <= max_len:
    raise ValueError(f"overlong_penalty: need 0 < cache_len <= max_len, got cache_len={cache_len}, "
                     f"max_len={max_len}")
  L = f32(lengths_B)
  start = f32(max_len) - f32(cache_len)
  soft = (start - L) / f32(cache_len)
  return jnp.where(L <= start, 0.0, jnp.where(L <= f32(max_len), soft, -1.0))


# ----------------------------------------------------------------------------
# The GRPO-family variants: each one's values for the knobs left at auto
# ----------------------------------------------------------------------------

# Papers: grpo (Shao et al. 2024, DeepSeekMath), dr_grpo (Liu et al. 2025, "Understanding
# R1-Zero-Like Training"), dapo (Yu et al. 2025), gspo (Zheng et al. 2025), rloo (Ahmadian
# et al. 2024), reinforce_pp (Hu 2025, REINFORCE++); rlhf_jax/trainers/grpo.py documents
# each knob.
VARIANTS = {
    "grpo": dict(advantage="group_std", aggregation="seq_mean_token_mean", clip_eps_low=0.2,
                 clip_eps_high=0.2, importance="token", kl_mode="loss", kl_coef=0.04,
                 kl_estimator="k3", dynamic_sampling=0),
    "dr_grpo": dict(advantage="group", aggregation="seq_mean_token_sum_norm", clip_eps_low=0.2,
                    clip_eps_high=0.2, importance="token", kl_mode="none", kl_coef=0.0,
                    kl_estimator="k3", dynamic_sampling=0),
    "dapo": dict(advantage="group_std", aggregation="token_mean", clip_eps_low=0.2,
                 clip_eps_high=0.28, importance="token", kl_mode="none", kl_coef=0.0,
                 kl_estimator="k3", dynamic_sampling=1),
    "gspo": dict(advantage="group_std", aggregation="seq_mean_token_mean", clip_eps_low=3e-4,
                 clip_eps_high=4e-4, importance="sequence", kl_mode="none", kl_coef=0.0,
                 kl_estimator="k3", dynamic_sampling=0),
    "rloo": dict(advantage="rloo", aggregation="seq_mean_token_sum", clip_eps_low=0.2,
                 clip_eps_high=0.2, importance="token", kl_mode="reward", kl_coef=0.05,
                 kl_estimator="k1", dynamic_sampling=0),
    "reinforce_pp": dict(advantage="reinforce_pp", aggregation="token_mean", clip_eps_low=0.2,
                         clip_eps_high=0.2, importance="token", kl_mode="reward", kl_coef=0.01,
                         kl_estimator="k1", dynamic_sampling=0),
}
AUTO = (-1, -1.0, "")


def resolve(g) -> dict:
  """Effective algorithm knobs of config.grpo `g`: the variant's defaults (`VARIANTS`) for
  every knob left at auto (-1, -1.0 or ""); ValueError naming an unknown variant."""
  if g.variant not in VARIANTS:
    raise ValueError(f"config.grpo.variant={g.variant!r}: expected one of "
                     f"{sorted(VARIANTS)}")
  out = dict(VARIANTS[g.variant])
  for k in out:
    v = g[k]
    if not (isinstance(v, (int, float, str)) and v in AUTO and not isinstance(v, bool)):
      out[k] = v
  out.update(variant=g.variant, epochs=g.epochs, minibatches=g.minibatches,
             std_eps=g.std_eps, overlong_cache=g.overlong_cache,
             max_refill_rounds=g.max_refill_rounds)
  return out
