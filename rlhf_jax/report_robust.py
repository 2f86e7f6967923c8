"""Robust statistics of the comparison report: interquartile mean, stratified percentile
bootstrap CIs, probability of improvement and performance profiles (Agarwal et al. 2021,
"Deep Reinforcement Learning at the Edge of the Statistical Precipice", arXiv:2108.13264),
the seeds needed for 80% power, and the ScaleRL compute-scaling sigmoid fit (Khatri et al.
2025, "The Art of Scaling Reinforcement Learning Compute", arXiv:2510.13786).

Every bootstrap here is seeded (`seed`, default DEFAULT_SEED): the same inputs give the same
intervals. Intervals are clipped to the metric's known range (`metric_range`).
"""
from __future__ import annotations

import math
import re

import numpy as np

from rlhf_jax.report_runs import NAN, Run

DEFAULT_SEED = 0
DEFAULT_REPS = 2000  # bootstrap resamples of the aggregates (rliable's default)
FIT_REPS = 200       # bootstrap resamples of the compute-scaling fit (one fit each)
INF = math.inf

# Known ranges by metric name (re.fullmatch, first match wins); anything else is unbounded.
# KL is >= 0 even when its k1 estimate (mean of log-ratios of samples) dips below.
KNOWN_RANGES = (
    (r"(.*_)?(accuracy|exact_match|finished|repetition_rate)(/.*)?", (0.0, 1.0)),
    (r"(.*_)?kl(/.*)?", (0.0, INF)),
    (r"elapsed_s|(.*_)?(nll|length)(/.*)?", (0.0, INF)),
)


def metric_range(metric: str, overrides: dict | None = None) -> tuple[float, float]:
  """(low, high) a metric's value can take: `overrides[metric]`, else KNOWN_RANGES, else (-inf, inf)."""
  if overrides and metric in overrides:
    low, high = overrides[metric]
    return (-INF if low is None else float(low), INF if high is None else float(high))
  return next((r for p, r in KNOWN_RANGES if re.fullmatch(p, metric)), (-INF, INF))


def _clean(x) -> np.ndarray:
  x = np.asarray(x, np.float64).ravel()
  return x[~np.isnan(x)]


def iqm(x, axis: int = -1):
  """Interquartile mean: the mean of the middle 50% of the values, scipy.stats.trim_mean(x, 0.25)
  (int(0.25 n) values cut from each end, as rliable does; with n < 4 nothing is cut: the mean).

  Agarwal et al. 2021: less sensitive to an outlier seed than the mean, far less noisy than the
  median."""
  from scipy import stats
  return stats.trim_mean(x, 0.25, axis=axis)


def _mean(x, axis: int = -1):
  return np.mean(x, axis=axis)


def bootstrap_ci(strata, statistic=_mean, confidence: float = 0.95, reps: int = DEFAULT_REPS,
                 seed: int = DEFAULT_SEED, value_range=(-INF, INF)) -> tuple[float, float, float, int]:
  """Stratified percentile bootstrap CI of `statistic` over runs: (estimate, low, high, n).

  strata: one array of per-run (per-seed) scores per task/metric. Each of `reps` resamples
  draws, within every stratum separately, as many runs as it has, with replacement
  (rng = np.random.default_rng(seed), stratum by stratum: the draws of scipy.stats.bootstrap
  with the strata as its samples); `statistic(all drawn scores, axis=-1)` is computed on each
  resample, and [low, high] are its (1 - c)/2 and (1 + c)/2 quantiles (linear interpolation),
  clipped to `value_range`. NaNs are dropped; n is the number of runs left. When no stratum
  has 2 runs there is no interval (low = high = nan).
  """
  strata = [s for s in map(_clean, strata) if s.size]
  n = sum(s.size for s in strata)
  if n == 0:
    return NAN, NAN, NAN, 0
  estimate = float(statistic(np.concatenate(strata), axis=-1))
  if max(s.size for s in strata) < 2:
    return estimate, NAN, NAN, n
  rng = np.random.default_rng(seed)
  draws = np.concatenate([s[rng.integers(0, s.size, (reps, s.size))] for s in strata], axis=1)
  with np.errstate(invalid="ignore"):  # an inf value: nan bounds (no interval), not a warning
    low, high = np.quantile(statistic(draws, axis=-1), [(1 - confidence) / 2, (1 + confidence) / 2])
  lo, hi = value_range
  return estimate, float(np.clip(low, lo, hi)), float(np.clip(high, lo, hi)), n


