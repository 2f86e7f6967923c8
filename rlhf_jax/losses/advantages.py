"""Advantage estimators for online RL: GAE, whitening, GRPO / RLOO group baselines, REINFORCE++.

Conventions: per-token arrays are [B, T] over *completion* tokens with mask_BT
(1 = real token; lengths are ragged and rows may be all-masked); sequence-level
arrays are [B]. Groups: B = num_prompts * G with the G samples of one prompt
contiguous, so row b belongs to group b // G.

Masked positions are *skipped*: recursions over time run over the real tokens
of each row only (a masked tail is the end of the episode; a masked hole, e.g.
left padding, is passed through), and every output is exactly 0 at masked
positions. Estimators return their outputs under stop_gradient: advantages and
returns are targets, not functions of the parameters. All arithmetic is float32.
"""
from __future__ import annotations

import dataclasses
import numbers
from typing import Callable

import jax
import jax.numpy as jnp

from rlhf_jax.losses.arrays import f32


def _check_rows(name, x, ndim):
  if x.ndim != ndim:
    want = "[B]" if ndim == 1 else "[B, T]"
    raise ValueError(f"{name}: expected a {want} array, got shape {tuple(x.shape)}")


def _check_same_shape(**arrays):
  shapes = {k: tuple(v.shape) for k, v in arrays.items()}
  if len(set(shapes.values())) != 1:
    raise ValueError(f"shape mismatch: {shapes} (all must be [B, T])")


def _backward_scan(rewards_BT, values_BT, mask_BT, gamma, lam):
  """GAE recursion backwards over the real tokens of each row: advantages [B, T]."""
  r_TB = jnp.swapaxes(f32(rewards_BT), 0, 1)
  v_TB = jnp.swapaxes(f32(values_BT), 0, 1)
  m_TB = jnp.swapaxes(f32(mask_BT) > 0, 0, 1)
  B = r_TB.shape[1]

  def step(carry, x):
    next_value_B, next_adv_B = carry
    r_B, v_B, m_B = x
    delta_B = r_B + gamma * next_value_B - v_B
    adv_B = delta_B + gamma * lam * next_adv_B
    adv_B = jnp.where(m_B, adv_B, 0.0)
    carry = (jnp.where(m_B, v_B, next_value_B), jnp.where(m_B, adv_B, next_adv_B))
    return carry, adv_B

  zeros_B = jnp.zeros((B,), jnp.float32)
  _, adv_TB = jax.lax.scan(step, (zeros_B, zeros_B), (r_TB, v_TB, m_TB), reverse=True)
  return jnp.swapaxes(adv_TB, 0, 1)


def gae(rewards_BT, values_BT, mask_BT, gamma=1.0, lam=0.95):
  """Generalised advantage estimation (Schulman et al. 2016, sec. 3): (advantages_BT, returns_BT).

      delta_t = r_t + gamma V_{t+1} - V_t
      A_t     = delta_t + gamma lam A_{t+1}        (= sum_l (gamma lam)^l delta_{t+l})
      R_t     = A_t + V_t                         (the value-function target)

  over the real tokens of each row, computed with a backward `lax.scan` over
  T. t+1 is the *next real token* of the row; after the last real token the
  episode ends: V = 0 and A = 0 there (terminal; no bootstrapping of truncated
  completions). rewards_BT, values_BT: float [B, T] (per-token rewards, e.g.
  `kl.kl_penalty_rewards` with the score at the last token; values V(s_t) of
  the state before token t). Defaults gamma = 1, lam = 0.95 as in the N
  Implementation Details of RLHF with PPO (Huang et al. 2024) and TRL.
  Outputs are 0 at masked positions and under stop_gradient.
  """
  _check_rows("gae rewards_BT", rewards_BT, 2)
  _check_same_shape(rewards_BT=rewards_BT, values_BT=values_BT, mask_BT=mask_BT)
  m = f32(mask_BT) > 0
  adv_BT = _backward_scan(rewards_BT, values_BT, mask_BT, f32(gamma), f32(lam))
  returns_BT = jnp.where(m, adv_BT + f32(values_BT), 0.0)
  return jax.lax.stop_gradient(adv_BT), jax.lax.stop_gradient(returns_BT)


def discounted_returns(rewards_BT, mask_BT, gamma=1.0):
  """Reward-to-go G_t = sum_{s >= t} gamma^(s-t) r_s over the real tokens of each row, [B, T].

  GAE with V = 0 and lam = 1. 0 at masked positions, under stop_gradient.
  """
  _check_rows("discounted_returns rewards_BT", rewards_BT, 2)
  _check_same_shape(rewards_BT=rewards_BT, mask_BT=mask_BT)
  ret_BT = _backward_scan(rewards_BT, jnp.zeros_like(f32(rewards_BT)), mask_BT, f32(gamma), 1.0)
  return jax.lax.stop_gradient(ret_BT)


