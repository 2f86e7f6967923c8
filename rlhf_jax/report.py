"""Multi-seed comparison report: `rlhf-jax report DIR [DIR...] [--out=DIR] ...`.

Any directory under the given paths holding a `metrics.jsonl` is a run. Runs are
grouped (algorithm / sweep cell) with one run per seed, and OUT receives:

  report.md                  readable on its own: runs, final-metric tables (IQM and mean with
                             bootstrap CIs; Student-t), probability of improvement, seeds needed,
                             fits, alignment tax, figures
  report.csv                 final metrics, long format, one row per (group, metric)
  pairs.csv                  per metric and pair of groups: P(X > Y) [CI], difference, seeds needed
  scaling_fits.csv           ScaleRL compute-scaling fit of the primary metric per group
  performance_profile.png    fraction of seeds above each threshold, per reward metric
  scaling_fit.png            primary metric vs the cumulative x column with the fitted sigmoid
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
import os
import re
import sys

import numpy as np

from rlhf_jax import report_robust as robust
from rlhf_jax.report_plots import (plot_curves, plot_equal, plot_frontier, plot_overoptimisation,
                                   plot_profiles, plot_scaling)
from rlhf_jax.report_runs import ReportError, Run, _read_json, discover
from rlhf_jax.report_markdown import markdown
from rlhf_jax.report_stats import final_stats, fit_gao, gain_points

OPTION_KEYS = ("metrics", "gold", "proxy", "kl", "reward", "capability", "groups", "exclude",
               "title", "labels", "primary", "scaling_x", "first_table", "bootstrap_seed",
               "bootstrap_reps", "ranges", "baselines")
DEFAULTS = {"gold": "eval_reward/gold", "proxy": "eval_reward/proxy", "kl": "eval_kl",
            "reward": "eval_reward"}
# Each trainer's own training metrics (its progress-bar keys), in the final table when logged:
# SFT / DPO / RM / PRM loss, RM accuracy, DPO's reward accuracy and margin, PRM step accuracy,
# PPO / GRPO mean rollout reward.
TRAIN_METRICS = ("loss", "accuracy", "reward_accuracy", "reward_margin", "step_accuracy",
                 "reward_mean")
COMPUTE_X = "flops/total"  # cumulative model FLOPs (rlhf_jax/flops.py)
SAMPLES_X = "samples/completions"  # cumulative completions learned from (rlhf_jax/flops.py)
# The equal-x comparisons: (section name, x column, what x is, unit, figure). The KL axis's
# column is the report's `kl` metric (None: no KL section).
AXES = (("compute", COMPUTE_X, "cumulative model FLOPs (`flops/total`: sampling + log-prob "
         "passes + updates + remat recompute, `rlhf_jax/flops.py`)", "FLOPs", "equal_compute.png"),
        ("samples", SAMPLES_X, "cumulative completions learned from (`samples/completions`: "
         "sampled by PPO / GRPO, read from the data by DPO, 2 per pair)", "completions",
         "equal_samples.png"),
        ("KL", None, "KL to the start policy; each seed's eval points in order of KL", "nats",
         "equal_kl.png"))
EQUAL_COLUMNS = ("axis", "x", "budget", "group", "label", "n", "mean", "mean_boot_low",
                 "mean_boot_high", "iqm", "iqm_boot_low", "iqm_boot_high")
CSV_COLUMNS = ("group", "label", "metric", "n", "mean", "std", "ci_low", "ci_high", "delta_mean",
               "delta_ci_low", "delta_ci_high", "values", "mean_boot_low", "mean_boot_high", "iqm",
               "iqm_boot_low", "iqm_boot_high", "range_low", "range_high")
PAIR_COLUMNS = ("metric", "group_x", "group_y", "label_x", "label_y", "n_x", "n_y", "p_improve",
                "p_low", "p_high", "diff_mean", "pooled_var", "seeds_needed")
SCALING_COLUMNS = ("group", "label", "metric", "x", "status", "r0", "a", "a_low", "a_high", "b",
                   "b_low", "b_high", "c_mid", "c_mid_low", "c_mid_high", "r2", "n_points",
                   "n_seeds", "boot_ok")


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
  curves (metrics plotted), capability (metrics for the alignment tax), primary (the metric of
  the pairwise tables and the scaling fit: gold, else reward, else proxy, else the first
  curve), scaling_x (its cumulative x column, default flops/total when logged, else "step"),
  first_table ("bootstrap" or
  "t"), bootstrap_seed / bootstrap_reps, ranges (metric -> [low, high] over the known ones) and
  baselines (groups that are start points, not arms, e.g. the SFT policy every arm starts
  from: left out of the equal-x comparisons and drawn as a reference line there).
  """
  keys = {k for r in runs for row in r.rows for k in row} - {"step"}
  _check_known(_as_list(explicit["metrics"]) + _as_list(explicit["capability"])
               + [explicit[k] for k in (*DEFAULTS, "primary") if explicit[k]], keys, "metric")
  if explicit["scaling_x"]:
    _check_known([explicit["scaling_x"]], keys | {"step"}, "x column")
  if explicit["first_table"] not in (None, "bootstrap", "t"):
    raise ReportError(f"first_table must be 'bootstrap' or 't', got {explicit['first_table']!r}")
  _check_known(_as_list(explicit["groups"]) + _as_list(explicit["exclude"])
               + _as_list(explicit["baselines"]), {r.group for r in runs}, "group")
  opts = {}
  for p in paths:
    rep = _read_json(os.path.join(p, "sweep.json"), strict=True).get("report")
    opts.update({k: v for k, v in (rep.items() if isinstance(rep, dict) else ())
                 if k in OPTION_KEYS and k not in opts})
  opts.update({k: v for k, v in explicit.items() if v is not None and v not in ((), [], "")})
  sel = {k: v if v in keys else None for k, v in ((k, opts.get(k) or d) for k, d in DEFAULTS.items())}

  def listed(name, prefixes):  # the option's known metrics, else every key with these prefixes
    return ([m for m in _as_list(opts.get(name)) if m in keys]
            or sorted(k for k in keys if k.startswith(prefixes)))
  sel.update(curves=listed("metrics", ("eval_", "capability_")),
             capability=listed("capability", ("capability_",)), keys=keys,
             labels={str(k): str(v) for k, v in (opts.get("labels") or {}).items()},
             title=opts.get("title") or "Run comparison: " + ", ".join(paths))
  primary = opts.get("primary") if opts.get("primary") in keys else None
  sel["primary"] = primary or sel["gold"] or sel["reward"] or sel["proxy"] or next(iter(sel["curves"]), None)
  # the compute-scaling fit's x: cumulative FLOPs when the runs log them (rlhf_jax.flops)
  sel["scaling_x"] = (opts.get("scaling_x") if opts.get("scaling_x") in keys | {"step"} else
                      COMPUTE_X if COMPUTE_X in keys else "step")
  sel["first_table"] = "t" if opts.get("first_table") == "t" else "bootstrap"
  sel["seed"] = int(opts.get("bootstrap_seed", robust.DEFAULT_SEED))
  sel["reps"] = int(opts.get("bootstrap_reps", robust.DEFAULT_REPS))
  if sel["reps"] < 1:
    raise ReportError(f"bootstrap_reps must be >= 1, got {sel['reps']}")
  ranges = opts.get("ranges") or {}
  sel["range"] = lambda m: robust.metric_range(m, ranges if isinstance(ranges, dict) else {})
  excluded, order = set(_as_list(opts.get("exclude"))), _as_list(opts.get("groups"))
  by_group = {}
  for r in runs:
    if r.group not in excluded:
      by_group.setdefault(r.group, []).append(r)
  if not by_group:
    raise ReportError("every group is excluded")
  names = [g for g in order if g in by_group] + sorted(g for g in by_group if g not in order)
  sel["groups"] = {g: by_group[g] for g in names}
  sel["baselines"] = [g for g in _as_list(opts.get("baselines")) if g in by_group]
  return sel