def robust_stats(values, confidence: float = 0.95, reps: int = DEFAULT_REPS,
                 seed: int = DEFAULT_SEED, value_range=(-INF, INF)) -> dict:
  """IQM and mean of per-seed values, each with its bootstrap CI (bootstrap_ci)."""
  q, ql, qh, n = bootstrap_ci([values], iqm, confidence, reps, seed, value_range)
  m, ml, mh, _ = bootstrap_ci([values], _mean, confidence, reps, seed, value_range)
  return dict(n=n, iqm=q, iqm_boot_low=ql, iqm_boot_high=qh, mean=m, mean_boot_low=ml,
              mean_boot_high=mh)


# ----------------------------------------------------------------------------- pairs of arms

def _poi(x, y):
  """P(X > Y) of arrays [..., n] and [..., m]: mean over all (i, j) of 1[x_i > y_j] + 1[x_i = y_j] / 2."""
  xi, yj = x[..., :, None], y[..., None, :]
  return np.mean((xi > yj) + 0.5 * (xi == yj), axis=(-2, -1))


def prob_improvement(x, y, confidence: float = 0.95, reps: int = DEFAULT_REPS,
                     seed: int = DEFAULT_SEED) -> tuple[float, float, float]:
  """Probability of improvement P(X > Y) of arm X over arm Y, with a bootstrap CI: (p, low, high).

  p = U / (n m) = (1 / (n m)) sum_i sum_j (1[x_i > y_j] + 1[x_i = y_j] / 2), U the Mann-Whitney U
  statistic of X's n and Y's m per-seed values (Agarwal et al. 2021): the chance that a random
  seed of X beats a random seed of Y; 0.5 = no difference. It says how often, not by how much.
  CI: percentile bootstrap resampling X's and Y's seeds independently (stratified per arm,
  rng draws X then Y); no interval when both arms have one seed.
  """
  x, y = _clean(x), _clean(y)
  if not (x.size and y.size):
    return NAN, NAN, NAN
  p = float(_poi(x, y))
  if max(x.size, y.size) < 2:
    return p, NAN, NAN
  rng = np.random.default_rng(seed)
  xb, yb = x[rng.integers(0, x.size, (reps, x.size))], y[rng.integers(0, y.size, (reps, y.size))]
  chunk = max(1, 2 ** 22 // (x.size * y.size))
  dist = np.concatenate([_poi(xb[i:i + chunk], yb[i:i + chunk]) for i in range(0, reps, chunk)])
  low, high = np.quantile(dist, [(1 - confidence) / 2, (1 + confidence) / 2])
  return p, float(low), float(high)


def seeds_needed(x, y, alpha: float = 0.05, power: float = 0.8) -> tuple[float, float, float]:
  """Seeds per arm to detect the observed difference of means: (n, d, s²).

  n = ceil(2 (z_{1-α/2} + z_{power})² s² / d²), at least 2, with d = mean(X) - mean(Y) and
  s² = (s_X² + s_Y²) / 2 the mean of the per-seed sample variances (ddof = 1): the normal-
  approximation sample size of a two-sided two-sample test at level α (default 0.05) with the
  given power (default 0.8; z_{0.975} = 1.96, z_{0.8} = 0.84, so n ≈ 15.7 s² / d²). The
  t-test needs a seed or two more at small n. nan when an arm has < 2 seeds; inf when d = 0.
  """
  from scipy import stats
  x, y = _clean(x), _clean(y)
  if min(x.size, y.size) < 2:
    return NAN, NAN, NAN
  d, s2 = float(x.mean() - y.mean()), float((x.var(ddof=1) + y.var(ddof=1)) / 2)
  if d == 0:
    return INF, d, s2
  z = stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)
  return float(max(2, math.ceil(2 * z ** 2 * s2 / d ** 2))), d, s2


