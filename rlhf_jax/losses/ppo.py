"""PPO losses for RLHF: clipped surrogate (with dual clip), clipped value loss, entropy.

Per-token arrays are [B, C] over the C completion tokens, named as the rollout
(`rlhf_jax.rollout.Rollout`) and the trainers' minibatches name them, with mask_BC
(1 = real token; ragged rows, possibly all-masked). Log-probs are those of the sampled
tokens: logps_BC under the policy being trained, old_logps_BC under the policy that
sampled them (pi_old, at rollout time). The generic reductions (`aggregate`,
`token_mean`, ...) take any [B, T].
Advantages/returns come from `advantages.py` and are treated as constants.

Token losses are reduced with `aggregate` (mode names shared with
`grpo.grpo_loss`); PPO's default is "token_mean", the masked mean over all
real tokens of the batch (TRL / the N Implementation Details of RLHF with PPO,
Huang et al. 2024). Metrics are float32 scalars under stop_gradient; token
statistics (clip fractions, ratio, approx_kl) are means over real tokens.
All arithmetic is float32.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from rlhf_jax.losses.arrays import check_shapes, f32, is_number
from rlhf_jax.losses.kl import k3_from_log_ratio
from rlhf_jax.losses.logprobs import token_entropy


# ----------------------------------------------------------------------------
# Loss aggregation modes (`config.ppo.aggregation`, `config.grpo.aggregation`): one entry each
# ----------------------------------------------------------------------------
#
# With m = mask_BT, l = loss_BT, n_b = sum_t m[b, t] and S = the rows with n_b > 0,
# every mode is a function fn(loss_BT, mask_BT, max_len) -> float32 scalar that reads
# only real tokens (masked positions never reach the result, even if they hold inf/NaN;
# all-masked batches give 0), and every sequence mean leaves out the rows without real
# tokens (padding rows).


def _row_sums(loss_BT, mask_BT):
  """(sum_B, n_B): each row's sum of l over its real tokens and its real-token count."""
  m = f32(mask_BT) > 0
  l_BT = jnp.where(m, f32(loss_BT), 0.0)
  n_B = jnp.sum(m.astype(jnp.float32), axis=-1)
  return jnp.sum(l_BT, axis=-1), n_B


def _mean_over_sequences(per_B, n_B):
  """mean_{b in S} per_B[b], S = rows with n_B > 0 (0 when S is empty)."""
  has_B = (n_B > 0).astype(jnp.float32)
  return jnp.sum(per_B * has_B) / jnp.maximum(jnp.sum(has_B), 1.0)


def token_mean_loss(loss_BT, mask_BT, max_len=None):
  """sum_{b,t} m l / sum_{b,t} m: every real token of the batch weighs the same.

  DAPO's token-level policy-gradient loss (Yu et al. 2025, sec. 3.3); PPO in TRL.
  max_len is not used.
  """
  return token_mean(loss_BT, mask_BT)


def seq_mean_token_mean_loss(loss_BT, mask_BT, max_len=None):
  """mean_{b in S} [sum_t m l / n_b]: each sequence's token mean, then the mean over sequences.

  GRPO (Shao et al. 2024, eq. 3: 1/G sum_i 1/|o_i| sum_t). max_len is not used.
  """
  sum_B, n_B = _row_sums(loss_BT, mask_BT)
  return _mean_over_sequences(sum_B / jnp.maximum(n_B, 1.0), n_B)


def seq_mean_token_sum_loss(loss_BT, mask_BT, max_len=None):
  """mean_{b in S} [sum_t m l]: each sequence's token sum, then the mean over sequences.

  The sequence-level REINFORCE / RLOO objective (Ahmadian et al. 2024: the whole
  completion is one action). max_len is not used.
  """
  sum_B, n_B = _row_sums(loss_BT, mask_BT)
  return _mean_over_sequences(sum_B, n_B)


def seq_mean_token_sum_norm_loss(loss_BT, mask_BT, max_len=None):
  """mean_{b in S} [sum_t m l / max_len]: token sums divided by one constant.

  Dr. GRPO (Liu et al. 2025: GRPO without the 1/|o_i| length normalisation;
  implementations, e.g. TRL's "dr_grpo", divide by a constant, the generation
  budget). max_len defaults to T = mask_BT.shape[1]; pass the generation budget
  (max new tokens) so the constant does not change with the padded length of a batch.
  """
  sum_B, n_B = _row_sums(loss_BT, mask_BT)
  return _mean_over_sequences(sum_B / f32(mask_BT.shape[-1] if max_len is None else max_len),
                              n_B)


