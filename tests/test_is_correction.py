"""Sampler-mismatch importance-sampling correction (`rollout.is_correction`,
`rlhf_jax/losses/is_correction.py`) vs float64 numpy references written from the formulas;
the weighted PPO / GRPO losses; one tiny GRPO step with tis."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.losses.grpo import grpo_loss
from rlhf_jax.losses.is_correction import is_weights, weights_fn
from rlhf_jax.losses.ppo import AGGREGATIONS, ppo_policy_loss

B, T = 6, 10
MODES = [(mode, level) for mode in ("tis", "mis") for level in ("token", "sequence")]


def make_batch(seed, spread=0.5):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(1, T + 1, size=B)
  m = (np.arange(T)[None, :] < lengths[:, None]).astype(np.float32)
  m[1] = 0.0                                      # all-masked row
  m[2] = 1.0                                      # full row
  sample = -rng.exponential(1.0, size=(B, T)).astype(np.float32)
  old = (sample + rng.normal(0, spread, size=(B, T))).astype(np.float32)
  old[m == 0], sample[m == 0] = 50.0, -50.0       # garbage where masked
  return old, sample, m


def np_weights(old, sample, m, mode, cap, level):
  """float64 reference: (weights, hit) from the module docstring's formulas."""
  log_rho = np.where(m > 0, np.float64(old) - np.float64(sample), 0.0)
  log_r = log_rho if level == "token" else np.broadcast_to(log_rho.sum(1, keepdims=True),
                                                           log_rho.shape)
  r = np.exp(np.minimum(log_r, 700.0))
  if mode == "tis":
    w, hit = np.minimum(r, cap), log_r > math.log(cap)
  else:
    hit = np.abs(log_r) > math.log(cap)
    w = np.where(hit, 0.0, r)
  return np.where(m > 0, w, 0.0), hit, log_rho, log_r


