"""report.md: the markdown of `rlhf-jax report` (runs, how to read, the final-value tables,
probability of improvement and seeds needed, equal compute, the fits, alignment tax,
figures), from the tables `rlhf_jax.report` computes."""
from __future__ import annotations

import datetime
import math

import numpy as np


WHY = {"compute": "Equal steps are not equal compute (PPO runs a critic, GRPO samples G "
                   "completions a prompt, DPO samples nothing): an arm ahead at equal steps but "
                   "behind here bought its lead with compute.",
       "samples": "The arms compared after learning from the same number of completions "
                  "(data efficiency, whatever each spent on a completion).",
       "KL": "The arms compared at the same distance from the start policy (Gao et al. 2022 "
             "read over-optimisation this way): which one buys more reward per nat of KL."}


def _equal_lines(sel: dict, t: dict, confidence: float) -> list[str]:
  """One "Equal <axis>" section: the primary metric of every arm at the axis's budget."""
  md = [f"## Equal {t['name']}", ""]
  m, x, eq, c = sel["primary"], t["x"], t["eq"], f"{confidence:.0%}"
  if eq is None:
    return md + [f"Not available: some runs log no `{x}` (runs from before the counters, "
                 "`rlhf_jax/flops.py`, or without that eval); compare them at equal steps above.", ""]
  if not np.isfinite(eq["budget"]) or eq["budget"] <= 0:
    return md + [f"Not available: some run never logs `{m}` together with `{x}` beyond 0.", ""]
  base = sel["baselines"]
  md += [f"`{m}` of every seed interpolated linearly on a common grid of {t['about']}, read at "
         f"the largest value every run reached, {eq['budget']:.4g} {t['unit']}. "
         + WHY.get(t["name"], "") + f" Mean and IQM over seeds [{c} bootstrap CI]; figure "
         f"`{t['file']}`" + (f"; baselines left out: {', '.join(f'`{g}`' for g in base)}" if base
                             else "") + ".", ""]
  rows = []
  for g in sel["groups"]:
    if g in eq:
      s = eq[g]["at_budget"]
      rows.append([sel["labels"].get(g, g), str(s["n"]),
                   _interval(s["mean"], s["mean_boot_low"], s["mean_boot_high"]),
                   _interval(s["iqm"], s["iqm_boot_low"], s["iqm_boot_high"])])
  return md + _md_table(["group", "n", f"mean at {eq['budget']:.3g} {t['unit']}", "IQM"], rows)


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
             tables: list | None = None) -> str:
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
  for t in tables or []:
    md += _equal_lines(sel, t, confidence)
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
