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
import datetime
import math
import os
import re
import sys

import numpy as np

from rlhf_jax import report_robust as robust
from rlhf_jax.report_plots import (plot_curves, plot_equal_compute, plot_frontier, plot_overoptimisation, plot_profiles,
                                   plot_scaling)
from rlhf_jax.report_runs import ReportError, Run, _read_json, discover
from rlhf_jax.report_stats import final_stats, fit_gao, gain_points

OPTION_KEYS = ("metrics", "gold", "proxy", "kl", "reward", "capability", "groups", "exclude",
               "title", "labels", "primary", "scaling_x", "first_table", "bootstrap_seed",
               "bootstrap_reps", "ranges")
DEFAULTS = {"gold": "eval_reward/gold", "proxy": "eval_reward/proxy", "kl": "eval_kl",
            "reward": "eval_reward"}
COMPUTE_X = "flops/total"  # cumulative model FLOPs (rlhf_jax/flops.py)
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
  compute_x (flops/total when every run logs it, else None: no equal-compute section), first_table ("bootstrap" or
  "t"), bootstrap_seed / bootstrap_reps and ranges (metric -> [low, high] over the known ones).
  """
  keys = {k for r in runs for row in r.rows for k in row} - {"step"}
  _check_known(_as_list(explicit["metrics"]) + _as_list(explicit["capability"])
               + [explicit[k] for k in (*DEFAULTS, "primary") if explicit[k]], keys, "metric")
  if explicit["scaling_x"]:
    _check_known([explicit["scaling_x"]], keys | {"step"}, "x column")
  if explicit["first_table"] not in (None, "bootstrap", "t"):
    raise ReportError(f"first_table must be 'bootstrap' or 't', got {explicit['first_table']!r}")
  _check_known(_as_list(explicit["groups"]) + _as_list(explicit["exclude"]),
               {r.group for r in runs}, "group")
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
  sel["compute_x"] = COMPUTE_X if all(
      any(COMPUTE_X in row for row in r.rows) for r in runs) else None
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
  return sel


# ----------------------------------------------------------------------------- outputs

def final_table(sel: dict, confidence: float) -> dict:
  """{(group, metric): final_stats + robust_stats + group/label} for the plotted, role and
  capability metrics, plus final elapsed_s (wall-clock, no delta). Intervals of the final values
  (Student-t and bootstrap) are clipped to the metric's range (range_low, range_high)."""
  metrics = list(dict.fromkeys(sel["curves"] + [sel[k] for k in DEFAULTS if sel[k]]
                               + sel["capability"] + ["elapsed_s"]))
  table = {}
  for m in (m for m in metrics if m in sel["keys"]):
    for g, rs in sel["groups"].items():
      s = final_stats(rs, m, confidence, paired=m != "elapsed_s")
      if s is not None:
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


def compute_table(sel: dict, confidence: float) -> dict | None:
  """The primary metric of every run on a common grid of cumulative FLOPs
  (`robust.equal_compute`), or None when the runs do not log flops/total."""
  m, x = sel["primary"], sel["compute_x"]
  if not m or not x:
    return None
  return robust.equal_compute(sel["groups"], m, x, confidence=confidence, reps=sel["reps"],
                              seed=sel["seed"], value_range=sel["range"](m))


