"""KL estimators, KL-penalised rewards and the adaptive KL controller.

Per-token estimators of KL(pi || pi_ref) from samples y ~ pi (Schulman 2020,
"Approximating KL Divergence", http://joschu.net/blog/kl-approx.html). With
the log-ratio d_t = logp_t - ref_logp_t of a sampled token:

    k1 = d                              unbiased, high variance, can be < 0
    k2 = d^2 / 2                        biased (low for small KL), >= 0
    k3 = exp(-d) - (-d) - 1             unbiased, >= 0, low variance
       = pi_ref/pi - log(pi_ref/pi) - 1 (the estimator of GRPO, Shao et al. 2024, eq. 4)

The estimators are the table `KL_ESTIMATORS` (name -> function of d, formula,
bias, paper); `kl_estimate` picks one by name. Arrays are [B, T] over completion
tokens with mask_BT (1 = real token).
All arithmetic is float32.

As *losses* (rather than rewards) the estimators have different gradients from
their values: e.g. E_pi[grad k1] = 0 and grad k2 = d grad log pi, whose
expectation is the gradient of KL(pi || pi_ref) only on-policy (Tang & Munos
2025, "On a few pitfalls in KL divergence gradient estimation for RL"). The
functions here compute the estimators' values; `grpo.grpo_loss` adds one as a
loss term the way GRPO does.
"""
from __future__ import annotations

import dataclasses
import numbers
from typing import Callable

import jax
import jax.numpy as jnp

from rlhf_jax.losses.arrays import f32


def k3_from_log_ratio(x):
  """k3 = r - 1 - log r from x = log r, r = q(y)/p(y) for y ~ p: estimates KL(p || q).

  exp(x) - 1 - x to float32 relative accuracy everywhere (`kl_estimate` "k3"
  uses x = ref_logp - logp).

  expm1(x) - x cancels for small |x| (the value is ~x^2/2 while each term is
  ~x), so |x| < 0.1 uses the Taylor series to x^7 (truncation < 1e-10
  relative); both branches stay finite, so gradients through the where are too.
  """
  small = jnp.abs(x) < 0.1
  xs = jnp.where(small, x, 0.0)
  series = xs * xs * (1 / 2 + xs * (1 / 6 + xs * (1 / 24 + xs * (1 / 120 + xs * (1 / 720 + xs / 5040)))))
  xl = jnp.where(small, 1.0, x)
  return jnp.where(small, series, jnp.expm1(xl) - xl)


# ----------------------------------------------------------------------------
# KL estimators (`config.ppo.kl_estimator`, `config.grpo.kl_estimator`): one entry each
# ----------------------------------------------------------------------------

def k1_from_log_ratio(d_BT):
  """k1 = d, d = log pi(y)/pi_ref(y), y ~ pi (Schulman 2020): unbiased, high variance,
  can be < 0."""
  return d_BT


def k2_from_log_ratio(d_BT):
  """k2 = d^2 / 2, d = log pi(y)/pi_ref(y), y ~ pi (Schulman 2020): biased (low variance,
  bias small for small KL), >= 0."""
  return 0.5 * jnp.square(d_BT)


def k3_from_policy_log_ratio(d_BT):
  """k3 = exp(-d) + d - 1 = pi_ref/pi - log(pi_ref/pi) - 1, d = log pi(y)/pi_ref(y), y ~ pi
  (Schulman 2020; GRPO, Shao et al. 2024, eq. 4): unbiased, >= 0, low variance.
  `k3_from_log_ratio` of -d."""
  return k3_from_log_ratio(-d_BT)


@dataclasses.dataclass(frozen=True)
class KLEstimator:
  """A per-token estimator of KL(pi || pi_ref) from tokens sampled from pi.

  fn(d_BT) -> k_BT, float32, of the log-ratio d = logp - ref_logp of the sampled
  tokens (`kl_estimate` masks and casts around it). formula: k as a function of d.
  unbiased: E_{y~pi}[k] = KL(pi || pi_ref). nonnegative: k >= 0 for every d.
  paper: where it comes from.
  """
  fn: Callable
  formula: str
  unbiased: bool
  nonnegative: bool
  paper: str


KL_ESTIMATORS = {
    "k1": KLEstimator(k1_from_log_ratio, "d", unbiased=True, nonnegative=False,
                      paper="Schulman 2020; the log-ratio penalty of Ziegler et al. 2019"),
    "k2": KLEstimator(k2_from_log_ratio, "d^2 / 2", unbiased=False, nonnegative=True,
                      paper="Schulman 2020"),
    "k3": KLEstimator(k3_from_policy_log_ratio, "exp(-d) + d - 1", unbiased=True,
                      nonnegative=True, paper="Schulman 2020; GRPO (Shao et al. 2024, eq. 4)"),
}
KL_KINDS = tuple(KL_ESTIMATORS)


def _check_kind(kind):
  if kind not in KL_ESTIMATORS:
    raise ValueError(f"unknown KL estimator kind {kind!r}; expected one of {', '.join(KL_KINDS)}")