def token_count(mask_BT):
  """sum_{b,t} [m > 0]: the real tokens of a (micro-)batch, float32 scalar."""
  return jnp.sum((f32(mask_BT) > 0).astype(jnp.float32))


def sequence_count(mask_BT):
  """|S| = #rows with a real token: the non-empty sequences of a (micro-)batch, float32 scalar."""
  return jnp.sum((jnp.sum((f32(mask_BT) > 0).astype(jnp.float32), axis=-1) > 0)
                 .astype(jnp.float32))


@dataclasses.dataclass(frozen=True)
class Aggregation:
  """A way to reduce per-token losses [B, T] to the scalar that is differentiated.

  fn(loss_BT, mask_BT, max_len) -> float32 scalar (see the mode functions above).
  micro_batch_weight(mask_BT) -> float32 scalar: the micro-batch's share for exact
  gradient accumulation: the denominator of fn over the micro-batch (its real tokens
  for a token mean, its non-empty sequences for a sequence mean), so that
  sum_k w_k fn(part_k) / sum_k w_k = fn(whole batch) for any split into parts along B.
  description: what it computes, in words; paper: where it comes from.
  """
  fn: Callable
  micro_batch_weight: Callable
  description: str
  paper: str


AGGREGATION_MODES = {
    "token_mean": Aggregation(
        token_mean_loss, token_count,
        "Σ over all real tokens ÷ #real tokens of the batch",
        "DAPO (Yu et al. 2025, sec. 3.3); PPO in TRL"),
    "seq_mean_token_mean": Aggregation(
        seq_mean_token_mean_loss, sequence_count,
        "mean over sequences of each sequence's token mean",
        "GRPO (Shao et al. 2024, eq. 3)"),
    "seq_mean_token_sum": Aggregation(
        seq_mean_token_sum_loss, sequence_count,
        "mean over sequences of each sequence's token sum",
        "RLOO / REINFORCE (Ahmadian et al. 2024)"),
    "seq_mean_token_sum_norm": Aggregation(
        seq_mean_token_sum_norm_loss, sequence_count,
        "mean over sequences of token sums ÷ a constant L (max_len, the generation budget)",
        "Dr. GRPO (Liu et al. 2025)"),
}
AGGREGATIONS = tuple(AGGREGATION_MODES)


def check_aggregation(aggregation, max_len=None):
  if aggregation not in AGGREGATION_MODES:
    raise ValueError(f"unknown loss aggregation {aggregation!r}; expected one of "
                     f"{', '.join(AGGREGATIONS)}")
  if max_len is not None and is_number(max_len) and not max_len > 0:
    raise ValueError(f"loss aggregation: max_len must be > 0, got {max_len}")


def aggregate(loss_BT, mask_BT, aggregation="token_mean", max_len=None):
  """Reduce per-token losses to a scalar with the mode `aggregation` (`AGGREGATION_MODES`); float32.

  With m = mask_BT, n_b = sum_t m[b, t] and S = rows with n_b > 0:

    token_mean               sum_{b,t} m l / sum_{b,t} m                 DAPO (Yu et al. 2025, sec. 3.3,
                                                                         token-level loss); PPO in TRL
    seq_mean_token_mean      mean_{b in S} [sum_t m l / n_b]             GRPO (Shao et al. 2024, eq. 3)
    seq_mean_token_sum       mean_{b in S} [sum_t m l]                   sequence-sum REINFORCE-style
    seq_mean_token_sum_norm  mean_{b in S} [sum_t m l / max_len]         Dr. GRPO (Liu et al. 2025: GRPO
                                                                         without 1/|o_i|; implementations, e.g.
                                                                         TRL's "dr_grpo", divide by a constant,
                                                                         the generation budget)

  max_len (seq_mean_token_sum_norm only) defaults to T = mask_BT.shape[1];
  pass the generation budget (max new tokens) so the constant does not change
  with the padded length of a batch. Rows without real tokens (padding rows)
  are left out of every sequence mean; all-masked batches give 0. Masked
  positions never reach the result, even if they hold inf/NaN.
  """
  check_aggregation(aggregation, max_len)
  return AGGREGATION_MODES[aggregation].fn(loss_BT, mask_BT, max_len)


