"""rlhf_jax.report_robust: IQM, stratified bootstrap CIs, probability of improvement, seeds
needed, performance profiles and the ScaleRL compute-scaling fit, each against an independent
computation (numpy / scipy written here, fixed bootstrap seeds); and the report's new sections
on runs with different logging steps, a missing seed and a one-seed group. No JAX."""
import csv
import json
import math

import numpy as np
import pytest
from scipy import stats

from rlhf_jax import report, report_robust as rr

X = np.array([0.31, 0.52, 0.18, 0.94, 0.40, 0.52, 0.77, 0.05])
Y = np.array([0.12, 0.52, 0.35, 0.40, 0.29])


# ---------------------------------------------------------------- aggregates

def test_iqm_is_the_mean_of_the_middle_half():
  for n in (4, 8, 12, 13):
    x = np.random.default_rng(n).normal(size=n)
    k = n // 4
    assert rr.iqm(x) == pytest.approx(np.sort(x)[k:n - k].mean(), rel=1e-12)
  x = np.array([1.0, 2.0, 30.0])  # n < 4: nothing is cut
  assert rr.iqm(x) == pytest.approx(11.0)
  assert rr.iqm(np.array([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 1000.0])) == pytest.approx(3.5)


@pytest.mark.parametrize("stat", ["mean", "iqm"])
def test_bootstrap_ci_matches_scipy_percentile_bootstrap(stat):
  fn = {"mean": np.mean, "iqm": lambda a, axis: stats.trim_mean(a, 0.25, axis=axis)}[stat]
  ours = rr.bootstrap_ci([X], rr._mean if stat == "mean" else rr.iqm, 0.95, 2000, seed=7)
  ref = stats.bootstrap((X,), fn, method="percentile", n_resamples=2000, confidence_level=0.95,
                        rng=np.random.default_rng(7), vectorized=True).confidence_interval
  assert ours[3] == X.size
  assert ours[0] == pytest.approx(float(fn(X, axis=-1)), rel=1e-12)
  np.testing.assert_allclose(ours[1:3], (ref.low, ref.high), rtol=1e-12)
  assert ours[1] < ours[0] < ours[2]
  assert rr.bootstrap_ci([X], seed=7) == rr.bootstrap_ci([X], seed=7)  # seeded: reproducible
  assert rr.bootstrap_ci([X], seed=7)[1:3] != rr.bootstrap_ci([X], seed=8)[1:3]


def test_stratified_bootstrap_resamples_within_each_stratum():
  """Two tasks: each resample draws every task's own runs; vs a loop written here."""
  a, b = np.array([0.1, 0.2, 0.3, 0.9]), np.array([5.0, 6.0, 7.0])
  est, low, high, n = rr.bootstrap_ci([a, b], rr.iqm, 0.9, 500, seed=3)
  rng, dist = np.random.default_rng(3), []
  ia, ib = rng.integers(0, 4, (500, 4)), rng.integers(0, 3, (500, 3))
  for r in range(500):
    dist.append(stats.trim_mean(np.concatenate([a[ia[r]], b[ib[r]]]), 0.25))
  np.testing.assert_allclose((low, high), np.quantile(dist, [0.05, 0.95]), rtol=1e-12)
  assert n == 7 and est == pytest.approx(stats.trim_mean(np.concatenate([a, b]), 0.25))
  # every resample keeps 4 runs of a and 3 of b: never all from the same task
  assert 1.0 < low < high < 5.5


def test_bootstrap_ci_range_nan_and_one_run():
  kl = [-0.05, 0.01, 0.02, -0.03]  # k1 estimates may dip below 0; KL cannot
  _, low, high, _ = rr.bootstrap_ci([kl], value_range=rr.metric_range("eval_kl"))
  assert low == 0.0 and high >= 0.0
  assert rr.bootstrap_ci([kl])[1] < 0  # unclipped without the range
  m, low, high, n = rr.bootstrap_ci([[0.4, float("nan")]])
  assert (m, n) == (0.4, 1) and math.isnan(low) and math.isnan(high)
  assert rr.bootstrap_ci([[]])[3] == 0