def kl_estimate(logps_BC, ref_logps_BC, kind="k3", mask_BC=None):
  """Per-token KL(pi || pi_ref) estimate `kind` in KL_KINDS (`KL_ESTIMATORS`), float32 [B, C].

      d  = logp - ref_logp
      k1 = d,   k2 = d^2 / 2,   k3 = exp(-d) + d - 1

  (Schulman 2020, "Approximating KL Divergence"; k3 as in GRPO, Shao et al.
  2024, eq. 4). Tokens must be sampled from pi (the policy whose log-probs are
  logps_BC) for the estimates to be unbiased (k1, k3). With mask_BC, masked
  positions are exactly 0 whatever their inputs hold (no inf/NaN, zero
  gradient).
  """
  _check_kind(kind)
  d = f32(logps_BC) - f32(ref_logps_BC)
  if mask_BC is not None:
    d = jnp.where(f32(mask_BC) > 0, d, 0.0)
  k = KL_ESTIMATORS[kind].fn(d)
  if mask_BC is not None:
    k = jnp.where(f32(mask_BC) > 0, k, 0.0)
  return k


def last_token_index(mask_BT):
  """(index_B, has_token_B): position of the last real token of each row, int32 [B].

  Rows without any real token get index 0 and has_token False.
  """
  m = f32(mask_BT) > 0
  T = m.shape[-1]
  index_B = (T - 1 - jnp.argmax(m[:, ::-1], axis=-1)).astype(jnp.int32)
  has_B = jnp.any(m, axis=-1)
  return jnp.where(has_B, index_B, 0), has_B


def kl_penalty_rewards(logps_BC, ref_logps_BC, mask_BC, beta, kind="k1", scores_B=None):
  """Per-token rewards with a KL penalty: float32 [B, C], 0 at masked positions.

      R_t = -beta * k_t(logp_t, ref_logp_t)   + [t = last real token] * score

  The KL-shaped reward of Ziegler et al. (2019, "Fine-Tuning Language Models
  from Human Preferences", sec. 2.2: R(x, y) = r(x, y) - beta log(pi/pi_ref))
  and Ouyang et al. (2022, InstructGPT, eq. 2), spread over tokens as in their
  PPO code: each token pays -beta k_t and the sequence score r(x, y) is paid at
  the last real completion token. `kind` = "k1" (default) is the log-ratio of
  those papers; REINFORCE++ (Hu 2025) uses the same k1 per-token penalty.
  logps_BC are the log-probs of the sampling policy (pi_old at rollout time).
  scores_B=None adds no score (only the penalty). All-masked rows are all 0.
  The result is a reward, not a loss: no gradient is meant to flow through it
  (wrap the inputs in stop_gradient, or compute it outside the loss).
  """
  m = f32(mask_BC)
  rewards_BC = -f32(beta) * kl_estimate(logps_BC, ref_logps_BC, kind, mask_BC=m)
  if scores_B is not None:
    index_B, has_B = last_token_index(m)
    onehot_BT = jax.nn.one_hot(index_B, m.shape[-1], dtype=jnp.float32) * has_B[:, None]
    rewards_BC = rewards_BC + onehot_BT * f32(scores_B)[:, None]
  return rewards_BC


# ----------------------------------------------------------------------------- KL controllers

def kl_controller_init(init_beta):
  """State of a KL coefficient controller: {"beta": float32 scalar}.

  A plain dict of arrays, so it is a pytree that jit, sharding and orbax
  checkpoints handle as is. A *fixed* controller is this state never updated
  (or updated with target=None).
  """
  if isinstance(init_beta, numbers.Real) and not init_beta >= 0:
    raise ValueError(f"KL controller: init_beta must be >= 0, got {init_beta}")
  return {"beta": f32(init_beta)}


def kl_controller_update(state, observed_kl, n_steps, target, horizon):
  """Adaptive KL controller step (Ziegler et al. 2019, sec. 2.2): new state.

      e    = clip(observed_kl / target - 1, -0.2, 0.2)      (proportional error)
      beta <- beta * (1 + e * n_steps / horizon)

  observed_kl is the current KL(pi || pi_ref) estimate (per sequence, as in
  the paper: summed over tokens, averaged over the batch), n_steps the number
  of samples (episodes) since the last update, horizon the paper's K_beta
  time-scale (the paper's gain K_beta is n_steps / horizon; TRL's classic
  PPOConfig defaults are target 6 nats, horizon 10000). target=None is the
  fixed controller: the state is returned unchanged. Pure: jit-able; arrays
  may be traced.
  """
  if target is None:
    return state
  if isinstance(target, numbers.Real) and not target > 0:
    raise ValueError(f"KL controller: target must be > 0 (or None for a fixed beta), got {target}")
  if isinstance(horizon, numbers.Real) and not horizon > 0:
    raise ValueError(f"KL controller: horizon must be > 0, got {horizon}")
  error = jnp.clip(f32(observed_kl) / f32(target) - 1.0, -0.2, 0.2)
  beta = state["beta"] * (1.0 + error * f32(n_steps) / f32(horizon))
  return {**state, "beta": beta.astype(jnp.float32)}
