"""Figures of the comparison report (matplotlib, Agg): metric curves vs step and wall-clock,
the reward vs KL frontier, gold / proxy reward gain vs sqrt(KL), performance profiles and the
compute-scaling fit.
"""
from __future__ import annotations

import math

import numpy as np

from rlhf_jax.report_stats import mean_ci, mean_curve


def _figure(ncols: int, title: str):
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=(5.5 * ncols, 4.2), layout="constrained")
  FigureCanvasAgg(fig)
  fig.suptitle(title)
  return fig, fig.subplots(1, ncols, squeeze=False)[0]


def axis_label(metric: str) -> str:
  """The metric name with its unit (KL in nats, accuracy as a fraction, elapsed_s in seconds)."""
  name = metric.lower()
  unit = ("nats" if "kl" in name else "fraction" if "accuracy" in name or "match" in name
          else "s" if metric == "elapsed_s" else "")
  return f"{metric} ({unit})" if unit else metric


def _err(mean, low, high):
  return [[0.0 if math.isnan(low) else mean - low], [0.0 if math.isnan(high) else high - mean]]


def plot_curves(groups: dict, labels: dict, metric: str, path: str, confidence: float) -> bool:
  """`metric` vs step and vs wall-clock (when elapsed_s is logged): per group mean + CI band.

  Returns whether the wall-clock panel was drawn."""
  curves = {g: mean_curve(rs, metric, confidence) for g, rs in groups.items()}
  has_time = any(c is not None and np.isfinite(c["elapsed"]).any() for c in curves.values())
  xs = [("step", "step")] + ([("elapsed", "wall-clock (s)")] if has_time else [])
  fig, axes = _figure(len(xs), f"{metric}: mean over seeds, {confidence:.0%} CI band")
  for ax, (key, xlabel) in zip(axes, xs):
    for i, (g, c) in enumerate(curves.items()):
      if c is None:
        continue
      ok = np.isfinite(c[key])
      ax.plot(c[key][ok], c["mean"][ok], color=f"C{i % 10}", marker=".",
              label=f"{labels.get(g, g)} (n={c['n']})")
      ax.fill_between(c[key][ok], c["low"][ok], c["high"][ok], color=f"C{i % 10}", alpha=0.2)
    ax.set(xlabel=xlabel, ylabel=axis_label(metric), title=f"{metric} vs {xlabel}")
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  fig.savefig(path, dpi=110)
  return has_time


def _band(ax, grid, c: dict, color: str, label: str, seeds: bool = True) -> None:
  """A group's mean over seeds on a grid with its band (an `equal_x` entry); faint seed lines."""
  if seeds:
    for v in c["values"]:
      ax.plot(grid, v, color=color, alpha=0.25, lw=0.8)
  ax.plot(grid, c["mean"], color=color, marker=".", ms=3, label=label)
  ok = np.isfinite(c["low"]) & np.isfinite(c["high"])
  ax.fill_between(grid[ok], c["low"][ok], c["high"][ok], color=color, alpha=0.2)


