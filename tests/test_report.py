"""rlhf_jax.report: discovery, statistics (vs independent float64 references), the Gao fit,
the written report (CSV numbers vs numpy, markdown sections, PNGs) and CLI errors.
No JAX: fake workdirs with metrics.jsonl written directly."""
import csv
import json
import math
import re

import numpy as np
import pytest
from scipy import stats

from rlhf_jax import report, report_runs, report_stats

STEPS = (0, 20, 40, 60)
RANGES = {"eval_accuracy": (0.0, 1.0), "eval_kl": (0.0, math.inf), "capability_nll": (0.0, math.inf)}
GAO = {"cell_a": (1.0, 0.3), "cell_b": (0.6, 0.1)}  # true (alpha, beta) of the gold gain per group


def _ref_ci(x, confidence=0.95):
  """Independent reference: float64 mean ± t_{(1+c)/2, n-1} s / sqrt(n) after dropping NaNs."""
  x = np.asarray([v for v in x if not math.isnan(v)], np.float64)
  m = x.sum() / len(x)
  s = math.sqrt(((x - m) ** 2).sum() / (len(x) - 1))
  h = stats.t.ppf((1 + confidence) / 2, len(x) - 1) * s / math.sqrt(len(x))
  return m, m - h, m + h


def _rows(group, seed, last_step=60, skip_eval=None, nan_final_acc=False):
  """Rows of one fake run: train rows every 20 steps, evals at STEPS (step 0 = before training)."""
  alpha, beta = GAO[group]
  tax = 0.004 if group == "cell_a" else 0.001
  rows = []
  for step in (s for s in STEPS if s <= last_step):
    row = {"step": step, "elapsed_s": 1.5 * step + seed}
    if step:
      row["loss"] = 1.0 / step
    if step != skip_eval:
      kl = 0.5 * step / 60 * (1 + 0.2 * seed)
      d = math.sqrt(kl)
      gain = d * (alpha - beta * math.log(d)) if d > 0 else 0.0
      row.update({"eval_kl": kl, "eval_reward/gold": 0.1 * seed + gain,
                  "eval_reward/proxy": 0.1 * seed + 1.5 * d,
                  "eval_accuracy": 0.3 + 0.004 * step + 0.02 * seed * (1 if group == "cell_a" else -1),
                  "capability_nll": 2.0 + tax * step + 0.01 * seed ** 2})
      if nan_final_acc and step == last_step:
        row["eval_accuracy"] = float("nan")
    rows.append(row)
  return rows