@pytest.mark.parametrize("mode,level", MODES)
def test_weights_and_metrics_match_numpy(mode, level):
  old, sample, m = make_batch(0)
  cap = 1.7 if level == "token" else 3.0
  w, met = is_weights(old, sample, m, mode, cap, level)
  want, hit, log_rho, log_r = np_weights(old, sample, m, mode, cap, level)
  np.testing.assert_allclose(np.asarray(w), want, rtol=1e-5, atol=1e-7)
  real = m > 0
  n = real.sum()
  assert 0 < hit[real].mean() < 1  # the batch exercises both branches
  ref = {"logp_abs_diff": np.abs(log_rho)[real].mean(),
         "kl_k1": (-log_rho)[real].mean(),
         "kl_k3": (np.exp(log_rho) - 1 - log_rho)[real].mean(),
         "log_ratio_abs_max": np.abs(log_r)[real].max(),
         "weight_mean": want[real].sum() / n, "weight_max": want[real].max(),
         ("clipped_frac" if mode == "tis" else "masked_frac"): hit[real].mean()}
  assert set(met) == set(ref)
  for k, v in ref.items():
    np.testing.assert_allclose(float(met[k]), v, rtol=2e-5, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("mode,level", MODES + [("none", "token")])
def test_identical_logps_give_weight_one_and_zero_mismatch(mode, level):
  _, sample, m = make_batch(1)
  w, met = is_weights(sample, sample, m, mode, 2.0, level)
  np.testing.assert_array_equal(np.asarray(w), m)  # 1 on real tokens, 0 where masked
  for k in ("logp_abs_diff", "kl_k1", "kl_k3", "log_ratio_abs_max"):
    assert float(met[k]) == 0.0, k
  assert float(met["weight_max"]) == 1.0
  np.testing.assert_allclose(float(met["weight_mean"]), 1.0, rtol=1e-6)
  assert float(met.get("clipped_frac", met.get("masked_frac", 0.0))) == 0.0


@pytest.mark.parametrize("mode,level", MODES)
def test_all_masked_batch_gives_zero_weights_and_finite_zero_metrics(mode, level):
  old, sample, m = make_batch(2)
  w, met = is_weights(old, sample, np.zeros_like(m), mode, 2.0, level)
  assert not np.asarray(w).any()
  assert all(float(v) == 0.0 for v in met.values()), met


@pytest.mark.parametrize("mode,level", MODES)
def test_huge_ratios_stay_finite(mode, level):
  m = np.ones((2, 3), np.float32)
  old = np.array([[1e4, 0.0, 0.0], [-1e4, 0.0, 0.0]], np.float32)
  sample = np.zeros_like(old)
  w = np.asarray(is_weights(old, sample, m, mode, 2.0, level)[0])
  assert np.isfinite(w).all()
  if mode == "tis":  # truncated at C above; a tiny ratio gives a tiny weight
    want = [[2, 1, 1], [0, 1, 1]] if level == "token" else [[2, 2, 2], [0, 0, 0]]
  else:  # masked outside [1/C, C]
    want = [[0, 1, 1], [0, 1, 1]] if level == "token" else [[0, 0, 0], [0, 0, 0]]
  np.testing.assert_allclose(w, want, rtol=1e-6)


def test_cap_boundary_is_closed():
  """rho = C exactly: not clipped (tis), kept (mis); 1/C kept (mis); just beyond: clipped /
  masked."""
  log_c = np.float32(math.log(2.0))
  beyond = np.nextafter(log_c, np.float32(np.inf))
  old = np.array([[log_c, -log_c, beyond, -beyond]], np.float32)
  sample, m = np.zeros_like(old), np.ones_like(old)
  w, met = is_weights(old, sample, m, "tis", 2.0, "token")
  np.testing.assert_allclose(np.asarray(w), [[2.0, 0.5, 2.0, 0.5]], rtol=1e-6)
  assert float(met["clipped_frac"]) == 0.25
  w, met = is_weights(old, sample, m, "mis", 2.0, "token")
  np.testing.assert_allclose(np.asarray(w), [[2.0, 0.5, 0.0, 0.0]], rtol=1e-6)
  assert float(met["masked_frac"]) == 0.5


def test_weights_are_constants_and_bad_arguments_raise():
  old, sample, m = make_batch(3)
  g = jax.grad(lambda o, s: jnp.sum(is_weights(o, s, m, "tis", 2.0, "token")[0]), (0, 1))(
      jnp.asarray(old), jnp.asarray(sample))
  assert not np.asarray(g[0]).any() and not np.asarray(g[1]).any()
  for kw, msg in ((dict(mode="ois"), "mode"), (dict(level="word"), "level"),
                  (dict(cap=1.0), "cap"), (dict(cap=float("inf")), "cap")):
    with pytest.raises(ValueError, match=msg):
      is_weights(old, sample, m, **{"mode": "tis", "cap": 2.0, "level": "token", **kw})


# ----------------------------------------------------------------------------- the losses

def np_aggregate(l, m, agg, max_len):
  l = np.where(m > 0, l, 0.0)
  n = m.sum(1)
  rows = n > 0
  per = {"token_mean": None, "seq_mean_token_mean": l.sum(1) / np.maximum(n, 1),
         "seq_mean_token_sum": l.sum(1), "seq_mean_token_sum_norm": l.sum(1) / max_len}[agg]
  return l.sum() / max(m.sum(), 1) if per is None else per[rows].mean()


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_grpo_loss_with_weights_matches_numpy(aggregation):
  """The weights multiply each token's clipped surrogate; the normaliser stays that of the
  mask (a masked-out token, w = 0, still counts in token and sequence means)."""
  old, sample, m = make_batch(4)
  rng = np.random.default_rng(5)
  logp = (old + rng.normal(0, 0.2, size=old.shape)).astype(np.float32)
  adv = rng.normal(size=B).astype(np.float32)
  w, _ = is_weights(old, sample, m, "mis", 2.0, "token")
  loss, met = grpo_loss(logp, old, adv, m, aggregation=aggregation, max_len=T, is_weights_BC=w)
  r = np.exp(np.where(m > 0, np.float64(logp) - old, 0.0))
  a = np.float64(adv)[:, None]
  surrogate = np.maximum(-a * r, -a * np.clip(r, 0.8, 1.2)) * np.asarray(w, np.float64)
  want = np_aggregate(surrogate, m, aggregation, T)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(met["policy_loss"]), want, rtol=1e-5, atol=1e-6)
  # all-ones weights leave the loss bit for bit as without them
  ones = np.ones_like(m)
  assert float(grpo_loss(logp, old, adv, m, aggregation=aggregation, max_len=T,
                         is_weights_BC=ones)[0]) == float(
      grpo_loss(logp, old, adv, m, aggregation=aggregation, max_len=T)[0])


