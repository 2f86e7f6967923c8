"""Multi-seed comparison report: `rlhf-jax report DIR [DIR...] [--out=DIR] ...`.

Any directory under the given paths holding a `metrics.jsonl` is a run. Runs are
grouped (algorithm / sweep cell) with one run per seed, and OUT receives:

  report.md                  readable on its own: runs, final-metric table, figures, fits
  report.csv                 final metrics, long format, one row per (group, metric)
  <metric>.png               metric vs step and vs wall-clock, mean and CI band per group
  frontier.png               final reward vs final KL per group
  gold_proxy_vs_sqrt_kl.png  over-optimisation plot, with fits.csv (Gao et al. 2022 fit)

Metric names it relies on: `step`; `eval_*` / `capability_*` evaluations (step 0 =
before training); `elapsed_s` wall-clock seconds; `eval_kl` KL to the reference in
nats; `eval_reward`, `eval_reward/gold`, `eval_reward/proxy` rewards. Options can be
given as arguments or as the "report" dict of a `sweep.json` in a given path.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field

import numpy as np

NAN = float("nan")
OPTION_KEYS = ("metrics", "gold", "proxy", "kl", "reward", "capability", "groups", "exclude",
               "title", "labels")
DEFAULTS = {"gold": "eval_reward/gold", "proxy": "eval_reward/proxy", "kl": "eval_kl",
            "reward": "eval_reward"}
CSV_COLUMNS = ("group", "label", "metric", "n", "mean", "std", "ci_low", "ci_high", "delta_mean",
               "delta_ci_low", "delta_ci_high", "values")
_SEED_DIR = re.compile(r"seed[-_]?(\d+)")
_NAME_SEED = re.compile(r"(.+?)[-_]seed[-_]?(\d+)")
_SKIP_DIRS = {"checkpoints", "events", "tfds"}


class ReportError(Exception):
  """A user error; main() prints it as one line `error: ...` and exits 2."""


@dataclass
class Run:
  group: str
  seed: int
  workdir: str
  rows: list = field(default_factory=list)
  finished: bool | None = None  # last step >= config.json num_steps; None when unknown

  @property
  def last_step(self) -> int:
    return max((r["step"] for r in self.rows), default=-1)

  def series(self, metric: str):
    """(steps, values) of the rows logging `metric` as a number, by step."""
    by_step = {r["step"]: float(r[metric]) for r in self.rows
               if isinstance(r.get(metric), (int, float)) and not isinstance(r[metric], bool)}
    steps = sorted(by_step)
    return np.array(steps, dtype=np.int64), np.array([by_step[s] for s in steps], dtype=np.float64)

  def final(self, metric: str) -> float:
    """Value in the last row that logs `metric` (nan if none)."""
    values = self.series(metric)[1]
    return float(values[-1]) if values.size else NAN


# ----------------------------------------------------------------------------- loading

def _read_json(path: str, strict: bool = False) -> dict:
  try:
    with open(path) as f:
      obj = json.load(f)
  except FileNotFoundError:
    return {}
  except (OSError, json.JSONDecodeError) as e:
    if strict:
      raise ReportError(f"cannot read {path}: {e}") from None
    return {}
  return obj if isinstance(obj, dict) else {}


def _number(v):
  """The strings metrics.py writes for non-finite floats ("nan", "inf", "-inf") -> float."""
  if isinstance(v, str) and v.strip().lower() in ("nan", "inf", "-inf", "+inf", "infinity",
                                                  "-infinity"):
    return float(v)
  return v


def read_metrics(path: str) -> list[dict]:
  """Rows of a metrics.jsonl; malformed lines (a run killed mid-write) are skipped."""
  from rlhf_jax.metrics import read_jsonl
  return [{k: _number(v) for k, v in row.items()} for row in read_jsonl(path)
          if isinstance(row.get("step"), int)]


def _group_seed(run_dir: str, root: str, config: dict) -> tuple[str, int]:
  """seed-<k>/ -> (parent relative to root, k); grpo_seed2 -> ("grpo", 2); else (name, config seed)."""
  name = os.path.basename(run_dir)
  if m := _SEED_DIR.fullmatch(name):
    parent = os.path.dirname(run_dir)
    rel = os.path.relpath(parent, root)
    group = os.path.basename(parent) if rel == "." or rel.startswith("..") else rel
    return group.replace(os.sep, "/"), int(m[1])
  if m := _NAME_SEED.fullmatch(name):
    return m[1], int(m[2])
  try:
    return name, int(config.get("seed", 0))
  except (TypeError, ValueError):
    return name, 0


def discover(paths: list[str]) -> list[Run]:
  """Every directory under `paths` (recursively) with a metrics.jsonl, as a Run."""
  runs, seen = [], set()
  for root in paths:
    if not os.path.isdir(root):
      raise ReportError(f"not a directory: {root}")
    root = os.path.abspath(root)
    for d, subdirs, files in os.walk(root):
      subdirs[:] = sorted(s for s in subdirs if s not in _SKIP_DIRS)
      if "metrics.jsonl" not in files or os.path.realpath(d) in seen:
        continue
      seen.add(os.path.realpath(d))
      config = _read_json(os.path.join(d, "config.json"))
      run = Run(*_group_seed(d, root, config), d, read_metrics(os.path.join(d, "metrics.jsonl")))
      if isinstance(config.get("num_steps"), int) and run.rows:
        run.finished = run.last_step >= config["num_steps"]
      runs.append(run)
  return sorted(runs, key=lambda r: (r.group, r.seed, r.workdir))


# ----------------------------------------------------------------------------- statistics

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


# ----------------------------------------------------------------------------- plotting

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


def plot_frontier(groups: dict, labels: dict, kl: str, ys: list[str], path: str,
                  confidence: float) -> None:
  """Final reward(s) vs final KL: per group mean with CI bars on both axes, faint points per seed."""
  fig, axes = _figure(len(ys), f"Reward vs KL frontier (final values, {confidence:.0%} CI over seeds)")
  for ax, y in zip(axes, ys):
    for i, (g, rs) in enumerate(groups.items()):
      pts = np.array([(r.final(kl), r.final(y)) for r in rs]).reshape(-1, 2)
      pts = pts[np.isfinite(pts).all(axis=1)]
      if not len(pts):
        continue
      (mx, xl, xh, n), (my, yl, yh, _) = mean_ci(pts[:, 0], confidence), mean_ci(pts[:, 1], confidence)
      ax.scatter(pts[:, 0], pts[:, 1], color=f"C{i % 10}", alpha=0.25, s=14)
      ax.errorbar([mx], [my], xerr=_err(mx, xl, xh), yerr=_err(my, yl, yh), fmt="o", capsize=3,
                  color=f"C{i % 10}", label=f"{labels.get(g, g)} (n={n})")
    ax.set(xlabel=f"final {kl}: KL (nats)", ylabel=f"final {y}", title=f"{y} vs {kl}")
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


# ----------------------------------------------------------------------------- options

def _as_list(v) -> list[str]:
  """None / "a,b" / ["a", "b"] -> ["a", "b"]."""
  items = [] if v is None else v.split(",") if isinstance(v, str) else v
  return [str(s).strip() for s in items if str(s).strip()]


def _check_known(names, known, what: str) -> None:
  bad = [n for n in names if n not in known]
  if bad:
    hint = ", ".join(sorted(known)[:12]) + (", ..." if len(known) > 12 else "")
    raise ReportError(f"unknown {what} {', '.join(map(repr, bad))}; found: {hint}")


def select(runs: list[Run], paths: list[str], explicit: dict) -> dict:
  """Options: explicit arguments (checked: unknown names are errors) over the "report" dict of
  the first sweep.json giving them (unknown names there are ignored), then defaults.

  Returns groups (name -> runs, display order: listed groups first, then the rest sorted;
  excluded groups dropped), labels, title, gold/proxy/kl/reward (a metric key or None),
  curves (metrics plotted) and capability (metrics for the alignment tax).
  """
  keys = {k for r in runs for row in r.rows for k in row} - {"step"}
  _check_known(_as_list(explicit["metrics"]) + _as_list(explicit["capability"])
               + [explicit[k] for k in DEFAULTS if explicit[k]], keys, "metric")
  _check_known(_as_list(explicit["groups"]) + _as_list(explicit["exclude"]),
               {r.group for r in runs}, "group")
  opts = {}
  for p in paths:
    rep = _read_json(os.path.join(p, "sweep.json"), strict=True).get("report")
    opts.update({k: v for k, v in (rep.items() if isinstance(rep, dict) else ())
                 if k in OPTION_KEYS and k not in opts})
  opts.update({k: v for k, v in explicit.items() if v})
  sel = {k: v if v in keys else None for k, v in ((k, opts.get(k) or d) for k, d in DEFAULTS.items())}

  def listed(name, prefixes):  # the option's known metrics, else every key with these prefixes
    return ([m for m in _as_list(opts.get(name)) if m in keys]
            or sorted(k for k in keys if k.startswith(prefixes)))
  sel.update(curves=listed("metrics", ("eval_", "capability_")),
             capability=listed("capability", ("capability_",)), keys=keys,
             labels={str(k): str(v) for k, v in (opts.get("labels") or {}).items()},
             title=opts.get("title") or "Run comparison: " + ", ".join(paths))
  excluded, order = set(_as_list(opts.get("exclude"))), _as_list(opts.get("groups"))
  by_group = {}
  for r in runs:
    if r.group not in excluded:
      by_group.setdefault(r.group, []).append(r)
  if not by_group:
    raise ReportError("every group is excluded")
  names = [g for g in order if g in by_group] + sorted(g for g in by_group if g not in order)
  sel["groups"] = {g: by_group[g] for g in names}
  return sel


# ----------------------------------------------------------------------------- outputs

def final_table(sel: dict, confidence: float) -> dict:
  """{(group, metric): final_stats + group/label} for the plotted, role and capability metrics,
  plus final elapsed_s (wall-clock, no delta)."""
  metrics = list(dict.fromkeys(sel["curves"] + [sel[k] for k in DEFAULTS if sel[k]]
                               + sel["capability"] + ["elapsed_s"]))
  table = {}
  for m in (m for m in metrics if m in sel["keys"]):
    for g, rs in sel["groups"].items():
      s = final_stats(rs, m, confidence, paired=m != "elapsed_s")
      if s is not None:
        table[g, m] = dict(s, group=g, label=sel["labels"].get(g, g))
  return table


def _write_csv(path: str, header, rows: list[dict]) -> None:
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=header, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)


def write_figures(sel: dict, out_dir: str, confidence: float) -> tuple[list, list]:
  """Writes the PNGs (and fits.csv); returns ([(file, caption)], [fit rows])."""
  groups, labels, figures, fit_rows = sel["groups"], sel["labels"], [], []
  for m in sel["curves"]:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", m).strip("_") + ".png"
    timed = plot_curves(groups, labels, m, os.path.join(out_dir, name), confidence)
    figures.append((name, f"{m} vs step{' and wall-clock' if timed else ''}: mean over seeds, "
                    f"shaded {confidence:.0%} CI."))
  gold, proxy, kl = sel["gold"], sel["proxy"], sel["kl"]
  ys = [gold, proxy] if gold and proxy else [sel["reward"] or gold or proxy]
  if kl and ys[0]:
    plot_frontier(groups, labels, kl, ys, os.path.join(out_dir, "frontier.png"), confidence)
    figures.append(("frontier.png", "Final reward vs final KL: group mean with CI bars on both "
                    "axes; faint points are seeds."))
  if gold and proxy and kl:
    points = {g: [gain_points(r, gold, proxy, kl) for r in rs] for g, rs in groups.items()}
    for g, ps in points.items():
      d, r = np.array([v[:2] for p in ps for v in p.values()]).reshape(-1, 2).T
      alpha, beta, r2 = fit_gao(d, r)
      fit_rows.append(dict(group=g, label=labels.get(g, g), alpha=alpha, beta=beta, r2=r2,
                           n_points=int(np.sum(d > 0))))
    plot_overoptimisation(groups, labels, points, {f["group"]: (f["alpha"], f["beta"]) for f in fit_rows},
                          os.path.join(out_dir, "gold_proxy_vs_sqrt_kl.png"))
    figures.append(("gold_proxy_vs_sqrt_kl.png", "Gold and proxy reward gain over step 0 vs "
                    "sqrt(KL) at each eval step (mean over seeds); dashed: Gao et al. fit to gold."))
    _write_csv(os.path.join(out_dir, "fits.csv"),
               ("group", "label", "alpha", "beta", "r2", "n_points"), fit_rows)
  return figures, fit_rows


def _f(x) -> str:
  return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4g}"


def _ci(s: dict, prefix: str = "", n: bool = False) -> str:
  """'mean [low, high]' (+ ' (n)') of a final_stats dict; prefix "delta_" for the change."""
  mean, low, high = (s[f"{prefix}{k}"] for k in ("mean", "ci_low", "ci_high"))
  if math.isnan(mean):
    return "–"
  return f"{_f(mean)} [{_f(low)}, {_f(high)}]" + (f" ({s['n']})" if n else "")


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
  return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
          + ["| " + " | ".join(r) + " |" for r in rows] + [""])


def markdown(sel: dict, paths: list[str], table: dict, figures: list, fit_rows: list,
             confidence: float) -> str:
  """report.md: title, date, runs, how to read, final table, fit, alignment tax, figures."""
  groups, labels, c = sel["groups"], sel["labels"], f"{confidence:.0%}"
  md = [f"# {sel['title']}", "", f"Generated {datetime.datetime.now():%Y-%m-%d %H:%M} from "
        + ", ".join(f"`{p}`" for p in paths) + ".", "", "## Runs", "",
        f"{sum(map(len, groups.values()))} runs in {len(groups)} groups: " + ", ".join(
            f"`{g}` (seeds {', '.join(str(r.seed) for r in rs)})" for g, rs in groups.items()) + ".", ""]
  rows = []
  for g, rs in groups.items():
    top = max(r.last_step for r in rs)
    for r in rs:
      status = ("**unfinished**" if r.finished is False else
                f"**short** (group max {top})" if r.last_step != top else "ok")
      rows.append([g, labels.get(g, g), str(r.seed), str(r.last_step), status, f"`{r.workdir}`"])
  md += _md_table(["group", "label", "seed", "last step", "status", "workdir"], rows)
  md += ["## How to read this", "",
         f"- Intervals are Student-t {c} confidence intervals over seeds (mean ± t·s/√n, "
         "s = sample std); n (seeds logging the metric) is shown; n = 1 has no interval.",
         "- \"Final\" is each seed's last logged value; Δ is final minus the seed's first value "
         "(the step-0 eval), paired per seed: its CI is over the per-seed differences.",
         "- Curves use the steps logged by every seed of a group; wall-clock is the seeds' mean "
         "elapsed_s (s) at that step. KL is in nats.", "", "## Final metrics", ""]
  md += _md_table(["metric", "group", "per-seed finals", f"final mean [{c} CI] (n)", "Δ vs first [CI]"],
                  [[f"`{m}`", s["label"], ", ".join(_f(v) for v in s["values"]), _ci(s, n=True),
                    _ci(s, "delta_")] for (g, m), s in table.items()])
  if fit_rows:
    md += ["## Over-optimisation fit", "", "Gold reward gain R over step 0 fitted as "
           "R(d) = d (α − β ln d), d = sqrt(KL) (Gao, Schulman & Hilton 2022, *Scaling Laws for "
           "Reward Model Overoptimization*), on every eval point of every seed (also `fits.csv`).", ""]
    md += _md_table(["group", "α", "β", "R²", "points"], [
        [r["label"], _f(r["alpha"]), _f(r["beta"]), _f(r["r2"]), str(r["n_points"])] for r in fit_rows])
  if sel["capability"]:
    cols = [m for m in (sel["gold"] or sel["reward"],) if m] + sel["capability"]
    md += ["## Alignment tax", "", f"Change from the step-0 eval to the final eval (paired per "
           f"seed, mean [{c} CI]): reward gained next to capability gained or lost.", ""]
    md += _md_table(["group"] + [f"Δ `{m}`" for m in cols], [
        [labels.get(g, g)] + [_ci(table[g, m], "delta_") if (g, m) in table else "–" for m in cols]
        for g in groups])
  md += ["## Figures", ""] + [f"![{cap}]({f})\n\n*{cap}*\n" for f, cap in figures]
  return "\n".join(md) + "\n"


def write_report(paths: list[str], out_dir: str, *, metrics=None, gold=None, proxy=None, kl=None,
                 reward=None, capability=None, groups=None, exclude=(), title=None,
                 confidence: float = 0.95, labels=None) -> str:
  """Discover runs under `paths`; write report.md, report.csv and figures into `out_dir`.

  Explicit arguments override a sweep.json "report" dict (see `select`). Returns report.md's path.
  """
  paths = [paths] if isinstance(paths, str) else list(paths)
  if not 0 < confidence < 1:
    raise ReportError(f"confidence must be in (0, 1), got {confidence}")
  runs = discover(paths)
  if not runs:
    raise ReportError(f"no runs (directories with metrics.jsonl) under {', '.join(paths)}")
  sel = select(runs, paths, dict(metrics=metrics, gold=gold, proxy=proxy, kl=kl, reward=reward,
                                 capability=capability, groups=groups, exclude=exclude,
                                 title=title, labels=labels))
  os.makedirs(out_dir, exist_ok=True)
  table = final_table(sel, confidence)
  _write_csv(os.path.join(out_dir, "report.csv"), CSV_COLUMNS,
             [dict(s, values=";".join(repr(float(v)) for v in s["values"])) for s in table.values()])
  figures, fit_rows = write_figures(sel, out_dir, confidence)
  path = os.path.join(out_dir, "report.md")
  with open(path, "w") as f:
    f.write(markdown(sel, paths, table, figures, fit_rows, confidence))
  return path


def main(argv=None) -> int:
  """CLI: rlhf-jax report DIR [DIR...] [--out=DIR] [--metrics=a,b] [--gold=KEY] ..."""
  p = argparse.ArgumentParser(prog="rlhf-jax report",
                              description="Compare runs across seeds: report.md, report.csv, plots.")
  p.add_argument("dirs", nargs="+", metavar="DIR", help="run workdirs or sweep directories")
  p.add_argument("--out", help="output directory (default DIR/report for one DIR, else ./report)")
  for name in ("metrics", "capability", "groups", "exclude"):
    p.add_argument(f"--{name}", help="comma-separated list")
  for name, default in DEFAULTS.items():
    p.add_argument(f"--{name}", help=f"metric key (default {default} when logged)")
  p.add_argument("--title")
  p.add_argument("--confidence", type=float, default=0.95)
  a = p.parse_args(argv)
  out = a.out or (os.path.join(a.dirs[0], "report") if len(a.dirs) == 1 else "report")
  try:
    path = write_report(a.dirs, out, **{k: v for k, v in vars(a).items() if k not in ("dirs", "out")})
  except ReportError as e:
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(2) from None
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