# ----------------------------------------------------------------------------- outputs

def final_table(sel: dict, confidence: float) -> dict:
  """{(group, metric): final_stats + robust_stats + group/label} for the plotted, role and
  capability metrics, the trainers' own training metrics (TRAIN_METRICS, when logged; Δ from
  their first logged value), plus final elapsed_s (wall-clock, no delta). Intervals of the
  final values (Student-t and bootstrap) are clipped to the metric's range (range_low, range_high)."""
  metrics = list(dict.fromkeys(sel["curves"] + [sel[k] for k in DEFAULTS if sel[k]]
                               + sel["capability"] + list(TRAIN_METRICS) + ["elapsed_s"]))
  table = {}
  for m in (m for m in metrics if m in sel["keys"]):
    for g, rs in sel["groups"].items():
      s = final_stats(rs, m, confidence, paired=m != "elapsed_s")
      if s is not None and s["n"] > 0:  # a metric never finite in this group: no row
        lo, hi = sel["range"](m)
        s["ci_low"], s["ci_high"] = (float(np.clip(s[k], lo, hi)) for k in ("ci_low", "ci_high"))
        rob = robust.robust_stats(s["values"], confidence, sel["reps"], sel["seed"], (lo, hi))
        table[g, m] = dict(s, **{k: v for k, v in rob.items() if k not in ("n", "mean")}, range_low=lo,
                           range_high=hi, group=g, label=sel["labels"].get(g, g))
  return table