def micro_batch_weight(mask_BT, aggregation="token_mean"):
  """The share of a micro-batch with mask_BT in a loss aggregated with `aggregation`:
  `AGGREGATION_MODES[aggregation].micro_batch_weight(mask_BT)`, float32 scalar."""
  check_aggregation(aggregation)
  return AGGREGATION_MODES[aggregation].micro_batch_weight(mask_BT)


def token_mean(x_BT, mask_BT):
  """Masked mean over all real tokens (0 if none)."""
  m = f32(mask_BT) > 0
  return jnp.sum(jnp.where(m, f32(x_BT), 0.0)) / jnp.maximum(jnp.sum(m.astype(jnp.float32)), 1.0)


def masked_min_max(x_BT, mask_BT):
  """(min, max) of x over real tokens; (1, 1) when there are none (for ratios)."""
  m = f32(mask_BT) > 0
  x = f32(x_BT)
  any_ = jnp.any(m)
  lo = jnp.where(any_, jnp.min(jnp.where(m, x, jnp.inf)), 1.0)
  hi = jnp.where(any_, jnp.max(jnp.where(m, x, -jnp.inf)), 1.0)
  return lo, hi


def clipped_surrogate(ratio_BT, advantages_BT, clip_eps_low=0.2, clip_eps_high=None, dual_clip=None):
  """Per-token PPO clipped surrogate loss (negated objective) and clip indicators.

      L_t = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high))          (Schulman et al. 2017, eq. 7)
      L_t = min(L_t, -c A)   where A < 0                              (dual clip, Ye et al. 2020)

  eps_high = eps_low when None (symmetric PPO; eps_high > eps_low is DAPO's
  clip-higher). Dual clip (c = dual_clip > 1) bounds the loss of a negative-
  advantage token by -c A when its ratio r > c, so a huge ratio cannot blow the
  update up; those tokens get zero gradient.
  Returns (loss_BT, clipped_low_BT, clipped_high_BT, dual_clipped_BT), the
  booleans marking tokens whose gradient the clip zeroes:
  low: r < 1 - eps_low and A < 0; high: r > 1 + eps_high and A > 0;
  dual: A < 0 and r > c (only with dual_clip).
  """
  eps_high = clip_eps_low if clip_eps_high is None else clip_eps_high
  r, a = f32(ratio_BT), f32(advantages_BT)
  unclipped = -a * r
  clipped = -a * jnp.clip(r, 1.0 - clip_eps_low, 1.0 + eps_high)
  loss = jnp.maximum(unclipped, clipped)
  low = (r < 1.0 - clip_eps_low) & (a < 0)
  high = (r > 1.0 + eps_high) & (a > 0)
  if dual_clip is None:
    dual = jnp.zeros_like(low)
  else:
    bound = -f32(dual_clip) * a
    dual = (a < 0) & (bound < loss)
    loss = jnp.where(a < 0, jnp.minimum(loss, bound), loss)
  return loss, low, high, dual


def check_clip(clip_eps, clip_eps_high, dual_clip):
  if is_number(clip_eps) and not 0 <= clip_eps < 1:
    raise ValueError(f"PPO clip: clip_eps (eps_low) must be in [0, 1), got {clip_eps}")
  if is_number(clip_eps_high) and not clip_eps_high >= 0:
    raise ValueError(f"PPO clip: clip_eps_high must be >= 0, got {clip_eps_high}")
  if is_number(dual_clip) and not dual_clip > 1:
    raise ValueError(f"PPO dual clip: dual_clip (c) must be > 1 (Ye et al. 2020), got {dual_clip}")


def masked_log_ratio(logps_BC, old_logps_BC, mask_BC):
  m = f32(mask_BC) > 0
  return jnp.where(m, f32(logps_BC) - f32(old_logps_BC), 0.0)


def approx_kl_k3(log_ratio_BT, mask_BT):
  """KL(pi_old || pi) per-token k3 estimate on pi_old's samples, token mean.

      k3 = (r - 1) - log r,   r = pi / pi_old   (Schulman 2020)
  """
  return token_mean(k3_from_log_ratio(log_ratio_BT), mask_BT)