def test_ppo_policy_loss_with_weights_matches_numpy_and_grad_is_weighted():
  old, sample, m = make_batch(6)
  rng = np.random.default_rng(7)
  logp = (old + rng.normal(0, 0.2, size=old.shape)).astype(np.float32)
  adv = rng.normal(size=(B, T)).astype(np.float32)
  w, _ = is_weights(old, sample, m, "tis", 2.0, "sequence")
  loss, _ = ppo_policy_loss(logp, old, adv, m, is_weights_BC=w)
  r = np.exp(np.where(m > 0, np.float64(logp) - old, 0.0))
  per = np.maximum(-adv * r, -adv * np.clip(r, 0.8, 1.2)) * np.asarray(w, np.float64)
  np.testing.assert_allclose(float(loss), np_aggregate(per, m, "token_mean", T), rtol=1e-5)
  # d loss / d logp_t = w_t * (the unweighted token gradient)
  g_w = jax.grad(lambda x: ppo_policy_loss(x, old, adv, m, is_weights_BC=w)[0])(jnp.asarray(logp))
  g_1 = jax.grad(lambda x: ppo_policy_loss(x, old, adv, m)[0])(jnp.asarray(logp))
  np.testing.assert_allclose(np.asarray(g_w), np.asarray(g_1) * np.asarray(w), rtol=1e-5,
                             atol=1e-8)


# ----------------------------------------------------------------------------- the trainer

def test_default_is_off_and_adds_nothing():
  """rollout.is_correction defaults to "none": `weights_fn` gives None, so the trainers add no
  array, pass and metric (results bitwise as before: experiments/bitwise/compare_checkouts.py)."""
  from rlhf_jax.launch import load_config
  for algo in ("grpo", "ppo"):
    r = load_config(f"configs/{algo}.py:tiny").rollout
    assert r.is_correction == "none" and weights_fn(r) is None
    assert weights_fn({k: v for k, v in r.items() if not k.startswith("is_")}) is None


@pytest.mark.slow
def test_grpo_step_with_tis_logs_is_metrics(tfds_data_dir, tmp_path):
  """One tiny GRPO step (random init, the default's one update per rollout) with tis: the
  old-log-prob pass runs although the update is on-policy, and the is/ metrics are logged;
  on CPU the sampler and the trainer agree to float32 rounding, so no token is clipped."""
  from conftest import override, read_metrics
  from rlhf_jax.launch import load_config
  from rlhf_jax.trainers import grpo
  c = override(load_config("configs/grpo.py:tiny"), num_steps=1, log_every=1, eval_every=0,
               **{"checkpoint.async_save": False, "data.data_dir": tfds_data_dir,
                  "rollout.is_correction": "tis"})
  grpo.run(c, str(tmp_path))
  row = read_metrics(str(tmp_path))[-1]
  keys = {"is/logp_abs_diff", "is/kl_k1", "is/kl_k3", "is/log_ratio_abs_max", "is/weight_mean",
          "is/weight_max", "is/clipped_frac"}
  assert keys <= set(row) and all(np.isfinite(row[k]) for k in keys)
  # the old-log-prob pass ran next to the reference pass: two forwards of the packed
  # rows the update (3 forwards) runs over
  assert row["flops/logprob_passes"] == pytest.approx(2 * row["flops/update"] / 3)
  assert 0 <= row["is/logp_abs_diff"] < 1e-4 and row["is/clipped_frac"] == 0.0
  assert abs(row["is/weight_mean"] - 1.0) < 1e-4 and np.isfinite(row["loss"])