def _compute_lines(sel: dict, eq: dict | None, confidence: float) -> list[str]:
  md = ["## Equal compute", ""]
  if not sel["primary"]:
    return []
  if eq is None:
    return md + ["Not available: some runs log no `flops/total` (runs from before the compute "
                 "counters, `rlhf_jax/flops.py`); compare them at equal steps above.", ""]
  m, x, c = sel["primary"], sel["compute_x"], f"{confidence:.0%}"
  if not np.isfinite(eq["budget"]) or eq["budget"] <= 0:
    return md + [f"Not available: some run never logs `{m}` together with `{x}`.", ""]
  md += [f"`{m}` of every seed interpolated linearly on a common grid of cumulative model "
         f"FLOPs (`{x}`: sampling + log-prob passes + updates + remat recompute, "
         "`rlhf_jax/flops.py`) and read at the largest budget every run reached, "
         f"{eq['budget']:.4g} FLOPs: arms compared at the same compute, not the same step. "
         f"Mean and IQM over seeds [{c} bootstrap CI]; figure `equal_compute.png`.", ""]
  rows = []
  for g in sel["groups"]:
    s = eq[g]["at_budget"]
    rows.append([sel["labels"].get(g, g), str(s["n"]),
                 _interval(s["mean"], s["mean_boot_low"], s["mean_boot_high"]),
                 _interval(s["iqm"], s["iqm_boot_low"], s["iqm_boot_high"])])
  return md + _md_table(["group", "n", f"mean at {eq['budget']:.3g} FLOPs",
                         "IQM"], rows)


def _write_csv(path: str, header, rows: list[dict]) -> None:
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=header, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)


def write_figures(sel: dict, out_dir: str, confidence: float, scaling: list,
                  eq: dict | None = None) -> tuple[list, list]:
  """Writes the PNGs (and fits.csv); returns ([(file, caption)], [fit rows])."""
  groups, labels, figures, fit_rows = sel["groups"], sel["labels"], [], []
  if eq is not None and len(eq["grid"]):
    plot_equal_compute(groups, labels, sel["primary"], sel["compute_x"], eq,
                       os.path.join(out_dir, "equal_compute.png"), confidence)
    figures.append(("equal_compute.png", f"{sel['primary']} vs cumulative {sel['compute_x']}: "
                    f"mean over seeds with a {confidence:.0%} bootstrap band (faint: seeds); "
                    "dotted: the budget of the equal-compute table."))
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


def _f(x) -> str:
  return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4g}"


def _interval(value, low, high, n: int | None = None, none: str = "n = 1, no interval") -> str:
  """'value [low, high]' (+ ' (n)'); 'value (n = 1, no interval)' when there is no interval
  (never '[nan, nan]')."""
  if value is None or math.isnan(value):
    return "–"
  if math.isnan(low) or math.isnan(high):
    return f"{_f(value)} ({none})"
  return f"{_f(value)} [{_f(low)}, {_f(high)}]" + (f" ({n})" if n is not None else "")


def _ci(s: dict, prefix: str = "", n: bool = False) -> str:
  """'mean [low, high]' (+ ' (n)') of a final_stats dict; prefix "delta_" for the change."""
  return _interval(*(s[f"{prefix}{k}"] for k in ("mean", "ci_low", "ci_high")), s["n"] if n else None,
                   _no_interval(s["n"]))


def _no_interval(n: int) -> str:
  return "n = 1, no interval" if n < 2 else "no interval"


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
  return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
          + ["| " + " | ".join(r) + " |" for r in rows] + [""])