def test_metric_ranges():
  for m in ("eval_accuracy", "capability_exact_match", "eval_finished", "eval_repetition_rate"):
    assert rr.metric_range(m) == (0.0, 1.0), m
  for m in ("eval_kl", "kl", "elapsed_s", "capability_nll", "eval_length"):
    assert rr.metric_range(m) == (0.0, math.inf), m
  for m in ("eval_reward/gold", "eval_length_drift", "kl_coef", "loss"):
    assert rr.metric_range(m) == (-math.inf, math.inf), m
  assert rr.metric_range("eval_reward/gold", {"eval_reward/gold": [0, 1]}) == (0.0, 1.0)
  assert rr.metric_range("x", {"x": [None, 2]}) == (-math.inf, 2.0)


# ---------------------------------------------------------------- pairs of arms

def test_probability_of_improvement_is_mann_whitney_u_over_nm():
  p, low, high = rr.prob_improvement(X, Y, 0.95, 1000, seed=11)
  assert p == pytest.approx(stats.mannwhitneyu(X, Y).statistic / (X.size * Y.size), rel=1e-12)
  ties = sum(1.0 if x > y else 0.5 if x == y else 0.0 for x in X for y in Y) / (X.size * Y.size)
  assert p == pytest.approx(ties)  # X and Y share the value 0.52 and 0.40: ties count 1/2

  def u(x, y, axis):
    return stats.mannwhitneyu(x, y, axis=axis).statistic / (x.shape[axis] * y.shape[axis])
  ref = stats.bootstrap((X, Y), u, method="percentile", n_resamples=1000, vectorized=True,
                        rng=np.random.default_rng(11)).confidence_interval
  np.testing.assert_allclose((low, high), (ref.low, ref.high), rtol=1e-12)
  q, _, _ = rr.prob_improvement(Y, X)
  assert p + q == pytest.approx(1.0)
  one = rr.prob_improvement([0.3], [0.2])
  assert one[0] == 1.0 and math.isnan(one[1]) and math.isnan(one[2])


def test_seeds_needed_follows_the_formula():
  x, y = np.array([0.50, 0.55, 0.61, 0.47]), np.array([0.45, 0.52, 0.40])
  n, d, s2 = rr.seeds_needed(x, y)
  s2_ref = (np.var(x, ddof=1) + np.var(y, ddof=1)) / 2
  z = stats.norm.ppf(0.975) + stats.norm.ppf(0.8)
  assert d == pytest.approx(x.mean() - y.mean()) and s2 == pytest.approx(s2_ref)
  assert n == math.ceil(2 * z ** 2 * s2_ref / d ** 2) == 11
  assert rr.seeds_needed(x, y, alpha=0.01, power=0.9)[0] > n
  assert math.isnan(rr.seeds_needed([0.5], y)[0])
  assert math.isinf(rr.seeds_needed([1.0, 2.0], [0.5, 2.5])[0])
  assert rr.seeds_needed([1.0, 1.01], [5.0, 5.01])[0] == 2  # at least 2


def test_performance_profile():
  taus = np.array([-1.0, 0.0, 0.3, 0.52, 1.0])
  frac, low, high = rr.performance_profile(X, taus, reps=300, seed=1)
  np.testing.assert_allclose(frac, [np.mean(X > t) for t in taus])
  assert np.all(low <= frac + 1e-12) and np.all(frac <= high + 1e-12)
  assert (low[0], high[0], low[-1], high[-1]) == (1.0, 1.0, 0.0, 0.0)
  assert np.isnan(rr.performance_profile([0.2], taus)[1]).all()


# ---------------------------------------------------------------- compute-scaling fit

TRUE = dict(r0=0.2, a=0.8, b=1.5, c_mid=60.0)


def test_scaling_fit_recovers_noise_free_parameters():
  c = np.arange(0, 301, 10.0)
  f = rr.fit_scaling(c, rr.scaling_curve(c, **TRUE))
  assert f["status"] == "ok" and f["n_points"] == c.size
  np.testing.assert_allclose([f[k] for k in TRUE], list(TRUE.values()), rtol=1e-6)
  assert f["r2"] == pytest.approx(1.0)
  # a falling curve (reward hacking) is a sigmoid with A < R0
  g = rr.fit_scaling(c, rr.scaling_curve(c, 0.6, 0.1, 2.0, 100.0))
  np.testing.assert_allclose([g["r0"], g["a"], g["b"], g["c_mid"]], [0.6, 0.1, 2.0, 100.0], rtol=1e-6)