def pair_table(sel: dict, table: dict, confidence: float) -> list[dict]:
  """Per metric of `table` and ordered pair (X, Y) of groups: probability of improvement
  P(X > Y) with its bootstrap CI, difference of means and seeds needed (80% power, α = 0.05)."""
  rows, groups, labels = [], list(sel["groups"]), sel["labels"]
  for m in dict.fromkeys(m for _, m in table):
    for gx in groups:
      for gy in (g for g in groups if g != gx and (gx, m) in table and (g, m) in table):
        x, y = table[gx, m]["values"], table[gy, m]["values"]
        p, lo, hi = robust.prob_improvement(x, y, confidence, sel["reps"], sel["seed"])
        need, d, s2 = robust.seeds_needed(x, y)
        rows.append(dict(metric=m, group_x=gx, group_y=gy, label_x=labels.get(gx, gx),
                         label_y=labels.get(gy, gy), n_x=table[gx, m]["n"], n_y=table[gy, m]["n"],
                         p_improve=p, p_low=lo, p_high=hi, diff_mean=d, pooled_var=s2,
                         seeds_needed=need))
  return rows


def scaling_table(sel: dict, confidence: float) -> list[dict]:
  """Per group: the ScaleRL sigmoid of the primary metric vs sel["scaling_x"] (fit_scaling_seeds)."""
  m, x = sel["primary"], sel["scaling_x"]
  if not m:
    return []
  return [dict(robust.fit_scaling_seeds(rs, m, x, confidence, min(sel["reps"], robust.FIT_REPS),
                                        sel["seed"]), group=g, label=sel["labels"].get(g, g), metric=m, x=x)
          for g, rs in sel["groups"].items()]


def equal_tables(sel: dict, confidence: float) -> list[dict]:
  """The primary metric of every arm (groups but the baselines) on a common grid of each
  AXES column (`robust.equal_x`): [{name, x, about, unit, file, eq}], eq None when some arm
  logs no x (runs from before the counters; a run without the KL metric). The KL axis only
  when the report has a kl metric that is not the primary one."""
  m = sel["primary"]
  arms = {g: rs for g, rs in sel["groups"].items() if g not in sel["baselines"]}
  out = []
  if not m or not arms:
    return out
  for name, x, about, unit, file in AXES:
    x = x or (sel["kl"] if sel["kl"] != m else None)
    if x is None:
      continue
    logged = all(any(x in row for row in r.rows) for rs in arms.values() for r in rs)
    eq = robust.equal_x(arms, m, x, confidence=confidence, reps=sel["reps"], seed=sel["seed"],
                        value_range=sel["range"](m)) if logged else None
    out.append(dict(name=name, x=x, about=about, unit=unit, file=file, eq=eq))
  return out


def equal_rows(sel: dict, tables: list[dict]) -> list[dict]:
  """equal_x.csv: one row per (axis, arm) with the stats at the axis's budget."""
  rows = []
  for t in tables:
    if t["eq"] is None or not len(t["eq"]["grid"]):
      continue
    for g in t["eq"]:
      if g not in ("budget", "grid"):
        rows.append(dict(t["eq"][g]["at_budget"], axis=t["name"], x=t["x"], budget=t["eq"]["budget"],
                         group=g, label=sel["labels"].get(g, g)))
  return rows


def _write_csv(path: str, header, rows: list[dict]) -> None:
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=header, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)