def _pair_lines(sel: dict, pairs: list[dict], confidence: float) -> list[str]:
  """The probability-of-improvement matrix and the seeds-needed line per pair, primary metric."""
  m, labels, c = sel["primary"], sel["labels"], f"{confidence:.0%}"
  rows = {(r["group_x"], r["group_y"]): r for r in pairs if r["metric"] == m}
  groups = [g for g in sel["groups"] if any(g in k for k in rows)]
  if not groups:
    return []
  md = [f"## Probability of improvement (`{m}`)", "", f"P(row > column): the chance that a random "
        f"seed of the row group ends with a higher final `{m}` than a random seed of the column "
        f"group (ties count 1/2; Agarwal et al. 2021), with its {c} bootstrap CI over seeds. 0.5 = no "
        "difference; an interval that excludes 0.5 is a reliable ordering. Also `pairs.csv` (every "
        "metric).", ""]
  md += _md_table(["P(row > column)"] + [labels.get(g, g) for g in groups], [
      [labels.get(gx, gx)] + ["—" if gx == gy else _interval(rows[gx, gy]["p_improve"], rows[gx, gy]["p_low"],
                                                            rows[gx, gy]["p_high"])
                              if (gx, gy) in rows else "–" for gy in groups] for gx in groups])
  md += [f"**Seeds needed** to detect the observed difference of mean final `{m}` with 80% power "
         "(two-sided α = 0.05): n = 2 (z₀.₉₇₅ + z₀.₈)² s² / d² per arm, d the difference of means, "
         "s² the mean of the two per-seed variances (normal approximation; a t-test needs a seed "
         "or two more).", ""]
  for i, gx in enumerate(groups):
    for gy in groups[i + 1:]:
      r = rows.get((gx, gy))
      if r is None:
        continue
      head = f"- {labels.get(gx, gx)} vs {labels.get(gy, gy)}: "
      have = f"have {r['n_x']} and {r['n_y']}"
      need = r["seeds_needed"]
      if math.isnan(need):
        md.append(head + f"not computable ({have}; a variance needs 2 seeds per arm)")
      elif math.isinf(need):
        md.append(head + f"no difference observed (d = 0; {have})")
      else:
        verdict = "enough" if min(r["n_x"], r["n_y"]) >= need else "not enough"
        md.append(head + f"d = {_f(r['diff_mean'])}, s = {_f(math.sqrt(r['pooled_var']))}: "
                  f"**{int(need)} seeds per arm** ({have}: {verdict})")
  return md + [""]


def _scaling_lines(sel: dict, scaling: list[dict], confidence: float) -> list[str]:
  if not scaling:
    return []
  c, x = f"{confidence:.0%}", sel["scaling_x"]
  md = ["## Compute-scaling fit", "", f"`{sel['primary']}` R vs cumulative `{x}` C "
        "fitted per group as R(C) = R0 + (A − R0) / (1 + (C_mid / C)^B) (Khatri et al. 2025, *The "
        "Art of Scaling Reinforcement Learning Compute*, ScaleRL) on every eval point of every seed: "
        f"A the asymptote, B the efficiency (steeper = faster), C_mid the `{x}` at half the gain. "
        f"[{c} bootstrap CI over seeds]; a fit the points do not determine says *not identified* "
        "and why (also `scaling_fits.csv`).", ""]

  def ci(r, k):
    return _interval(r[k], r[f"{k}_low"], r[f"{k}_high"], none=_no_interval(r["n_seeds"]))
  rows = []
  for r in scaling:
    if r["status"] != "ok":
      rows.append([r["label"], r["status"], "", "", "", "", f"{r['n_points']} ({r['n_seeds']})"])
      continue
    boot = "" if r["n_seeds"] < 2 else (f"{r['boot_ok']:.0%}" if r["boot_ok"] >= 0.5 else
                                         f"{r['boot_ok']:.0%}: too few, no interval")
    rows.append([r["label"], ci(r, "a"), ci(r, "b"), ci(r, "c_mid"), _f(r["r0"]), _f(r["r2"]),
                 f"{r['n_points']} ({r['n_seeds']})" + (f", resamples identified {boot}" if boot else "")])
  return md + _md_table(["group", "A", "B", "C_mid", "R0", "R²", "points (seeds)"], rows)


def _final_lines(sel: dict, table: dict, c: str) -> dict:
  """The two final-metric tables: {"bootstrap": lines, "t": lines}."""
  boot = ["## Final metrics: IQM and mean, bootstrap CIs", "", f"Per-seed final values; IQM = mean of "
          f"the middle 50% of seeds (the mean when n < 4); [{c} stratified percentile bootstrap CI, "
          "resampling seeds, clipped to the metric's range]; n = seeds logging the metric.", ""]
  boot += _md_table(["metric", "group", "n", f"IQM [{c} CI]", f"mean [{c} CI]"], [
      [f"`{m}`", s["label"], str(s["n"]),
       _interval(s["iqm"], s["iqm_boot_low"], s["iqm_boot_high"], none=_no_interval(s["n"])),
       _interval(s["mean"], s["mean_boot_low"], s["mean_boot_high"], none=_no_interval(s["n"]))]
      for (g, m), s in table.items()])
  t = ["## Final metrics: Student-t CIs", ""]
  t += _md_table(["metric", "group", "per-seed finals", f"final mean [{c} CI] (n)", "Δ vs first [CI]"],
                 [[f"`{m}`", s["label"], ", ".join(_f(v) for v in s["values"]), _ci(s, n=True),
                   _ci(s, "delta_")] for (g, m), s in table.items()])
  return {"bootstrap": boot, "t": t}