def test_scaling_fit_recovers_parameters_from_noisy_seeds():
  rng = np.random.default_rng(0)
  c = np.tile(np.arange(0, 301, 10.0), 3)
  r = rr.scaling_curve(c, **TRUE) + rng.normal(0, 0.01, c.size)
  f = rr.fit_scaling(c, r)
  assert f["status"] == "ok"
  np.testing.assert_allclose([f["r0"], f["a"], f["b"], f["c_mid"]], list(TRUE.values()), rtol=0.1)


def test_scaling_fit_not_identified():
  for c, r in (([0.0, 10.0], [0.1, 0.2]), ([10.0, 20.0, 30.0, 40.0], [0.1, 0.2, 0.3, 0.4])):
    f = rr.fit_scaling(c, r)
    assert f["status"].startswith("not identified: too few points"), f
    assert all(math.isnan(f[k]) for k in ("r0", "a", "b", "c_mid", "r2"))
  c = np.arange(0, 101, 10.0)
  assert rr.fit_scaling(c, np.full(c.size, 0.3))["status"] == "not identified: flat curve"
  # a straight line: the curve never bends within the data
  assert rr.fit_scaling(c, 0.1 + 0.002 * c)["status"].startswith("not identified")


def test_scaling_fit_bootstrap_over_seeds(tmp_path):
  runs = []
  for k in range(4):
    rng = np.random.default_rng(k)
    steps = np.arange(0, 301, 10 + 5 * (k % 2))  # seeds log at different steps
    rows = [{"step": int(s), "eval_reward": float(v), "samples": int(64 * s)}
            for s, v in zip(steps, rr.scaling_curve(steps, **TRUE) + rng.normal(0, 0.01, steps.size))]
    runs.append(report.Run("g", k, str(tmp_path), rows))
  f = rr.fit_scaling_seeds(runs, "eval_reward", "step", reps=100, seed=0)
  assert f["status"] == "ok" and f["n_seeds"] == 4 and f["boot_ok"] > 0.9
  for k in ("a", "b", "c_mid"):
    assert f[f"{k}_low"] <= f[k] <= f[f"{k}_high"]
  assert f["a_low"] < TRUE["a"] < f["a_high"]
  g = rr.fit_scaling_seeds(runs, "eval_reward", "samples", reps=50)
  assert g["c_mid"] == pytest.approx(64 * f["c_mid"], rel=1e-3)  # the x column is used
  one = rr.fit_scaling_seeds(runs[:1], "eval_reward", "step")
  assert one["status"] == "ok" and math.isnan(one["a_low"]) and math.isnan(one["boot_ok"])
  none = rr.fit_scaling_seeds(runs, "eval_nope", "step")
  assert none["status"].startswith("not identified") and none["n_seeds"] == 0


# ---------------------------------------------------------------- the report

ARMS = {"ppo": (0.2, 0.8, 1.5, 60.0), "grpo": (0.2, 0.6, 2.0, 40.0), "dpo": (0.2, 0.5, 1.0, 80.0)}
LOGGING = {("ppo", 0): 10, ("ppo", 1): 20, ("ppo", 2): 15, ("grpo", 0): 10, ("grpo", 2): 25,
           ("dpo", 0): 20}  # grpo seed 1 is missing; dpo has one seed


def _final(arm, seed):
  last = 300 - 300 % LOGGING[arm, seed]
  return float(rr.scaling_curve(last, *ARMS[arm])) + 0.02 * seed


@pytest.fixture(scope="module")
def ragged(tmp_path_factory):
  root = tmp_path_factory.mktemp("ragged")
  for (arm, seed), every in LOGGING.items():
    d = root / arm / f"seed-{seed}"
    d.mkdir(parents=True)
    with open(d / "metrics.jsonl", "w") as f:
      for s in range(0, 301, every):
        f.write(json.dumps({"step": s, "elapsed_s": 0.5 * s, "eval_kl": 0.001 * s - 0.02,
                            "eval_reward": float(rr.scaling_curve(s, *ARMS[arm])) + 0.02 * seed}) + "\n")
  return root