def ppo_policy_loss(logps_BC, old_logps_BC, advantages_BC, mask_BC, clip_eps=0.2,
                    clip_eps_high=None, dual_clip=None, aggregation="token_mean", max_len=None,
                    is_weights_BC=None):
  """PPO clipped policy loss (Schulman et al. 2017, eq. 7): (loss, metrics).

      r_t = exp(logp_t - old_logp_t)
      L   = aggregate_t( max(-A_t r_t, -A_t clip(r_t, 1 - eps, 1 + eps_high)) )

  with the optional dual clip (see `clipped_surrogate`) and aggregation mode
  (see `aggregate`; default token_mean). advantages_BC: [B, C] (or [B],
  broadcast over tokens), constants (no gradient flows into them). is_weights_BC: sampler-
  mismatch weights (`is_correction.is_weights`; None = off) multiply L_t before aggregating.
  Metrics: policy_loss; clip_frac = clip_frac_low + clip_frac_high (fractions
  of real tokens whose gradient the clip zeroes); dual_clip_frac; approx_kl
  (k3 estimate of KL(pi_old || pi), Schulman 2020); ratio_mean, ratio_min,
  ratio_max.
  """
  check_clip(clip_eps, clip_eps_high, dual_clip)
  check_aggregation(aggregation, max_len)
  adv = f32(advantages_BC)
  if adv.ndim == 1:
    adv = adv[:, None] * jnp.ones_like(f32(mask_BC))
  check_shapes(logps_BC=logps_BC, old_logps_BC=old_logps_BC, advantages_BC=adv, mask_BC=mask_BC,
               is_weights_BC=is_weights_BC)
  adv = jax.lax.stop_gradient(adv)
  log_ratio = masked_log_ratio(logps_BC, old_logps_BC, mask_BC)
  ratio = jnp.exp(log_ratio)
  loss_BC, low, high, dual = clipped_surrogate(ratio, adv, clip_eps, clip_eps_high, dual_clip)
  if is_weights_BC is not None:  # rollout.is_correction
    loss_BC = loss_BC * jax.lax.stop_gradient(f32(is_weights_BC))
  loss = aggregate(loss_BC, mask_BC, aggregation, max_len)
  return loss, policy_metrics(loss, ratio, log_ratio, low, high, dual, mask_BC, "policy_loss")


def policy_metrics(loss, ratio, log_ratio, low, high, dual, mask_BT, loss_name):
  sg = jax.lax.stop_gradient
  ratio, log_ratio = sg(ratio), sg(log_ratio)
  frac_low = token_mean(low.astype(jnp.float32), mask_BT)
  frac_high = token_mean(high.astype(jnp.float32), mask_BT)
  rmin, rmax = masked_min_max(ratio, mask_BT)
  return {
      loss_name: sg(loss),
      "clip_frac": frac_low + frac_high,
      "clip_frac_low": frac_low,
      "clip_frac_high": frac_high,
      "dual_clip_frac": token_mean(dual.astype(jnp.float32), mask_BT),
      "approx_kl": approx_kl_k3(log_ratio, mask_BT),
      "ratio_mean": token_mean(ratio, mask_BT),
      "ratio_min": rmin,
      "ratio_max": rmax,
  }


def ppo_value_loss(values_BC, old_values_BC, returns_BC, mask_BC, clip_eps=0.2,
                   aggregation="token_mean", max_len=None):
  """Clipped value loss (the N Implementation Details of RLHF with PPO, Huang et al. 2024): (loss, metrics).

      V_clip = V_old + clip(V - V_old, -eps_v, eps_v)
      L      = 0.5 * aggregate_t( max((V - R)^2, (V_clip - R)^2) )

  as in OpenAI's baselines / lm-human-preferences PPO (the "value function
  loss clipping" detail); clip_eps=None is the unclipped 0.5 (V - R)^2.
  returns_BC = GAE returns (A + V_old), constants. Metrics: value_loss,
  value_clip_frac (fraction of real tokens where the clipped error is the
  larger, i.e. the gradient is zeroed), values_mean, returns_mean,
  explained_variance (of the values_BC being trained; pass rollout values to
  `explained_variance` for the classic pre-update diagnostic).
  """
  if is_number(clip_eps) and not clip_eps > 0:
    raise ValueError(f"PPO value loss: clip_eps must be > 0 (or None for no clipping), got {clip_eps}")
  check_aggregation(aggregation, max_len)
  check_shapes(values_BC=values_BC, old_values_BC=old_values_BC, returns_BC=returns_BC,
                mask_BC=mask_BC)
  v, ret = f32(values_BC), jax.lax.stop_gradient(f32(returns_BC))
  err1 = jnp.square(v - ret)
  if clip_eps is None:
    per_BT, clipped = err1, jnp.zeros(err1.shape, bool)
  else:
    v_old = jax.lax.stop_gradient(f32(old_values_BC))
    v_clip = v_old + jnp.clip(v - v_old, -clip_eps, clip_eps)
    err2 = jnp.square(v_clip - ret)
    per_BT, clipped = jnp.maximum(err1, err2), err2 > err1
  loss = 0.5 * aggregate(per_BT, mask_BC, aggregation, max_len)
  sg = jax.lax.stop_gradient
  metrics = {
      "value_loss": sg(loss),
      "value_clip_frac": token_mean(clipped.astype(jnp.float32), mask_BC),
      "values_mean": token_mean(sg(v), mask_BC),
      "returns_mean": token_mean(ret, mask_BC),
      "explained_variance": explained_variance(sg(v), ret, mask_BC),
  }
  return loss, metrics