def markdown(sel: dict, paths: list[str], table: dict, figures: list, fit_rows: list,
             confidence: float, pairs: list | None = None, scaling: list | None = None,
             eq: dict | None = None) -> str:
  """report.md: title, date, runs, how to read, final tables (bootstrap / Student-t, in the
  first_table order), probability of improvement and seeds needed, fits, alignment tax, figures."""
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
         f"- Bootstrap {c} intervals are percentile intervals of {sel['reps']} resamples of the "
         f"seeds (bootstrap seed {sel['seed']}); Student-t {c} intervals are mean ± t·s/√n "
         "(s = sample std). Both "
         "are over seeds; those of final values are clipped to the metric's known range (accuracies in [0, 1], KL ≥ 0); "
         "n (seeds logging the metric) is shown; n = 1 has no interval.",
         "- IQM (interquartile mean) is robust to one outlier seed; with 3 seeds it equals the "
         "mean. With few seeds every interval is wide: read the seeds-needed lines.",
         "- \"Final\" is each seed's last logged value; Δ is final minus the seed's first value "
         "(the step-0 eval), paired per seed: its CI is over the per-seed differences.",
         "- Curves use the steps logged by every seed of a group; wall-clock is the seeds' mean "
         "elapsed_s (s) at that step. KL is in nats.", ""]
  finals = _final_lines(sel, table, c)
  first = sel["first_table"]
  md += finals[first] + finals["t" if first == "bootstrap" else "bootstrap"]
  md += _pair_lines(sel, pairs or [], confidence)
  md += _compute_lines(sel, eq, confidence)
  if fit_rows:
    md += ["## Over-optimisation fit", "", "Gold reward gain R over step 0 fitted as "
           "R(d) = d (α − β ln d), d = sqrt(KL) (Gao, Schulman & Hilton 2022, *Scaling Laws for "
           "Reward Model Overoptimization*), on every eval point of every seed (also `fits.csv`).", ""]
    md += _md_table(["group", "α", "β", "R²", "points"], [
        [r["label"], _f(r["alpha"]), _f(r["beta"]), _f(r["r2"]), str(r["n_points"])] for r in fit_rows])
  md += _scaling_lines(sel, scaling or [], confidence)
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
                 confidence: float = 0.95, labels=None, primary=None, scaling_x=None,
                 first_table=None, bootstrap_seed=None, bootstrap_reps=None, ranges=None) -> str:
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
                                 bootstrap_reps=bootstrap_reps, ranges=ranges))
  os.makedirs(out_dir, exist_ok=True)
  table = final_table(sel, confidence)
  _write_csv(os.path.join(out_dir, "report.csv"), CSV_COLUMNS,
             [dict(s, values=";".join(repr(float(v)) for v in s["values"])) for s in table.values()])
  pairs, scaling = pair_table(sel, table, confidence), scaling_table(sel, confidence)
  _write_csv(os.path.join(out_dir, "pairs.csv"), PAIR_COLUMNS, pairs)
  _write_csv(os.path.join(out_dir, "scaling_fits.csv"), SCALING_COLUMNS, scaling)
  eq = compute_table(sel, confidence)
  figures, fit_rows = write_figures(sel, out_dir, confidence, scaling, eq)
  path = os.path.join(out_dir, "report.md")
  with open(path, "w") as f:
    f.write(markdown(sel, paths, table, figures, fit_rows, confidence, pairs, scaling, eq))
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
