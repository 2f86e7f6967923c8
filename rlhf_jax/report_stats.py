"""Statistics of the comparison report: Student-t confidence intervals over seeds, final and
per-step means, the Gao et al. (2022) over-optimisation fit and its points.
"""
from __future__ import annotations

import math

import numpy as np

from rlhf_jax.report_runs import NAN, Run


def mean_ci(values, confidence: float = 0.95) -> tuple[float, float, float, int]:
  """Mean and Student-t confidence interval over seeds: (mean, low, high, n).

  mean ± t_{(1+c)/2, n-1} · s / sqrt(n), with s the sample standard deviation (ddof=1)
  and c the confidence. NaNs are dropped first; n = 1 gives low = high = nan; n = 0
  gives nan everywhere.
  """
  from scipy import stats
  x = np.asarray(values, dtype=np.float64).ravel()
  x = x[~np.isnan(x)]
  if x.size == 0:
    return NAN, NAN, NAN, 0
  mean = float(x.mean())
  if x.size == 1:
    return mean, NAN, NAN, 1
  half = float(stats.t.ppf((1 + confidence) / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
  return mean, mean - half, mean + half, int(x.size)


def fit_gao(d, r) -> tuple[float, float, float]:
  """Least-squares fit of R(d) = d (alpha - beta ln d): (alpha, beta, R²).

  The RL functional form of Gao, Schulman & Hilton 2022, "Scaling Laws for Reward Model
  Overoptimization" (arXiv:2210.10760): d = sqrt(KL(policy || initial)) and R the gold
  reward gain over the initial policy. Linear in (alpha, beta). Points with d <= 0 or
  non-finite values are dropped; fewer than 2 points give nans.
  """
  d, r = np.asarray(d, np.float64).ravel(), np.asarray(r, np.float64).ravel()
  keep = np.isfinite(d) & np.isfinite(r) & (d > 0)
  d, r = d[keep], r[keep]
  if d.size < 2:
    return NAN, NAN, NAN
  design = np.stack([d, -d * np.log(d)], axis=1)
  (alpha, beta), *_ = np.linalg.lstsq(design, r, rcond=None)
  ss_res, ss_tot = np.sum((r - design @ [alpha, beta]) ** 2), np.sum((r - r.mean()) ** 2)
  return float(alpha), float(beta), float(1 - ss_res / ss_tot) if ss_tot > 0 else NAN


def final_stats(runs: list[Run], metric: str, confidence: float, paired: bool = True):
  """Per-seed finals of `metric`, their mean/CI, and the paired change vs each seed's first value."""
  finals = [(r.seed, v[-1], v[-1] - v[0]) for r in runs for v in [r.series(metric)[1]] if v.size]
  if not finals:
    return None
  seeds, values, deltas = zip(*finals)
  mean, low, high, n = mean_ci(values, confidence)
  dmean, dlow, dhigh, _ = mean_ci(deltas if paired else [], confidence)
  std = float(np.nanstd(values, ddof=1)) if n > 1 else NAN
  return dict(metric=metric, n=n, mean=mean, std=std, ci_low=low, ci_high=high, delta_mean=dmean,
              delta_ci_low=dlow, delta_ci_high=dhigh, values=list(values), seeds=list(seeds))


def mean_curve(runs: list[Run], metric: str, confidence: float):
  """Mean and CI over seeds at the steps every seed (that logs `metric`) logged it.

  Also `elapsed`: the mean over seeds of elapsed_s at those steps (nan where absent).
  """
  series = [(r, dict(zip(*r.series(metric)))) for r in runs]
  series = [(r, s) for r, s in series if s]
  if not series:
    return None
  steps = sorted(set.intersection(*(set(s) for _, s in series)))
  vals = np.array([[s[t] for t in steps] for _, s in series]).reshape(len(series), len(steps))
  cis = np.array([mean_ci(vals[:, j], confidence)[:3] for j in range(len(steps))]).reshape(-1, 3)
  el = [dict(zip(*r.series("elapsed_s"))) for r, _ in series]
  elapsed = np.array([[e.get(t, NAN) for t in steps] for e in el]).reshape(len(series), len(steps))
  with np.errstate(all="ignore"):
    elapsed = np.array([np.nanmean(c) if np.isfinite(c).any() else NAN for c in elapsed.T])
  return dict(step=np.array(steps, np.float64), elapsed=elapsed, mean=cis[:, 0], low=cis[:, 1],
              high=cis[:, 2], n=len(series))


def gain_points(run: Run, gold: str, proxy: str, kl: str) -> dict:
  """{step: (sqrt(KL), gold gain, proxy gain)} at steps logging all three; gains vs the run's first value."""
  g, p, k = (dict(zip(*run.series(m))) for m in (gold, proxy, kl))
  if not (g and p and k):
    return {}
  g0, p0 = g[min(g)], p[min(p)]
  return {t: (math.sqrt(max(k[t], 0.0)), g[t] - g0, p[t] - p0) for t in sorted(g.keys() & p.keys() & k.keys())}