def masked_mean_var(x, mask, unbiased=False):
  """(mean, var) of x over the positions where mask = 1 (all axes), float32 scalars.

  var divides by n (unbiased=False) or n - 1 (unbiased=True); n is clamped so
  no mask (n = 0) or a single element gives mean 0 / var 0, never NaN.
  """
  m = (f32(mask) > 0).astype(jnp.float32)
  x = jnp.where(m > 0, f32(x), 0.0)
  n = jnp.sum(m)
  mean = jnp.sum(x) / jnp.maximum(n, 1.0)
  sq = jnp.sum(jnp.where(m > 0, jnp.square(x - mean), 0.0))
  var = sq / jnp.maximum(n - 1.0 if unbiased else n, 1.0)
  return mean, var


def whiten(x, mask, shift_mean=True, unbiased=False, eps=1e-8):
  """Masked whitening over *all* positions of the batch, as in PPO for RLHF: same shape as x.

      y = (x - mean) / sqrt(var + eps)           (shift_mean=True)
      y = (x - mean) / sqrt(var + eps) + mean    (shift_mean=False: rescale, keep the mean)

  with mean and var over the real positions (mask = 1) of x. This is `whiten`
  of Ziegler et al.'s lm-human-preferences code, carried into the N
  Implementation Details of RLHF with PPO (Huang et al. 2024, details on
  advantage / reward whitening): advantages are whitened with shift_mean=True,
  rewards with shift_mean=False. var is the population variance (/ n, as
  tf.nn.moments in the original); unbiased=True divides by n - 1 as TRL's
  masked_whiten does. Works on [B, T] with mask_BT or on [B] with a row mask;
  0 at masked positions. Under jit with a sharded batch the moments are those
  of the global batch. Gradients flow through (use it inside a loss if wanted).
  """
  m = f32(mask) > 0
  mean, var = masked_mean_var(x, mask, unbiased)
  y = (f32(x) - mean) * jax.lax.rsqrt(var + eps)
  if not shift_mean:
    y = y + mean
  return jnp.where(m, y, 0.0)


def _grouped(rewards_B, group_size, who):
  r = f32(rewards_B)
  _check_rows(f"{who} rewards_B", r, 1)
  if not isinstance(group_size, numbers.Integral) or group_size < 1:
    raise ValueError(f"{who}: group_size must be a positive int, got {group_size!r}")
  if r.shape[0] % group_size:
    raise ValueError(f"{who}: batch of {r.shape[0]} rows is not a whole number of groups of "
                     f"group_size={group_size} (rows b*G .. b*G+G-1 must be one prompt's samples)")
  return r.reshape(-1, group_size)


def group_advantages(rewards_B, group_size, scale_by_std=True, std_ddof=1, eps=1e-4):
  """GRPO group-relative advantages (outcome supervision), float32 [B].

      A_i = (r_i - mean_g) / (std_g + eps)     (scale_by_std=True: GRPO, Shao et al. 2024, sec. 4.1.2)
      A_i =  r_i - mean_g                      (scale_by_std=False: Dr. GRPO, Liu et al. 2025)

  over the G = group_size samples of each prompt (rows b // G). DeepSeekMath
  writes std(r) without saying sample or population; TRL's GRPOTrainer
  (torch .std(), Bessel-corrected), verl and OpenRLHF all use the *sample*
  std, so the default is std_ddof=1; std_ddof=0 is the population std. eps =
  1e-4 as in TRL. Dr. GRPO drops the std because it up-weights prompts that
  are nearly always / never solved (a question-level difficulty bias).

  Degenerate groups give exactly 0, never NaN: a group whose rewards are all
  equal (std 0) and group_size = 1 (nothing to compare against; the sample std
  of one value is taken as 0). Broadcast to tokens with A_i * mask_BT (or pass
  [B] straight to `grpo.grpo_loss`). Under stop_gradient.
  """
  r_PG = _grouped(rewards_B, group_size, "group_advantages")
  if std_ddof not in (0, 1):
    raise ValueError(f"group_advantages: std_ddof must be 0 (population) or 1 (sample), got {std_ddof!r}")
  mean_P = jnp.mean(r_PG, axis=1, keepdims=True)
  centred_PG = r_PG - mean_P
  # All-equal groups: r - mean can be a rounding residue (0.1 * 3 / 3 != 0.1); force 0.
  same_P = (jnp.max(r_PG, axis=1, keepdims=True) == jnp.min(r_PG, axis=1, keepdims=True))
  centred_PG = jnp.where(same_P, 0.0, centred_PG)
  if scale_by_std:
    var_P = jnp.sum(jnp.square(centred_PG), axis=1, keepdims=True) / max(group_size - std_ddof, 1)
    centred_PG = centred_PG / (jnp.sqrt(var_P) + eps)
  return jax.lax.stop_gradient(centred_PG.reshape(-1))