def write_figures(sel: dict, out_dir: str, confidence: float, scaling: list,
                  tables: list | None = None) -> tuple[list, list]:
  """Writes the PNGs (and fits.csv); returns ([(file, caption)], [fit rows])."""
  groups, labels, figures, fit_rows = sel["groups"], sel["labels"], [], []
  m = sel["primary"]
  base = {labels.get(g, g): float(np.nanmean([r.final(m) for r in groups[g]]))
          for g in sel["baselines"]} if m else {}
  for t in tables or []:
    if t["eq"] is not None and len(t["eq"]["grid"]):
      plot_equal(groups, labels, m, t["x"], t["eq"], os.path.join(out_dir, t["file"]), confidence,
                 base)
      figures.append((t["file"], f"{m} at equal {t['name']}: vs {t['x']}, mean over seeds with a "
                      f"{confidence:.0%} bootstrap band (faint: seeds); dotted: the budget of the "
                      f"equal-{t['name']} table; dashed: the baselines' final values."))
  for m in sel["curves"]:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", m).strip("_") + ".png"
    timed = plot_curves(groups, labels, m, os.path.join(out_dir, name), confidence)
    figures.append((name, f"{m} vs step{' and wall-clock' if timed else ''}: mean over seeds, "
                    f"shaded {confidence:.0%} CI."))
  gold, proxy, kl = sel["gold"], sel["proxy"], sel["kl"]
  ys = [gold, proxy] if gold and proxy else [sel["reward"] or gold or proxy]
  if kl and ys[0]:
    fronts = {y: robust.frontier(groups, y, kl, confidence=confidence, reps=sel["reps"],
                                 seed=sel["seed"], value_range=sel["range"](y)) for y in ys}
    plot_frontier(groups, labels, kl, ys, fronts, os.path.join(out_dir, "frontier.png"), confidence)
    figures.append(("frontier.png", f"Reward vs KL: each group's frontier through its eval points "
                    f"(mean over seeds on its own KL range, {confidence:.0%} bootstrap band); "
                    "faint points: seeds' final values; open circles: their mean with CI bars."))
  profiled = [y for y in ys if y]
  if profiled:
    plot_profiles(groups, labels, profiled, os.path.join(out_dir, "performance_profile.png"),
                  confidence, sel["reps"], sel["seed"])
    figures.append(("performance_profile.png", "Performance profiles: fraction of seeds whose final "
                    f"value exceeds τ, per group, with a {confidence:.0%} bootstrap band over seeds "
                    "(higher and further right is better)."))
  if scaling:
    plot_scaling(groups, labels, sel["primary"], sel["scaling_x"], scaling,
                 os.path.join(out_dir, "scaling_fit.png"))
    figures.append(("scaling_fit.png", f"{sel['primary']} vs {sel['scaling_x']}: seeds (faint) and "
                    "the ScaleRL sigmoid fitted per group (dashed; only where identified)."))
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


def write_report(paths: list[str], out_dir: str, *, metrics=None, gold=None, proxy=None, kl=None,
                 reward=None, capability=None, groups=None, exclude=(), title=None,
                 confidence: float = 0.95, labels=None, primary=None, scaling_x=None,
                 first_table=None, bootstrap_seed=None, bootstrap_reps=None, ranges=None,
                 baselines=None) -> str:
  """Discover runs under `paths`; write report.md, report.csv, pairs.csv, scaling_fits.csv and
  figures into `out_dir`.

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
                                 title=title, labels=labels, primary=primary, scaling_x=scaling_x,
                                 first_table=first_table, bootstrap_seed=bootstrap_seed,
                                 bootstrap_reps=bootstrap_reps, ranges=ranges,
                                 baselines=baselines))
  os.makedirs(out_dir, exist_ok=True)
  table = final_table(sel, confidence)
  _write_csv(os.path.join(out_dir, "report.csv"), CSV_COLUMNS,
             [dict(s, values=";".join(repr(float(v)) for v in s["values"])) for s in table.values()])
  pairs, scaling = pair_table(sel, table, confidence), scaling_table(sel, confidence)
  _write_csv(os.path.join(out_dir, "pairs.csv"), PAIR_COLUMNS, pairs)
  _write_csv(os.path.join(out_dir, "scaling_fits.csv"), SCALING_COLUMNS, scaling)
  tables = equal_tables(sel, confidence)
  _write_csv(os.path.join(out_dir, "equal_x.csv"), EQUAL_COLUMNS, equal_rows(sel, tables))
  figures, fit_rows = write_figures(sel, out_dir, confidence, scaling, tables)
  path = os.path.join(out_dir, "report.md")
  with open(path, "w") as f:
    f.write(markdown(sel, paths, table, figures, fit_rows, confidence, pairs, scaling, tables))
  return path


def main(argv=None) -> int:
  """CLI: rlhf-jax report DIR [DIR...] [--out=DIR] [--metrics=a,b] [--gold=KEY] ..."""
  p = argparse.ArgumentParser(prog="rlhf-jax report",
                              description="Compare runs across seeds: report.md, report.csv, plots.")
  p.add_argument("dirs", nargs="+", metavar="DIR", help="run workdirs or sweep directories")
  p.add_argument("--out", help="output directory (default DIR/report for one DIR, else ./report)")
  for name in ("metrics", "capability", "groups", "exclude", "baselines"):
    p.add_argument(f"--{name}", help="comma-separated list")
  for name, default in DEFAULTS.items():
    p.add_argument(f"--{name}", help=f"metric key (default {default} when logged)")
  p.add_argument("--primary", help="metric of the pairwise tables and the scaling fit "
                 "(default: gold, else reward, else proxy)")
  p.add_argument("--scaling_x", help="cumulative x column of the scaling fit (default "
                 "flops/total when the runs log it, else step)")
  p.add_argument("--first_table", choices=("bootstrap", "t"),
                 help="final-metric table shown first (default bootstrap)")
  p.add_argument("--bootstrap_seed", type=int, help=f"default {robust.DEFAULT_SEED}")
  p.add_argument("--bootstrap_reps", type=int, help=f"default {robust.DEFAULT_REPS}")
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