def _write_run(workdir, rows, config=None, malformed=False):
  workdir.mkdir(parents=True)
  with open(workdir / "metrics.jsonl", "w") as f:
    for r in rows:
      f.write(json.dumps({k: ("nan" if isinstance(v, float) and math.isnan(v) else v)
                          for k, v in r.items()}) + "\n")
    if malformed:
      f.write('{"step": 80, "eval_accura')  # killed mid-write
  if config is not None:
    (workdir / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
  """A sweep dir: cell_a, cell_b x seeds 0-2 (ragged), a data-prep cell, sweep.json with a report section.
  Returns (root, {group: {seed: rows}})."""
  root = tmp_path_factory.mktemp("sweep")
  data = {"cell_a": {0: _rows("cell_a", 0), 1: _rows("cell_a", 1), 2: _rows("cell_a", 2, skip_eval=40)},
          "cell_b": {0: _rows("cell_b", 0), 1: _rows("cell_b", 1, nan_final_acc=True),
                     2: _rows("cell_b", 2, last_step=40)}}
  for g, seeds in data.items():
    for k, rows in seeds.items():
      _write_run(root / g / f"seed-{k}", rows, {"seed": k, "num_steps": 60}, malformed=(g, k) == ("cell_a", 0))
  _write_run(root / "prep" / "seed-0", [{"step": 0, "eval_accuracy": 0.0}])
  (root / "sweep.json").write_text(json.dumps({"report": {
      "groups": ["cell_b", "cell_a"], "exclude": ["prep"], "labels": {"cell_a": "GRPO (RM)"},
      "title": "Sweep title from sweep.json"}}))
  return root, data


@pytest.fixture(scope="module")
def written(sweep, tmp_path_factory):
  root, data = sweep
  out = tmp_path_factory.mktemp("out")
  return report.write_report([str(root)], str(out)), out, data


def _final_and_delta(rows, metric):
  """Last row that has `metric`, and final minus first (the reference for the CSV)."""
  vals = [r[metric] for r in rows if metric in r]
  return vals[-1], vals[-1] - vals[0]


# ---------------------------------------------------------------- discovery

def test_discover_sweep_layout(sweep):
  root, _ = sweep
  runs = report_runs.discover([str(root)])
  assert [(r.group, r.seed) for r in runs] == [
      ("cell_a", 0), ("cell_a", 1), ("cell_a", 2), ("cell_b", 0), ("cell_b", 1), ("cell_b", 2), ("prep", 0)]
  a0 = runs[0]
  assert a0.last_step == 60 and len(a0.rows) == 4  # the malformed line is skipped
  assert [r.finished for r in runs[:6]] == [True] * 5 + [False]  # cell_b seed 2 stopped at 40 of 60
  b1 = runs[4]
  assert math.isnan(b1.final("eval_accuracy"))  # "nan" string -> float nan
  # a cell directory given directly: the group is the cell's own name
  assert {r.group for r in report_runs.discover([str(root / "cell_b")])} == {"cell_b"}


def test_discover_name_layouts(tmp_path):
  rows = [{"step": 0, "eval_accuracy": 0.5}, {"step": 10, "eval_accuracy": "inf"}]
  for name in ("grpo_seed0", "grpo_seed1", "grpo-seed-2", "ppo_seed3"):
    _write_run(tmp_path / "runs" / name, rows)
  _write_run(tmp_path / "runs" / "baseline", rows, {"seed": 7})
  _write_run(tmp_path / "runs" / "other", rows)
  runs = report_runs.discover([str(tmp_path / "runs")])
  assert sorted((r.group, r.seed) for r in runs) == [
      ("baseline", 7), ("grpo", 0), ("grpo", 1), ("grpo", 2), ("other", 0), ("ppo", 3)]
  assert all(r.finished is None for r in runs)  # no num_steps in any config
  assert runs[0].final("eval_accuracy") == math.inf


# ---------------------------------------------------------------- statistics

def test_mean_ci_matches_reference():
  rng = np.random.default_rng(0)
  for n in (2, 3, 5, 10):
    for confidence in (0.9, 0.95):
      x = rng.normal(3.0, 2.0, size=n)
      m, lo, hi, k = report_stats.mean_ci(x, confidence)
      assert k == n
      np.testing.assert_allclose((m, lo, hi), _ref_ci(x, confidence), rtol=1e-12, atol=1e-12)


def test_mean_ci_degenerate_cases():
  m, lo, hi, n = report_stats.mean_ci([4.0])
  assert (m, n) == (4.0, 1) and math.isnan(lo) and math.isnan(hi)
  assert report_stats.mean_ci([2.5, 2.5, 2.5])[:3] == (2.5, 2.5, 2.5)  # zero width
  x = [1.0, float("nan"), 2.0, 4.0]
  m, lo, hi, n = report_stats.mean_ci(x)
  assert n == 3
  np.testing.assert_allclose((m, lo, hi), _ref_ci([1.0, 2.0, 4.0]), rtol=1e-12)
  assert report_stats.mean_ci([])[3] == 0 and all(math.isnan(v) for v in report_stats.mean_ci([float("nan")])[:3])


def test_mean_ci_coverage():
  rng = np.random.default_rng(1)
  samples = rng.normal(1.0, 3.0, size=(2000, 3))
  covered = [lo <= 1.0 <= hi for lo, hi in (report_stats.mean_ci(s)[1:3] for s in samples)]
  assert 0.93 <= np.mean(covered) <= 0.97


def test_fit_gao_recovers_parameters():
  d = np.concatenate([[0.0], np.linspace(0.05, 3.0, 20)])  # d = 0 is dropped
  r = np.where(d > 0, d * (0.8 - 0.25 * np.log(np.where(d > 0, d, 1))), 123.0)
  alpha, beta, r2 = report_stats.fit_gao(d, r)
  np.testing.assert_allclose((alpha, beta, r2), (0.8, 0.25, 1.0), rtol=1e-9)
  assert all(math.isnan(v) for v in report_stats.fit_gao([0.5], [0.1]))
  assert all(math.isnan(v) for v in report_stats.fit_gao([0.0, -1.0, 0.5], [1.0, 2.0, 3.0]))


def test_mean_curve_uses_steps_common_to_all_seeds(sweep):
  root, data = sweep
  runs = [r for r in report_runs.discover([str(root)]) if r.group == "cell_a"]
  c = report_stats.mean_curve(runs, "eval_accuracy", 0.95)
  assert c["step"].tolist() == [0, 20, 60]  # seed 2 has no eval at step 40
  ref = [_ref_ci([next(r["eval_accuracy"] for r in data["cell_a"][k] if r["step"] == s) for k in range(3)])
         for s in (0, 20, 60)]
  np.testing.assert_allclose(np.stack([c["mean"], c["low"], c["high"]], 1), ref, rtol=1e-12)
  np.testing.assert_allclose(c["elapsed"], [1.5 * s + 1 for s in (0, 20, 60)])  # mean over seeds


# ---------------------------------------------------------------- the written report

def test_report_files(written):
  path, out, _ = written
  assert path == str(out / "report.md")
  names = ["report.md", "report.csv", "fits.csv", "frontier.png", "gold_proxy_vs_sqrt_kl.png",
           "eval_accuracy.png", "eval_kl.png", "eval_reward_gold.png", "eval_reward_proxy.png",
           "capability_nll.png", "performance_profile.png", "scaling_fit.png", "pairs.csv",
           "scaling_fits.csv", "equal_kl.png", "equal_x.csv"]
  for name in names:
    assert (out / name).stat().st_size > 0, name
  assert (out / "eval_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  md = (out / "report.md").read_text()
  embedded = re.findall(r"!\[[^\]]+\]\(([^)]+)\)", md)
  assert set(embedded) == {n for n in names if n.endswith(".png")}


def test_report_csv_matches_numpy(written):
  _, out, data = written
  with open(out / "report.csv") as f:
    rows = list(csv.DictReader(f))
  assert list(rows[0]) == list(report.CSV_COLUMNS)
  assert [r["group"] for r in rows][0] == "cell_b"  # sweep.json display order
  assert "prep" not in {r["group"] for r in rows}  # excluded by sweep.json
  assert {r["label"] for r in rows if r["group"] == "cell_a"} == {"GRPO (RM)"}
  by = {(r["group"], r["metric"]): r for r in rows}
  for g in ("cell_a", "cell_b"):
    for m in ("eval_accuracy", "eval_reward/gold", "eval_reward/proxy", "eval_kl", "capability_nll"):
      finals, deltas = zip(*(_final_and_delta(data[g][k], m) for k in range(3)))
      row = by[g, m]
      got = [float(row[c]) for c in ("mean", "ci_low", "ci_high", "delta_mean", "delta_ci_low", "delta_ci_high")]
      m_ref, lo_ref, hi_ref = _ref_ci(finals)
      lo, hi = RANGES.get(m, (-math.inf, math.inf))  # final-value intervals clipped to the range
      ref = (m_ref, min(max(lo_ref, lo), hi), min(max(hi_ref, lo), hi)) + _ref_ci(deltas)
      np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-12)
      assert int(row["n"]) == sum(not math.isnan(v) for v in finals)
      np.testing.assert_allclose(float(row["std"]), np.nanstd(finals, ddof=1), rtol=1e-9)
      np.testing.assert_allclose([float(v) for v in row["values"].split(";")], finals)
  assert by["cell_b", "eval_accuracy"]["n"] == "2"  # seed 1's final is "nan"
  # cell_b seed 2 stopped at step 40: its final is the step-40 value
  assert float(by["cell_b", "eval_kl"]["values"].split(";")[2]) == pytest.approx(0.5 * 40 / 60 * 1.4)
  wall = by["cell_a", "elapsed_s"]
  assert float(wall["mean"]) == pytest.approx(np.mean([1.5 * 60 + k for k in range(3)]))
  assert math.isnan(float(wall["delta_mean"]))


def test_report_fits_recover_true_parameters(written):
  _, out, _ = written
  with open(out / "fits.csv") as f:
    fits = {r["group"]: r for r in csv.DictReader(f)}
  for g, (alpha, beta) in GAO.items():
    np.testing.assert_allclose([float(fits[g]["alpha"]), float(fits[g]["beta"])], [alpha, beta], rtol=1e-6)
    assert float(fits[g]["r2"]) == pytest.approx(1.0)
  assert fits["cell_a"]["n_points"] == "8"  # 3 seeds x 3 non-zero-KL evals, one missing


def test_report_markdown(written):
  path, _, data = written
  md = open(path).read()
  assert md.startswith("# Sweep title from sweep.json\n")
  for s in ("Generated 2", "## Runs", "## How to read this", "Student-t 95%", "paired per seed",
            "## Final metrics", "## Over-optimisation fit", "| group | α | β | R² | points |",
            "## Alignment tax", "Δ `eval_reward/gold`", "Δ `capability_nll`", "cell_a", "cell_b",
            "GRPO (RM)", "**unfinished**", "Gao"):
    assert s in md, s
  assert "prep" not in md
  assert md.index("| cell_b |") < md.index("| cell_a |")
  tax = md[md.index("## Alignment tax"):].split("## Figures")[0]
  deltas = [_final_and_delta(data["cell_a"][k], "capability_nll")[1] for k in range(3)]
  assert f"{np.mean(deltas):.4g}" in tax


def test_explicit_arguments_override_sweep_json(sweep, tmp_path):
  root, _ = sweep
  path = report.write_report([str(root)], str(tmp_path), metrics=["eval_accuracy"], title="Mine",
                             exclude=["cell_b"])
  md = open(path).read()
  assert md.startswith("# Mine\n") and "cell_b" not in md
  assert (tmp_path / "eval_accuracy.png").exists() and not (tmp_path / "eval_kl.png").exists()


# ---------------------------------------------------------------- CLI errors

@pytest.mark.parametrize("args", [["{tmp}/does_not_exist"], ["{tmp}"], ["{root}", "--metrics=eval_nope"],
                                  ["{root}", "--groups=cell_z"]])
def test_cli_user_errors_exit_2_with_one_line(args, sweep, tmp_path, capsys):
  root, _ = sweep
  with pytest.raises(SystemExit) as e:
    report.main([a.format(tmp=tmp_path, root=root) for a in args] + [f"--out={tmp_path}/out"])
  assert e.value.code == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err


def test_cli_default_out_dir(sweep, capsys):
  root, _ = sweep
  assert report.main([str(root / "cell_a"), "--metrics=eval_accuracy"]) == 0
  assert (root / "cell_a" / "report" / "report.md").exists()
  assert "report.md" in capsys.readouterr().out


def test_offline_trainer_runs_show_their_training_metrics(tmp_path):
  """A report on DPO / RM runs (no eval_* rewards) lists each trainer's own training metrics
  in the final table: DPO loss / reward_accuracy / reward_margin, RM accuracy; one seed says
  'n = 1, no interval', never '[nan, nan]'."""
  dpo = [{"step": s, "loss": 0.7 - 0.1 * s, "reward_accuracy": 0.5 + 0.1 * s,
          "reward_margin": 0.2 * s, "elapsed_s": 2.0 * s} for s in (1, 2, 3)]
  rm = [{"step": s, "loss": 0.6 - 0.1 * s, "accuracy": 0.6 + 0.1 * s} for s in (1, 2)]
  _write_run(tmp_path / "runs" / "dpo", dpo)
  _write_run(tmp_path / "runs" / "rm", rm)
  md = open(report.write_report([str(tmp_path / "runs")], str(tmp_path / "rep"))).read()
  rows = {(r["group"], r["metric"]): r for r in csv.DictReader(open(tmp_path / "rep" / "report.csv"))}
  assert float(rows["dpo", "reward_accuracy"]["mean"]) == pytest.approx(0.8)
  assert float(rows["dpo", "reward_accuracy"]["delta_mean"]) == pytest.approx(0.2)  # vs step 1
  assert float(rows["dpo", "reward_margin"]["mean"]) == pytest.approx(0.6)
  assert float(rows["rm", "accuracy"]["mean"]) == pytest.approx(0.8)
  assert float(rows["rm", "loss"]["mean"]) == pytest.approx(0.4)
  assert ("rm", "reward_accuracy") not in rows
  assert "`reward_accuracy`" in md and "`accuracy`" in md
  assert "n = 1, no interval" in md and "[nan, nan]" not in md