def rloo_advantages(rewards_B, group_size):
  """RLOO leave-one-out advantages (Ahmadian et al. 2024, "Back to Basics", sec. 3), float32 [B].

      A_i = r_i - 1/(G-1) sum_{j != i} r_j  =  G/(G-1) (r_i - mean_g)

  over the G = group_size samples of each prompt (Kool et al. 2019's
  REINFORCE with a leave-one-out baseline). group_size = 1 has no other sample
  to form the baseline and raises ValueError (use `group_advantages` or a
  learned baseline instead). Groups of identical rewards give exactly 0.
  Under stop_gradient.
  """
  if isinstance(group_size, numbers.Integral) and group_size == 1:
    raise ValueError("rloo_advantages: group_size must be >= 2 (the leave-one-out baseline of a "
                     "sample needs another sample of the same prompt)")
  r_PG = _grouped(rewards_B, group_size, "rloo_advantages")
  baseline_PG = (jnp.sum(r_PG, axis=1, keepdims=True) - r_PG) / (group_size - 1)
  adv_PG = r_PG - baseline_PG
  same_P = (jnp.max(r_PG, axis=1, keepdims=True) == jnp.min(r_PG, axis=1, keepdims=True))
  adv_PG = jnp.where(same_P, 0.0, adv_PG)
  return jax.lax.stop_gradient(adv_PG.reshape(-1))


def reinforce_plus_plus_advantages(rewards_BT, mask_BT, gamma=1.0, whiten_advantages=True):
  """REINFORCE++ (Hu 2025, "REINFORCE++: A Simple and Efficient Approach ..."): (advantages_BT, returns_BT).

      r_t = [t = last token] r(x, y) - beta KL_t          (build with kl.kl_penalty_rewards(..., scores_B=...))
      G_t = sum_{s >= t} gamma^(s-t) r_s                  (gamma = 1 in the paper)
      A_t = (G_t - mean(G)) / std(G)                     (whitened over all real tokens of the global batch)

  KL_t there is the k1 log-ratio log(pi_old / pi_sft) per token. No critic,
  no group baseline: the global-batch normalisation replaces them.
  For "REINFORCE++-baseline" (later versions of the paper), subtract the
  group mean from the scores first (`group_advantages(scores_B, G,
  scale_by_std=False)`) and pass those as scores. whiten_advantages=False
  returns A = G. std is the population std with eps 1e-8 (`whiten`).
  Both outputs are 0 at masked positions, under stop_gradient.
  """
  returns_BT = discounted_returns(rewards_BT, mask_BT, gamma)
  adv_BT = whiten(returns_BT, mask_BT, shift_mean=True) if whiten_advantages else returns_BT
  return jax.lax.stop_gradient(adv_BT), returns_BT


# ----------------------------------------------------------------------------
# The GRPO family's estimators (`config.grpo.advantage`): one entry each
# ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class AdvantageEstimator:
  """An advantage estimator of the critic-free trainers.

  Sequence-level (token_level=False): fn(scores_B, group_size, std_eps) -> [B], one
  advantage per completion (broadcast over its tokens); scores may already carry a
  sequence-level KL penalty (grpo.kl_mode="reward").
  Token-level (token_level=True): fn(rewards_BC, mask_BC) -> [B, C] from per-token rewards
  (the score at the last token minus the per-token KL penalty,
  `kl.kl_penalty_rewards`).
  needs_groups: a baseline from the other completions of the same prompt, so
  rollout.group_size must be >= 2 (and sampling not greedy).
  """
  fn: Callable
  needs_groups: bool
  token_level: bool = False


ESTIMATORS = {
    # Shao et al. 2024 (DeepSeekMath): (r - mean_group) / (std_group + eps)
    "group_std": AdvantageEstimator(
        lambda r, G, eps: group_advantages(r, G, scale_by_std=True, eps=eps), needs_groups=True),
    # Liu et al. 2025 (Dr. GRPO): r - mean_group, no std scaling
    "group": AdvantageEstimator(
        lambda r, G, eps: group_advantages(r, G, scale_by_std=False, eps=eps), needs_groups=True),
    # Ahmadian et al. 2024 (RLOO): r - mean of the other G - 1 completions
    "rloo": AdvantageEstimator(lambda r, G, eps: rloo_advantages(r, G), needs_groups=True),
    # Hu 2025 (REINFORCE++): returns of per-token KL-penalised rewards, whitened over the batch
    "reinforce_pp": AdvantageEstimator(
        lambda rewards_BC, mask_BC: reinforce_plus_plus_advantages(rewards_BC, mask_BC)[0],
        needs_groups=False, token_level=True),
}
