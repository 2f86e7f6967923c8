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
import math
import os
import re
import sys

import numpy as np

from rlhf_jax.report_plots import plot_curves, plot_frontier, plot_overoptimisation
from rlhf_jax.report_runs import ReportError, Run, _read_json, discover
from rlhf_jax.report_stats import final_stats, fit_gao, gain_points

OPTION_KEYS = ("metrics", "gold", "proxy", "kl", "reward", "capability", "groups", "exclude",
               "title", "labels")
DEFAULTS = {"gold": "eval_reward/gold", "proxy": "eval_reward/proxy", "kl": "eval_kl",
            "reward": "eval_reward"}
CSV_COLUMNS = ("group", "label", "metric", "n", "mean", "std", "ci_low", "ci_high", "delta_mean",
               "delta_ci_low", "delta_ci_high", "values")


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