def performance_profile(values, taus, confidence: float = 0.95, reps: int = DEFAULT_REPS,
                        seed: int = DEFAULT_SEED) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Score distribution (Agarwal et al. 2021): the fraction of runs with value > tau at each tau,
  with a percentile bootstrap band over runs: (fraction, low, high); low = high = nan for 1 run."""
  x, taus = _clean(values), np.asarray(taus, np.float64)
  frac = np.mean(x[:, None] > taus[None, :], axis=0) if x.size else np.full(taus.shape, NAN)
  if x.size < 2:
    return frac, np.full(taus.shape, NAN), np.full(taus.shape, NAN)
  xb = x[np.random.default_rng(seed).integers(0, x.size, (reps, x.size))]
  dist = np.mean(xb[:, :, None] > taus[None, None, :], axis=1)
  low, high = np.quantile(dist, [(1 - confidence) / 2, (1 + confidence) / 2], axis=0)
  return frac, low, high


# ----------------------------------------------------------------------------- compute scaling

def scaling_curve(c, r0: float, a: float, b: float, c_mid: float) -> np.ndarray:
  """ScaleRL's R(C) = R0 + (A - R0) / (1 + (C_mid / C)^B); R(0) = R0."""
  from scipy.special import expit
  with np.errstate(divide="ignore"):
    log_c = np.log(np.asarray(c, np.float64))
  return r0 + (a - r0) * expit(b * (log_c - math.log(c_mid)))


B_BOUNDS = (0.05, 20.0)
C_MID_SPAN = 100.0  # C_mid searched within [min C / span, max C * span] (C > 0)
MIN_DISTINCT_C = 5


def _not_identified(reason: str, n: int) -> dict:
  return dict(status=f"not identified: {reason}", r0=NAN, a=NAN, b=NAN, c_mid=NAN, r2=NAN, n_points=n)