def plot_frontier(groups: dict, labels: dict, kl: str, ys: list[str], fronts: dict, path: str,
                  confidence: float) -> None:
  """Reward(s) vs KL: per group the frontier through its eval points (`report_robust.frontier`:
  mean over seeds on the group's own KL range, bootstrap band), final values of the seeds as
  faint points, and the group mean of the finals with CI bars (a group whose KL never moved,
  e.g. the start policy, is that point alone)."""
  fig, axes = _figure(len(ys), f"Reward vs KL frontier (mean over seeds, {confidence:.0%} band)")
  for ax, y in zip(axes, ys):
    for i, (g, rs) in enumerate(groups.items()):
      color, label = f"C{i % 10}", f"{labels.get(g, g)} (n={len(rs)})"
      f = fronts.get(y, {}).get(g)
      if f is not None and len(f["grid"]) and f["budget"] > 0:
        _band(ax, f["grid"], f[g], color, label, seeds=False)
        label = None
      pts = np.array([(r.final(kl), r.final(y)) for r in rs]).reshape(-1, 2)
      pts = pts[np.isfinite(pts).all(axis=1)]
      if not len(pts):
        continue
      (mx, xl, xh, n), (my, yl, yh, _) = mean_ci(pts[:, 0], confidence), mean_ci(pts[:, 1], confidence)
      ax.scatter(pts[:, 0], pts[:, 1], color=color, alpha=0.3, s=14)
      ax.errorbar([mx], [my], xerr=_err(mx, xl, xh), yerr=_err(my, yl, yh), fmt="o", capsize=3,
                  color=color, label=label, mfc="white")
    ax.set(xlabel=f"{kl}: KL (nats)", ylabel=y, title=f"{y} vs {kl}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.savefig(path, dpi=110)


def plot_overoptimisation(groups: dict, labels: dict, points: dict, fits: dict, path: str) -> None:
  """Gold and proxy reward gain vs sqrt(KL), mean over seeds per eval step; dashed Gao fit on gold."""
  fig, axes = _figure(2, "Over-optimisation: reward gain over step 0 vs sqrt(KL), mean over seeds")
  for i, g in enumerate(groups):
    per_seed = [p for p in points[g] if p]
    if not per_seed:
      continue
    steps = sorted(set.intersection(*(set(p) for p in per_seed)))
    mean = np.array([[np.mean([p[t][j] for p in per_seed]) for j in range(3)] for t in steps]).reshape(-1, 3)
    for ax, j in zip(axes, (1, 2)):
      ax.plot(mean[:, 0], mean[:, j], color=f"C{i % 10}", marker="o", ms=3,
              label=f"{labels.get(g, g)} (n={len(per_seed)})")
    alpha, beta = fits[g]
    if np.isfinite(alpha) and len(mean) and mean[:, 0].max() > 0:
      d = np.linspace(1e-6, mean[:, 0].max() * 1.1, 100)
      axes[0].plot(d, d * (alpha - beta * np.log(d)), "--", color=f"C{i % 10}", alpha=0.8,
                   label=f"{labels.get(g, g)} fit α={alpha:.3g} β={beta:.3g}")
  for ax, name in zip(axes, ("gold", "proxy")):
    ax.set(xlabel="sqrt(KL) (nats^0.5)", ylabel=f"{name} reward gain over step 0",
           title=f"{name} reward" + (" (dashed: Gao et al. 2022 fit)" if name == "gold" else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.savefig(path, dpi=110)


def plot_profiles(groups: dict, labels: dict, metrics: list[str], path: str, confidence: float,
                  reps: int, seed: int) -> None:
  """Performance profiles (Agarwal et al. 2021): per metric, the fraction of a group's seeds whose
  final value exceeds tau over a grid of tau, with a bootstrap band over seeds."""
  from rlhf_jax.report_robust import performance_profile
  fig, axes = _figure(len(metrics), f"Performance profiles (final values, {confidence:.0%} bootstrap band)")
  for ax, m in zip(axes, metrics):
    finals = {g: np.array([r.final(m) for r in rs]) for g, rs in groups.items()}
    pooled = np.concatenate([v[np.isfinite(v)] for v in finals.values()] + [np.zeros(0)])
    if not pooled.size:
      continue
    span = max(float(np.ptp(pooled)), 1e-6)
    taus = np.linspace(pooled.min() - 0.05 * span, pooled.max() + 0.05 * span, 201)
    for i, (g, v) in enumerate(finals.items()):
      v = v[np.isfinite(v)]
      if not v.size:
        continue
      frac, low, high = performance_profile(v, taus, confidence, reps, seed)
      ax.step(taus, frac, where="post", color=f"C{i % 10}", label=f"{labels.get(g, g)} (n={v.size})")
      if v.size > 1:
        ax.fill_between(taus, low, high, step="post", color=f"C{i % 10}", alpha=0.15)
    ax.set(xlabel=f"τ: final {axis_label(m)}", ylabel=f"fraction of seeds with {m} > τ",
           ylim=(-0.02, 1.02), title=m)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.savefig(path, dpi=110)


def plot_scaling(groups: dict, labels: dict, metric: str, x: str, fits: list[dict], path: str) -> None:
  """`metric` vs the cumulative column `x`: every seed's points (faint) and, where the fit is
  identified, the ScaleRL sigmoid (dashed) with its asymptote A (dotted)."""
  from rlhf_jax.report_robust import scaling_curve, scaling_points
  by_group = {f["group"]: f for f in fits}
  fig, axes = _figure(1, f"Compute scaling: {metric} vs {x} (ScaleRL sigmoid fit)")
  ax = axes[0]
  for i, (g, rs) in enumerate(groups.items()):
    color, f = f"C{i % 10}", by_group.get(g, {})
    pts = [scaling_points(r, metric, x) for r in rs]
    for j, (cs, ys) in enumerate(pts):
      ax.plot(cs, ys, ".", color=color, alpha=0.35, label=None if j else labels.get(g, g))
    if f.get("status") == "ok":
      top = max((float(cs.max()) for cs, _ in pts if cs.size), default=1.0)
      grid = np.linspace(0, top * 1.05, 200)
      ax.plot(grid, scaling_curve(grid, f["r0"], f["a"], f["b"], f["c_mid"]), "--", color=color,
              label=f"fit A={f['a']:.3g} B={f['b']:.3g} C_mid={f['c_mid']:.3g}")
      ax.axhline(f["a"], color=color, ls=":", alpha=0.5)
  ax.set(xlabel=x, ylabel=axis_label(metric))
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.savefig(path, dpi=110)


def plot_equal(groups: dict, labels: dict, metric: str, x: str, eq: dict, path: str,
               confidence: float, baselines: dict | None = None) -> None:
  """`metric` vs `x` on the common grid (`report_robust.equal_x`): per arm the mean over
  seeds with its bootstrap band, faint lines the seeds; the dotted line marks the budget
  of the equal-x table; baselines ({label: value}) are dashed horizontal lines."""
  fig, axes = _figure(1, f"{metric} vs {x}: mean over seeds, {confidence:.0%} bootstrap band")
  ax, grid = axes[0], eq["grid"]
  for i, g in enumerate(groups):
    if g in eq:
      _band(ax, grid, eq[g], f"C{i % 10}", f"{labels.get(g, g)} (n={len(eq[g]['values'])})")
  for j, (label, value) in enumerate((baselines or {}).items()):
    ax.axhline(value, color="k", ls="--", lw=1, alpha=0.6 - 0.15 * j, label=label)
  ax.axvline(eq["budget"], color="k", ls=":", lw=1)
  ax.set(xlabel=x, ylabel=axis_label(metric), title=f"{metric} vs {x}")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.savefig(path, dpi=110)