def test_report_robust_sections_on_ragged_runs(ragged, tmp_path):
  path = report.write_report([str(ragged)], str(tmp_path), bootstrap_reps=500)
  md = open(path).read()
  for s in ("## Final metrics: IQM and mean, bootstrap CIs", "## Final metrics: Student-t CIs",
            "## Probability of improvement (`eval_reward`)", "**Seeds needed**",
            "## Compute-scaling fit", "(n = 1, no interval)", "performance_profile.png",
            "scaling_fit.png", "- dpo vs ppo: not computable (have 1 and 3"):
    assert s in md, s
  assert "nan, nan" not in md and "[nan" not in md
  assert md.index("IQM and mean, bootstrap") < md.index("Student-t CIs")
  for name in ("performance_profile.png", "scaling_fit.png"):
    assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
  finals = {a: [_final(a, k) for (b, k) in LOGGING if b == a] for a in ARMS}
  with open(tmp_path / "report.csv") as f:
    rows = {(r["group"], r["metric"]): r for r in csv.DictReader(f)}
  grpo = rows["grpo", "eval_reward"]
  assert grpo["n"] == "2"
  ref = stats.bootstrap((np.array(finals["grpo"]),), np.mean, method="percentile", n_resamples=500,
                        rng=np.random.default_rng(0), vectorized=True).confidence_interval
  np.testing.assert_allclose([float(grpo["mean_boot_low"]), float(grpo["mean_boot_high"])],
                             [ref.low, ref.high], rtol=1e-9)
  assert float(rows["ppo", "eval_kl"]["ci_low"]) >= 0.0  # KL intervals clipped at 0
  with open(tmp_path / "pairs.csv") as f:
    pairs = {(r["metric"], r["group_x"], r["group_y"]): r for r in csv.DictReader(f)}
  for x, y in (("ppo", "grpo"), ("grpo", "ppo"), ("ppo", "dpo")):
    u = stats.mannwhitneyu(finals[x], finals[y]).statistic / (len(finals[x]) * len(finals[y]))
    assert float(pairs["eval_reward", x, y]["p_improve"]) == pytest.approx(u)
  need, _, _ = rr.seeds_needed(finals["grpo"], finals["ppo"])
  assert float(pairs["eval_reward", "grpo", "ppo"]["seeds_needed"]) == need
  assert f"- grpo vs ppo: d = " in md and f"**{int(need)} seeds per arm** (have 2 and 3: " in md
  with open(tmp_path / "scaling_fits.csv") as f:
    fits = {r["group"]: r for r in csv.DictReader(f)}
  for arm in ("ppo", "grpo"):
    assert fits[arm]["status"] == "ok" and fits[arm]["x"] == "step"
    np.testing.assert_allclose(float(fits[arm]["a"]), ARMS[arm][1] + 0.02 * np.mean(
        [k for (b, k) in LOGGING if b == arm]), atol=0.03)
  assert fits["dpo"]["status"] == "ok" and math.isnan(float(fits["dpo"]["a_low"]))  # one seed: no interval


def test_report_options_first_table_and_seed(ragged, tmp_path, capsys):
  out = tmp_path / "t"
  assert report.main([str(ragged), f"--out={out}", "--first_table=t", "--primary=eval_kl",
                      "--scaling_x=elapsed_s", "--bootstrap_seed=3", "--bootstrap_reps=200"]) == 0
  md = (out / "report.md").read_text()
  assert md.index("Student-t CIs") < md.index("IQM and mean, bootstrap")
  assert "## Probability of improvement (`eval_kl`)" in md and "cumulative `elapsed_s`" in md
  assert "200 resamples" in md and "bootstrap seed 3" in md
  with pytest.raises(SystemExit):
    report.main([str(ragged), f"--out={out}", "--scaling_x=nope"])
  assert "unknown x column" in capsys.readouterr().err