def explained_variance(values_BT, returns_BT, mask_BT):
  """1 - Var[R - V] / Var[R] over real tokens (population variances), float32 scalar.

  1 = perfect value predictions, 0 = no better than a constant, < 0 = worse.
  Undefined when Var[R] = 0 (constant returns, or < 2 real tokens); reported
  as 0 there rather than NaN.
  """
  m = f32(mask_BT) > 0
  n = jnp.maximum(jnp.sum(m.astype(jnp.float32)), 1.0)

  def var(x):
    x = jnp.where(m, f32(x), 0.0)
    mean = jnp.sum(x) / n
    return jnp.sum(jnp.where(m, jnp.square(x - mean), 0.0)) / n

  var_r = var(returns_BT)
  ev = 1.0 - var(f32(returns_BT) - f32(values_BT)) / jnp.where(var_r > 0, var_r, 1.0)
  return jnp.where(var_r > 0, ev, 0.0)


def entropy_from_logits(logits_BTV, temperature=1.0):
  """Entropy of softmax(logits / temperature) per position, float32 [B, T].

      H = -sum_v p_v log p_v,   p = softmax(z),  z = logits / temperature

  Logits aligned like `logprobs.token_logprobs` (position t predicts token
  t + 1); reduce with the completion mask (`token_mean` / `aggregate`).
  The formula lives in `logprobs.token_entropy` (shared with the chunked path,
  `logprobs.chunked_token_logprobs`).
  """
  return token_entropy(logits_BTV, temperature)


def ppo_loss(logps_BC, old_logps_BC, advantages_BC, values_BC, old_values_BC, returns_BC, mask_BC,
             *, clip_eps=0.2, clip_eps_high=None, dual_clip=None, value_clip_eps=0.2, vf_coef=0.1,
             entropy_BC=None, entropy_coef=0.0, aggregation="token_mean", max_len=None,
             is_weights_BC=None):
  """PPO actor-critic loss for RLHF: (loss, metrics).

      loss = policy_loss + vf_coef * value_loss - entropy_coef * aggregate(entropy)

  policy_loss: `ppo_policy_loss`; value_loss: `ppo_value_loss` (clip
  value_clip_eps; None = unclipped); entropy_BC: optional per-token entropy
  (`entropy_from_logits`) for an entropy bonus, reported as `entropy` when
  given. vf_coef = 0.1 as TRL's PPO default. The KL penalty to the reference
  is *not* here: in PPO-RLHF it is part of the reward (`kl.kl_penalty_rewards`).
  Metrics: loss, the policy and value metrics, entropy.
  """
  pol, pm = ppo_policy_loss(logps_BC, old_logps_BC, advantages_BC, mask_BC, clip_eps, clip_eps_high,
                            dual_clip, aggregation, max_len, is_weights_BC)
  val, vm = ppo_value_loss(values_BC, old_values_BC, returns_BC, mask_BC, value_clip_eps,
                           aggregation, max_len)
  loss = pol + vf_coef * val
  metrics = {**pm, **vm}
  if entropy_BC is not None:
    ent = aggregate(entropy_BC, mask_BC, aggregation, max_len)
    loss = loss - entropy_coef * ent
    metrics["entropy"] = jax.lax.stop_gradient(ent)
  metrics["loss"] = jax.lax.stop_gradient(loss)
  return loss, metrics