def fit_scaling(c, r, start=None) -> dict:
  """Least-squares fit of the ScaleRL compute-scaling sigmoid (Khatri et al. 2025):

      R(C) = R0 + (A - R0) / (1 + (C_mid / C)^B)

  A: the asymptote (performance with unlimited compute), B > 0: the efficiency (steepness in
  log C), C_mid: the compute at which half of the gain A - R0 is reached, R0: the start
  (C = 0 points pin it). Fitted in (R0, A, B, ln C_mid) by scipy.optimize.least_squares from
  several starts (or from `start`), B in B_BOUNDS, C_mid within C_MID_SPAN of the data.

  Returns dict(status, r0, a, b, c_mid, r2, n_points). status is "ok" or "not identified:
  <reason>" (then every parameter is nan, never a silent number): fewer than MIN_DISTINCT_C
  distinct C values, no convergence, a flat curve, B or C_mid at the edge of its search range
  (the curve has not bent within the data), or parameters the points do not determine
  (near-singular Jacobian). Points with C < 0 or non-finite values are dropped.
  """
  from scipy.optimize import least_squares
  c, r = np.asarray(c, np.float64).ravel(), np.asarray(r, np.float64).ravel()
  keep = np.isfinite(c) & np.isfinite(r) & (c >= 0)
  c, r = c[keep], r[keep]
  n, pos = c.size, c[c > 0]
  if np.unique(c).size < MIN_DISTINCT_C or pos.size == 0:
    return _not_identified(f"too few points ({np.unique(c).size} distinct compute values, "
                           f"need {MIN_DISTINCT_C})", n)
  if np.ptp(r) <= 1e-12 * max(1.0, np.abs(r).max()):
    return _not_identified("flat curve", n)
  lo = np.array([-INF, -INF, B_BOUNDS[0], math.log(pos.min() / C_MID_SPAN)])
  hi = np.array([INF, INF, B_BOUNDS[1], math.log(pos.max() * C_MID_SPAN)])
  with np.errstate(divide="ignore"):
    log_c = np.log(c)

  def resid(th):
    from scipy.special import expit
    return th[0] + (th[1] - th[0]) * expit(th[2] * (log_c - th[3])) - r

  if start is None:
    order = np.argsort(c)
    r_lo, r_hi = float(r[order[:max(1, n // 5)]].mean()), float(r[order[-max(1, n // 5):]].mean())
    starts = [(r_lo, r_hi, b0, m0) for b0 in (0.5, 1.0, 3.0)
              for m0 in np.quantile(np.log(pos), (0.25, 0.5, 0.75))]
  else:
    r0, a, b, c_mid = start
    starts = [(r0, a, min(max(b, B_BOUNDS[0]), B_BOUNDS[1]), math.log(c_mid))]
  best = None
  for th0 in starts:
    th0 = np.clip(np.array(th0, np.float64), lo + 1e-9, hi - 1e-9)
    try:
      res = least_squares(resid, th0, bounds=(lo, hi), x_scale="jac", max_nfev=2000)
    except (ValueError, FloatingPointError):
      continue
    if res.success and (best is None or res.cost < best.cost):
      best = res
  if best is None:
    return _not_identified("the fit did not converge", n)
  th = best.x
  edge = np.abs(th[2:] - lo[2:]) < 1e-4, np.abs(th[2:] - hi[2:]) < 1e-4
  if (edge[0] | edge[1]).any():
    which = " and ".join(p for p, e in zip(("B", "C_mid"), edge[0] | edge[1]) if e)
    return _not_identified(f"{which} at the edge of the search range (the curve does not bend "
                           "within the data)", n)
  jac = best.jac / np.maximum(np.linalg.norm(best.jac, axis=0), 1e-300)
  sv = np.linalg.svd(jac, compute_uv=False)
  if not np.isfinite(sv).all() or sv[-1] < 1e-6 * sv[0]:
    return _not_identified("the points do not determine all four parameters", n)
  ss_tot = float(np.sum((r - r.mean()) ** 2))
  return dict(status="ok", r0=float(th[0]), a=float(th[1]), b=float(th[2]), c_mid=float(math.exp(th[3])),
              r2=1 - 2 * float(best.cost) / ss_tot, n_points=n)


def scaling_points(run: Run, metric: str, x: str) -> tuple[np.ndarray, np.ndarray]:
  """(C, R): `x` (a cumulative column, or "step") and `metric` at the steps logging both."""
  steps, r = run.series(metric)
  if x == "step":
    return steps.astype(np.float64), r
  cx = dict(zip(*run.series(x)))
  ok = [i for i, s in enumerate(steps) if s in cx]
  return np.array([cx[steps[i]] for i in ok], np.float64), r[ok]


def fit_scaling_seeds(runs: list[Run], metric: str, x: str, confidence: float = 0.95,
                      reps: int = FIT_REPS, seed: int = DEFAULT_SEED) -> dict:
  """fit_scaling on the points of every seed pooled, and percentile bootstrap CIs over seeds.

  Each resample draws as many seeds as there are, with replacement, pools their points and
  refits (started from the full fit); `a_low`, `a_high`, ... are the (1 ± c)/2 quantiles over the
  resamples whose fit is identified, `boot_ok` their fraction. With 1 seed, or when fewer than
  half of the resamples are identified, the intervals are nan (see `status`, `boot_ok`).
  """
  pts = [p for p in (scaling_points(r, metric, x) for r in runs) if p[0].size]
  fit = (fit_scaling(np.concatenate([p[0] for p in pts]), np.concatenate([p[1] for p in pts]))
         if pts else _not_identified(f"`{metric}` and `{x}` never logged together", 0))
  fit.update(n_seeds=len(pts), boot_ok=NAN, **{f"{k}_{e}": NAN for k in ("a", "b", "c_mid")
                                                 for e in ("low", "high")})
  if fit["status"] != "ok" or len(pts) < 2:
    return fit
  rng, got = np.random.default_rng(seed), []
  start = (fit["r0"], fit["a"], fit["b"], fit["c_mid"])
  for _ in range(reps):
    idx = rng.integers(0, len(pts), len(pts))
    f = fit_scaling(np.concatenate([pts[i][0] for i in idx]), np.concatenate([pts[i][1] for i in idx]),
                    start=start)
    if f["status"] == "ok":
      got.append((f["a"], f["b"], f["c_mid"]))
  fit["boot_ok"] = len(got) / reps
  if fit["boot_ok"] >= 0.5:
    q = np.quantile(np.array(got), [(1 - confidence) / 2, (1 + confidence) / 2], axis=0)
    for j, k in enumerate(("a", "b", "c_mid")):
      fit[f"{k}_low"], fit[f"{k}_high"] = float(q[0, j]), float(q[1, j])
  return fit


# ----------------------------------------------------------------------------- equal compute, samples, KL

def on_grid(run: Run, metric: str, x: str, grid) -> np.ndarray:
  """`metric` of one run linearly interpolated at the points `grid` of its column `x`, from
  the rows logging both, sorted by x (stable): a cumulative counter (flops/total,
  samples/completions) or a measured one (eval_kl: the curve through the eval points in
  order of KL); nan outside the run's logged x range."""
  c, r = scaling_points(run, metric, x)
  order = np.argsort(c, kind="stable")
  c, r = c[order], r[order]
  out = np.full(len(grid), NAN)
  if c.size:
    inside = (np.asarray(grid) >= c[0]) & (np.asarray(grid) <= c[-1])
    out[inside] = np.interp(np.asarray(grid)[inside], c, r)
  return out


def compute_budget(groups: dict, metric: str, x: str) -> float:
  """The largest `x` every run of every group reached while logging `metric` (nan if a run
  never logs both): the budget of the equal-x table."""
  ends = []
  for rs in groups.values():
    for r in rs:
      c, _ = scaling_points(r, metric, x)
      ends.append(float(c.max()) if c.size else NAN)
  return float(min(ends)) if ends and not np.isnan(ends).any() else NAN


def equal_x(groups: dict, metric: str, x: str = "flops/total", points: int = 25,
            confidence: float = 0.95, reps: int = DEFAULT_REPS, seed: int = DEFAULT_SEED,
            value_range=(-INF, INF), budget: float | None = None) -> dict:
  """Every run's `metric` on a common grid of `points` values of `x` from 0 to the budget
  (default `compute_budget`: the largest x every run reached), and per group, at each grid
  point, the mean over seeds with its bootstrap CI (`bootstrap_ci`): the arms compared at
  equal compute (x = flops/total), equal samples (samples/completions) or equal KL (eval_kl).
  Returns {"budget", "grid", group: {"values" [seeds, points], "mean", "low", "high", "n"}
  (each [points]; "at_budget": robust_stats at the budget)}."""
  budget = compute_budget(groups, metric, x) if budget is None else budget
  out = {"budget": budget, "grid": np.array([])}
  if not np.isfinite(budget) or budget <= 0:
    return out
  grid = np.linspace(0.0, budget, points)
  out["grid"] = grid
  for g, rs in groups.items():
    vals = np.array([on_grid(r, metric, x, grid) for r in rs])
    stats = [bootstrap_ci([vals[:, j]], _mean, confidence, reps, seed, value_range)
             for j in range(points)]
    mean, low, high, n = (np.array(v) for v in zip(*stats))
    out[g] = dict(values=vals, mean=mean, low=low, high=high, n=n,
                  at_budget=robust_stats(vals[:, -1], confidence, reps, seed, value_range))
  return out


def frontier(groups: dict, metric: str, kl: str, points: int = 25, confidence: float = 0.95,
             reps: int = DEFAULT_REPS, seed: int = DEFAULT_SEED, value_range=(-INF, INF)) -> dict:
  """The reward-KL frontier of each group with a band: `equal_x` of `metric` over `kl` for
  the group alone, from KL 0 to the largest KL all of the group's seeds reached (each group
  its own range, unlike the equal-KL table's common budget). {group: equal_x result}."""
  return {g: equal_x({g: rs}, metric, kl, points, confidence, reps, seed, value_range)
          for g, rs in groups.items()}
