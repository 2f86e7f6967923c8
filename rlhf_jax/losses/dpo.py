"""Offline preference losses: DPO and its variants.

Every variant is a pure function of per-sequence log-probabilities returning
per-row losses and the implicit rewards it optimises,
`(losses_B, chosen_rewards_B, rejected_rewards_B)`; `preference_loss` picks one
by name (`config.dpo.loss_type`), reduces over rows and builds the metrics.

Inputs are *sequence sums* of completion-token log-probs, log pi(y | x) =
sum_t log pi(y_t | x, y_<t) (see `logprobs.sequence_logprobs`), and completion
lengths |y| (token counts). Notation:

    r_w = log pi(y_w|x) - log pi_ref(y_w|x)      (chosen log-ratio)
    r_l = log pi(y_l|x) - log pi_ref(y_l|x)      (rejected log-ratio)
    h   = r_w - r_l

All arithmetic is float32; -log sigmoid is always `-jax.nn.log_sigmoid`.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from rlhf_jax.losses.arrays import f32, is_number, weighted_mean
from rlhf_jax.losses.reward import pairwise_accuracy

# ORPO: mean token log-prob is clamped to <= this before log(1 - p), so that
# p = 1 (odds = inf) cannot produce inf/NaN; log-odds are then <= ~16.1.
_ORPO_MAX_MEAN_LOGP = -1e-7


def sigmoid_losses(chosen_logratios_B, rejected_logratios_B, beta, label_smoothing=0.0):
  """DPO (Rafailov et al. 2023), with conservative label smoothing (cDPO).

      L = (1 - eps) * (-log sigmoid(beta h)) + eps * (-log sigmoid(-beta h))

  eps = label_smoothing is the assumed probability that a label is flipped
  (Mitchell 2023, "A note on DPO with noisy preferences"); eps = 0 is DPO.
  With eps > 0 the optimum is at finite h = log((1 - eps) / eps) / beta.
  Rewards: beta * r_w, beta * r_l.
  """
  c, r = f32(chosen_logratios_B), f32(rejected_logratios_B)
  z = beta * (c - r)
  losses = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(z) - label_smoothing * jax.nn.log_sigmoid(-z)
  return losses, beta * c, beta * r


def robust_losses(chosen_logratios_B, rejected_logratios_B, beta, label_smoothing=0.0):
  """Robust DPO (Chowdhury et al. 2024, "Provably Robust DPO"), eq. (8).

      L = [(1 - eps) * (-log sigmoid(beta h)) - eps * (-log sigmoid(-beta h))] / (1 - 2 eps)

  An unbiased estimate of the clean-label DPO loss when labels flip with
  probability eps = label_smoothing (needs eps < 1/2). eps = 0 is DPO. Note
  the loss can be negative and is unbounded below in h for eps > 0 (it is a
  de-biased estimate, not a likelihood). Rewards: beta * r_w, beta * r_l.
  """
  c, r = f32(chosen_logratios_B), f32(rejected_logratios_B)
  z = beta * (c - r)
  losses = ((1.0 - label_smoothing) * -jax.nn.log_sigmoid(z)
            - label_smoothing * -jax.nn.log_sigmoid(-z)) / (1.0 - 2.0 * label_smoothing)
  return losses, beta * c, beta * r


def ipo_losses(chosen_logratios_B, rejected_logratios_B, beta):
  """IPO (Azar et al. 2023, "A General Theoretical Paradigm ..."), eq. (17).

      L = (h - 1 / (2 beta))^2

  beta plays the role of the paper's regulariser tau. h uses *sequence-sum*
  log-probs, as in the paper (TRL instead averages log-probs per token before
  forming h; that is a different loss whose target margin does not grow with
  length). The minimum, zero loss and zero gradient, is at h = 1 / (2 beta):
  unlike DPO, IPO does not push the margin to infinity.
  Rewards: beta * r_w, beta * r_l.
  """
  c, r = f32(chosen_logratios_B), f32(rejected_logratios_B)
  losses = jnp.square((c - r) - 1.0 / (2.0 * beta))
  return losses, beta * c, beta * r


def hinge_losses(chosen_logratios_B, rejected_logratios_B, beta):
  """SLiC-style hinge (Zhao et al. 2023, "SLiC-HF"), as in RSO (Liu et al. 2024).

      L = max(0, 1 - beta h)

  i.e. the SLiC calibration loss max(0, delta - (log pi(y_w) - log pi(y_l)))
  with margin delta = 1/beta, applied to reference log-ratios (with
  reference_free=True it is SLiC's calibration loss itself; SLiC's separate
  SFT regulariser is not included). Zero once beta h >= 1.
  Rewards: beta * r_w, beta * r_l.
  """
  c, r = f32(chosen_logratios_B), f32(rejected_logratios_B)
  losses = jax.nn.relu(1.0 - beta * (c - r))
  return losses, beta * c, beta * r


def simpo_losses(policy_chosen_logps_B, policy_rejected_logps_B, chosen_lengths_B,
                 rejected_lengths_B, beta, gamma):
  """SimPO (Meng et al. 2024), eq. (6): reference-free, length-normalised.

      R(y) = beta / |y| * log pi(y|x)
      L = -log sigmoid(R(y_w) - R(y_l) - gamma)

  gamma = simpo_gamma is the absolute target reward margin, the paper's gamma
  (TRL's `simpo_gamma` is the same quantity; the SimPO reference code is
  configured with gamma_beta_ratio = gamma / beta instead). Lengths are
  clamped to >= 1. Rewards: R(y_w), R(y_l).
  """
  rw = beta * f32(policy_chosen_logps_B) / jnp.maximum(f32(chosen_lengths_B), 1.0)
  rl = beta * f32(policy_rejected_logps_B) / jnp.maximum(f32(rejected_lengths_B), 1.0)
  return -jax.nn.log_sigmoid(rw - rl - gamma), rw, rl


def log1mexp(x):
  """log(1 - exp(x)) for x <= 0, accurate everywhere (Maechler 2012).

  log(-expm1(x)) near 0, log1p(-exp(x)) for x < -log 2. -inf at x = 0.
  """
  x = f32(x)
  near0 = x > -0.6931471805599453
  # Each branch is evaluated at a point where it is finite, so gradients through
  # the where() stay finite.
  a = jnp.log(-jnp.expm1(jnp.where(near0, x, -1.0)))
  b = jnp.log1p(-jnp.exp(jnp.where(near0, -1.0, x)))
  return jnp.where(near0, a, b)


def orpo_losses(policy_chosen_logps_B, policy_rejected_logps_B, chosen_lengths_B,
                rejected_lengths_B, lam, chosen_nll_B=None):
  """ORPO (Hong et al. 2024), eqs. (2)-(7): SFT plus an odds-ratio term, no reference.

      P(y)      = exp(log pi(y|x) / |y|)              (length-normalised likelihood)
      log odds  = log P - log(1 - P)                  (log(1 - P) via log1mexp)
      L = NLL(y_w) + lam * (-log sigmoid(log odds(y_w) - log odds(y_l)))

  NLL(y_w) = chosen_nll_B if given, else the per-row token-mean NLL
  -log pi(y_w|x) / |y_w|; the batch loss then averages rows (the paper's
  L_SFT is the token-mean NLL; the reference code averages over all chosen
  tokens of the batch, which equals this when lengths are equal; pass
  chosen_nll_B to choose otherwise). The mean log-prob is clamped to
  <= -1e-7 before log(1 - P) (P = 1 would give infinite odds).
  Rewards (for metrics): the log-odds of y_w and y_l.
  """
  mean_w = f32(policy_chosen_logps_B) / jnp.maximum(f32(chosen_lengths_B), 1.0)
  mean_l = f32(policy_rejected_logps_B) / jnp.maximum(f32(rejected_lengths_B), 1.0)
  mean_w = jnp.minimum(mean_w, _ORPO_MAX_MEAN_LOGP)
  mean_l = jnp.minimum(mean_l, _ORPO_MAX_MEAN_LOGP)
  log_odds_w = mean_w - log1mexp(mean_w)
  log_odds_l = mean_l - log1mexp(mean_l)
  nll_B = (-f32(policy_chosen_logps_B) / jnp.maximum(f32(chosen_lengths_B), 1.0)
           if chosen_nll_B is None else f32(chosen_nll_B))
  losses = nll_B - lam * jax.nn.log_sigmoid(log_odds_w - log_odds_l)
  return losses, log_odds_w, log_odds_l


def kto_losses(chosen_logratios_B, rejected_logratios_B, beta, z0, desirable_weight=1.0,
               undesirable_weight=1.0):
  """KTO (Ethayarajh et al. 2024), eq. (8), on paired data.

      z0   = max(0, stop_gradient(z0))                 (KL reference point)
      L_d  = 1 - sigmoid(beta (r_w - z0))               (y_w treated as desirable)
      L_u  = 1 - sigmoid(beta (z0 - r_l))               (y_l treated as undesirable)
      L    = (lambda_D L_d + lambda_U L_u) / 2

  Halving makes the row mean the mean over all 2B examples, as in the paper's
  expectation over (x, y) and TRL's KTO trainer. lambda_D, lambda_U =
  desirable_weight, undesirable_weight (the paper suggests
  lambda_D n_D / (lambda_U n_U) in [1, 4/3]; paired data has n_D = n_U).
  z0 should come from `kto_reference_point` on mismatched pairs.
  Rewards: beta * r_w, beta * r_l.
  """
  c, r = f32(chosen_logratios_B), f32(rejected_logratios_B)
  z0 = jnp.maximum(jax.lax.stop_gradient(f32(z0)), 0.0)
  loss_d = jax.nn.sigmoid(-beta * (c - z0))  # = 1 - sigmoid(beta (c - z0))
  loss_u = jax.nn.sigmoid(-beta * (z0 - r))
  losses = 0.5 * (desirable_weight * loss_d + undesirable_weight * loss_u)
  return losses, beta * c, beta * r


def kto_reference_point(policy_logps_B, ref_logps_B, weights_B=None):
  """KTO's reference point z0 = max(0, mean_b[log pi(y'_b|x_b) - log pi_ref(y'_b|x_b)]).

  The caller scores *mismatched* pairs (x_b, y'_b), e.g. each prompt with the
  completion of another row (y'_b = y_{(b+1) mod B}), under policy and
  reference; the mean log-ratio is then a biased but cheap estimate of
  KL(pi || pi_ref) (Ethayarajh et al. 2024, sec. 4.2). Returned under
  stop_gradient (no gradient flows through z0), float32 scalar. Under jit
  with a sharded batch the mean is over the global batch.
  """
  diff_B = f32(policy_logps_B) - f32(ref_logps_B)
  return jax.lax.stop_gradient(jnp.maximum(weighted_mean(diff_B, weights_B), 0.0))


# ----------------------------------------------------------------------------
# The registry: one entry per loss type
# ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PairInputs:
  """What a loss variant may read, all [B] float32: sequence-sum log-probs of the policy,
  log-ratios to the reference (0 when reference-free), completion lengths, and the
  optional per-row chosen NLL (ORPO)."""
  policy_chosen_logps: jax.Array
  policy_rejected_logps: jax.Array
  chosen_logratios: jax.Array
  rejected_logratios: jax.Array
  chosen_lengths: jax.Array
  rejected_lengths: jax.Array
  chosen_nll: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class LossVariant:
  """One DPO-family loss type: how `preference_loss` calls it and what trainers need.

  losses(x: PairInputs, k: dict of knobs) -> (losses_B, chosen_rewards_B,
  rejected_rewards_B); extra_metrics(x, out, k, weights_B) -> dict of additional
  metrics. knobs: the config.dpo keys it reads (besides reference_free).
  uses_reference: reads pi_ref log-probs (unless reference_free). sides: the rows the
  trainer scores per pair ("kl": KTO's mismatched prompt/completion rows).
  label_smoothing: (max, max included) of its allowed range [0, max], or None when it
  takes no label smoothing. whole_batch: the loss uses a statistic of the whole batch
  (so gradient accumulation over micro-batches would change it).
  """
  losses: Callable
  knobs: tuple[str, ...]
  uses_reference: bool = True
  sides: tuple[str, ...] = ("chosen", "rejected")
  label_smoothing: tuple[float, bool] | None = None
  whole_batch: bool = False
  extra_metrics: Callable | None = None


def _orpo_metrics(x, out, k, weights_B):
  nll_B = (-x.policy_chosen_logps / jnp.maximum(x.chosen_lengths, 1.0)
           if x.chosen_nll is None else x.chosen_nll)
  return {"nll": weighted_mean(nll_B, weights_B),
          "log_odds_ratio": weighted_mean(out[1] - out[2], weights_B)}


LOSSES = {
    "sigmoid": LossVariant(
        lambda x, k: sigmoid_losses(x.chosen_logratios, x.rejected_logratios, k["beta"],
                                    k["label_smoothing"]),
        knobs=("beta", "label_smoothing"), label_smoothing=(0.5, True)),
    "robust": LossVariant(
        lambda x, k: robust_losses(x.chosen_logratios, x.rejected_logratios, k["beta"],
                                   k["label_smoothing"]),
        knobs=("beta", "label_smoothing"), label_smoothing=(0.5, False)),
    "ipo": LossVariant(
        lambda x, k: ipo_losses(x.chosen_logratios, x.rejected_logratios, k["beta"]),
        knobs=("beta",)),
    "hinge": LossVariant(
        lambda x, k: hinge_losses(x.chosen_logratios, x.rejected_logratios, k["beta"]),
        knobs=("beta",)),
    "simpo": LossVariant(
        lambda x, k: simpo_losses(x.policy_chosen_logps, x.policy_rejected_logps,
                                  x.chosen_lengths, x.rejected_lengths, k["beta"],
                                  k["simpo_gamma"]),
        knobs=("beta", "simpo_gamma"), uses_reference=False),
    "orpo": LossVariant(
        lambda x, k: orpo_losses(x.policy_chosen_logps, x.policy_rejected_logps,
                                 x.chosen_lengths, x.rejected_lengths, k["orpo_lambda"],
                                 x.chosen_nll),
        knobs=("orpo_lambda",), uses_reference=False, extra_metrics=_orpo_metrics),
    "kto": LossVariant(
        lambda x, k: kto_losses(x.chosen_logratios, x.rejected_logratios, k["beta"],
                                k["kto_z0"], k["kto_desirable_weight"],
                                k["kto_undesirable_weight"]),
        knobs=("beta", "kto_desirable_weight", "kto_undesirable_weight"),
        sides=("chosen", "rejected", "kl"), whole_batch=True,
        extra_metrics=lambda x, out, k, w: {
            "kto_z0": jnp.maximum(jax.lax.stop_gradient(f32(k["kto_z0"])), 0.0)}),
}
LOSS_TYPES = tuple(LOSSES)


def variant(loss_type: str) -> LossVariant:
  """The registry entry of `loss_type`; ValueError naming the known ones."""
  if loss_type not in LOSSES:
    raise ValueError(f"unknown preference loss_type {loss_type!r}; expected one of "
                     f"{', '.join(LOSS_TYPES)}")
  return LOSSES[loss_type]


def label_smoothing_error(loss_type: str, label_smoothing) -> str | None:
  """Why `label_smoothing` is not allowed with `loss_type` (None when it is)."""
  allowed = variant(loss_type).label_smoothing
  if allowed is None:
    if label_smoothing != 0.0:
      return (f"applies only to loss_type {' or '.join(repr(n) for n, v in LOSSES.items() if v.label_smoothing)}, "
              f"not {loss_type!r} (got {label_smoothing})")
    return None
  hi, closed = allowed
  if not (0.0 <= label_smoothing <= hi if closed else 0.0 <= label_smoothing < hi):
    return (f"must be in [0, {hi}{']' if closed else ')'} for loss_type {loss_type!r}, "
            f"got {label_smoothing}")
  return None


def _validate(loss_type, beta, label_smoothing, kto_z0, have_ref):
  v = variant(loss_type)
  if is_number(beta) and not beta > 0:
    raise ValueError(f"preference loss: beta must be > 0, got {beta}")
  if is_number(label_smoothing):
    why = label_smoothing_error(loss_type, label_smoothing)
    if why:
      raise ValueError(f"label_smoothing {why}")
  if "kl" in v.sides and kto_z0 is None:
    raise ValueError(f"loss_type {loss_type!r} needs kto_z0: compute it with "
                     f"kto_reference_point() from mismatched prompt/completion pairs (or "
                     f"pass 0.0)")
  if v.uses_reference and not have_ref:
    raise ValueError(f"loss_type {loss_type!r} needs ref_chosen_logps_B and ref_rejected_logps_B "
                     "(or reference_free=True)")


def preference_loss(loss_type, *, policy_chosen_logps_B, policy_rejected_logps_B,
                    ref_chosen_logps_B=None, ref_rejected_logps_B=None, chosen_lengths_B,
                    rejected_lengths_B, chosen_nll_B=None, beta, label_smoothing=0.0,
                    simpo_gamma=0.5, orpo_lambda=0.1, kto_z0=None, kto_desirable_weight=1.0,
                    kto_undesirable_weight=1.0, reference_free=False, weights_B=None,
                    **knobs):
  """Pairwise preference loss `loss_type` in LOSS_TYPES: (loss, metrics).

      loss = mean_b losses_B[b]           (weighted by weights_B; weight 0 = padding row)

  The loss type's entry in `LOSSES` says which knobs it reads (a new variant's own
  knobs arrive through **knobs). loss_type -> knobs used (see each *_losses function
  for formula and paper):
    sigmoid  DPO / cDPO            beta, label_smoothing
    robust   robust DPO            beta, label_smoothing (< 0.5)
    ipo      IPO                   beta (= tau), sequence-sum log-ratios
    hinge    SLiC hinge            beta
    simpo    SimPO                 beta, simpo_gamma; reference-free, length-normalised
    orpo     ORPO                  orpo_lambda (beta unused); reference-free
    kto      KTO                   beta, kto_z0, kto_desirable_weight, kto_undesirable_weight

  Log-probs are sequence sums over completion tokens, lengths are completion
  token counts, all [B]. reference_free=True sets the reference log-probs to 0
  (simpo and orpo never use them; they may be None there).

  Metrics (float32 scalars, row means):
    loss; chosen_reward, rejected_reward, reward_margin (chosen - rejected) of
    the variant's implicit reward: beta (log pi - log pi_ref) for
    sigmoid/robust/ipo/hinge/kto, beta/|y| log pi for simpo, the log-odds
    log P - log(1 - P) for orpo; reward_accuracy (chosen reward > rejected,
    ties count 0.5); policy_chosen_logps, policy_rejected_logps (sequence
    sums); kl_chosen = mean_b (log pi(y_w) - log pi_ref(y_w)) / |y_w|, a
    per-token estimate of KL(pi || pi_ref) on the chosen completions (biased:
    y_w comes from the data, not from pi; 0-reference when reference_free or
    no reference is given, then it is just the chosen per-token NLL negated).
    orpo adds nll and log_odds_ratio; kto adds kto_z0.
  """
  have_ref = ref_chosen_logps_B is not None and ref_rejected_logps_B is not None
  _validate(loss_type, beta, label_smoothing, kto_z0, have_ref or reference_free)
  pc = f32(policy_chosen_logps_B)
  pr = f32(policy_rejected_logps_B)
  if reference_free or not have_ref:
    rc, rr = jnp.zeros_like(pc), jnp.zeros_like(pr)
  else:
    rc, rr = f32(ref_chosen_logps_B), f32(ref_rejected_logps_B)
  chosen_logratios_B, rejected_logratios_B = pc - rc, pr - rr
  v = LOSSES[loss_type]
  x = PairInputs(pc, pr, chosen_logratios_B, rejected_logratios_B, f32(chosen_lengths_B),
                 f32(rejected_lengths_B), None if chosen_nll_B is None else f32(chosen_nll_B))
  k = dict(beta=beta, label_smoothing=label_smoothing, simpo_gamma=simpo_gamma,
           orpo_lambda=orpo_lambda, kto_z0=kto_z0, kto_desirable_weight=kto_desirable_weight,
           kto_undesirable_weight=kto_undesirable_weight, **knobs)
  out = v.losses(x, k)
  extra = v.extra_metrics(x, out, k, weights_B) if v.extra_metrics else {}
  losses_B, chosen_rewards_B, rejected_rewards_B = out
  loss = weighted_mean(losses_B, weights_B)
  kl_B = chosen_logratios_B / jnp.maximum(f32(chosen_lengths_B), 1.0)
  sg = jax.lax.stop_gradient
  metrics = {
      "loss": loss,
      "reward_accuracy": pairwise_accuracy(sg(chosen_rewards_B), sg(rejected_rewards_B), weights_B),
      "chosen_reward": weighted_mean(sg(chosen_rewards_B), weights_B),
      "rejected_reward": weighted_mean(sg(rejected_rewards_B), weights_B),
      "reward_margin": weighted_mean(sg(chosen_rewards_B - rejected_rewards_B), weights_B),
      "policy_chosen_logps": weighted_mean(sg(pc), weights_B),
      "policy_rejected_logps": weighted_mean(sg(pr), weights_B),
      "kl_chosen": weighted_mean(sg(kl_B), weights_B),
      **{k: sg(v) for k, v in extra.items()},
  }
  return loss, metrics
