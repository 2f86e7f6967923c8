"""PPO losses (clipped surrogate, dual clip, clipped value loss, entropy) vs float64 numpy references."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.losses.ppo import (AGGREGATIONS, aggregate, entropy_from_logits, explained_variance,
                                 ppo_loss, ppo_policy_loss, ppo_value_loss)

B, T, V = 8, 12, 7


def ragged_mask(rng):
  lengths = rng.integers(1, T + 1, size=B)
  m = (np.arange(T)[None, :] < lengths[:, None]).astype(np.float32)
  m[1] = 0.0                 # all-masked row
  m[2] = 1.0                 # full row
  m[3] = 0.0
  m[3, 4:] = 1.0             # left-padded row
  return m


def make_batch(seed, spread=0.4):
  rng = np.random.default_rng(seed)
  m = ragged_mask(rng)
  logp = -rng.exponential(1.0, size=(B, T)).astype(np.float32)
  old = (logp + rng.normal(0, spread, size=(B, T))).astype(np.float32)
  adv = rng.normal(size=(B, T)).astype(np.float32)
  adv[0, :3] = 0.0                                   # zero advantages
  logp[m == 0], old[m == 0], adv[m == 0] = 50.0, -50.0, 1e4   # garbage where masked
  return logp, old, adv, m


# ----------------------------------------------------------------------------- numpy references

def np_aggregate(l, m, agg, max_len=None):
  l = np.where(m > 0, np.float64(l), 0.0)
  n = m.sum(1)
  rows = n > 0
  if agg == "token_mean":
    return l.sum() / max(m.sum(), 1)
  if agg == "seq_mean_token_mean":
    per = l.sum(1)[rows] / n[rows]
  elif agg == "seq_mean_token_sum":
    per = l.sum(1)[rows]
  else:
    per = l.sum(1)[rows] / (T if max_len is None else max_len)
  return per.mean() if rows.any() else 0.0


def np_agg_weights(m, agg, max_len=None):
  """d aggregate / d l_t for each token."""
  n = m.sum(1, keepdims=True)
  rows = max((n[:, 0] > 0).sum(), 1)
  if agg == "token_mean":
    return m / max(m.sum(), 1)
  if agg == "seq_mean_token_mean":
    return m / np.maximum(n, 1) / rows
  if agg == "seq_mean_token_sum":
    return m / rows
  return m / (T if max_len is None else max_len) / rows


def np_surrogate(r, a, eps_low, eps_high, dual):
  """PPO objective per token (Schulman et al. 2017 eq. 7; dual clip of Ye et al. 2020), as a loss,
  and whether its gradient through r is live."""
  obj = np.minimum(r * a, np.clip(r, 1 - eps_low, 1 + eps_high) * a)
  live = np.where(a > 0, r <= 1 + eps_high, np.where(a < 0, r >= 1 - eps_low, True))
  if dual is not None:
    hit = (a < 0) & (dual * a > obj)
    obj = np.where(hit, dual * a, obj)
    live = live & ~hit
  return -obj, live


def np_policy(logp, old, a, m, eps=0.2, eps_high=None, dual=None, agg="token_mean", max_len=None):
  eps_high = eps if eps_high is None else eps_high
  with np.errstate(over="ignore"):
    r = np.exp(np.float64(logp) - old)
  loss_t, live = np_surrogate(r, np.float64(a), eps, eps_high, dual)
  w = np_agg_weights(m, agg, max_len)
  grad = np.where((m > 0) & live, -np.float64(a) * r * w, 0.0)
  sel = m > 0
  rs, as_ = r[sel], np.float64(a[sel])
  low = ((rs < 1 - eps) & (as_ < 0)).mean()
  high = ((rs > 1 + eps_high) & (as_ > 0)).mean()
  metrics = {
      "policy_loss": np_aggregate(loss_t, m, agg, max_len),
      "clip_frac_low": low, "clip_frac_high": high, "clip_frac": low + high,
      "dual_clip_frac": 0.0 if dual is None else ((as_ < 0) & (rs > dual)).mean(),
      "approx_kl": ((rs - 1) - np.log(rs)).mean(),
      "ratio_mean": rs.mean(), "ratio_min": rs.min(), "ratio_max": rs.max(),
  }
  return metrics, grad


def np_value(v, v_old, ret, m, eps, agg="token_mean"):
  v, v_old, ret = np.float64(v), np.float64(v_old), np.float64(ret)
  e1 = (v - ret) ** 2
  if eps is None:
    per, clipped = e1, np.zeros_like(e1, bool)
  else:
    e2 = (v_old + np.clip(v - v_old, -eps, eps) - ret) ** 2
    per, clipped = np.maximum(e1, e2), e2 > e1
  w = np_agg_weights(m, agg)
  grad = np.where((m > 0) & ~clipped, (v - ret) * w, 0.0)   # d/dv of 0.5 (v - R)^2
  sel = m > 0
  ev = 1 - np.var(ret[sel] - v[sel]) / np.var(ret[sel])
  return {"value_loss": 0.5 * np_aggregate(per, m, agg), "value_clip_frac": clipped[sel].mean(),
          "values_mean": v[sel].mean(), "returns_mean": ret[sel].mean(),
          "explained_variance": ev}, grad


# ----------------------------------------------------------------------------- policy loss

def _policy_value_and_grad(logp, old, adv, m, **kw):
  (loss, metrics), g = jax.value_and_grad(ppo_policy_loss, has_aux=True)(logp, old, adv, m, **kw)
  return loss, metrics, g


_policy_jit = jax.jit(_policy_value_and_grad, static_argnames=("aggregation",))


def policy_value_and_grad(logp, old, adv, m, clip_eps=0.2, clip_eps_high=None, dual_clip=None,
                          aggregation="token_mean"):
  """Jitted loss, metrics, d loss / d logp; numeric knobs traced (one compile per aggregation).

  dual_clip=None is passed as a bound too large to bind; the None code path itself is
  covered by `all_policy_cases`.
  """
  return _policy_jit(logp, old, adv, m, clip_eps=clip_eps,
                     clip_eps_high=clip_eps if clip_eps_high is None else clip_eps_high,
                     dual_clip=1e30 if dual_clip is None else dual_clip, aggregation=aggregation)


POLICY_CASES = [
    dict(),
    dict(clip_eps=0.1),
    dict(clip_eps=0.2, clip_eps_high=0.28),
    dict(dual_clip=3.0),
    dict(aggregation="seq_mean_token_mean"),
    dict(aggregation="seq_mean_token_sum"),
    dict(aggregation="seq_mean_token_sum_norm"),
    dict(aggregation="seq_mean_token_sum_norm", max_len=40),
]


def lib_kw(kw):
  names = {"eps": "clip_eps", "eps_high": "clip_eps_high", "dual": "dual_clip", "agg": "aggregation",
           "max_len": "max_len"}
  inv = {v: k for k, v in names.items()}
  return {inv[k]: v for k, v in kw.items()}


@jax.jit
def all_policy_cases(logp, old, adv, m):
  """Every POLICY_CASES configuration in one compiled function (one compile for the test)."""
  return [_policy_value_and_grad(logp, old, adv, m, **kw) for kw in POLICY_CASES]


@pytest.mark.parametrize("seed", [0, 1])
def test_policy_loss_matches_numpy(seed):
  logp, old, adv, m = make_batch(seed)
  old[:, 5] = logp[:, 5] - 1.5                 # ratio e^1.5 = 4.5 > dual-clip c on some tokens
  adv[2, 5], adv[4, 5] = -1.0, -2.0
  results = all_policy_cases(*map(jnp.asarray, (logp, old, adv, m)))
  for kw, (loss, metrics, g) in zip(POLICY_CASES, results):
    want, want_g = np_policy(logp, old, adv, m, **lib_kw(kw))
    for k, v in want.items():
      np.testing.assert_allclose(float(metrics[k]), v, rtol=1e-5, atol=1e-6, err_msg=f"{kw} {k}")
    assert float(loss) == float(metrics["policy_loss"])
    np.testing.assert_allclose(np.asarray(g), want_g, rtol=1e-5, atol=1e-7, err_msg=str(kw))
    assert all(v.dtype == jnp.float32 and v.shape == () for v in metrics.values())
    if kw.get("dual_clip"):
      assert float(metrics["dual_clip_frac"]) > 0
    assert float(metrics["clip_frac_low"]) > 0 and float(metrics["clip_frac_high"]) > 0


def test_clipped_tokens_get_zero_gradient():
  logp, old, adv, m = make_batch(2)
  logp[2, :] = np.log(np.array([0.5, 0.79, 0.81, 1.0, 1.19, 1.21, 2.0, 0.5, 2.0, 1.5, 0.7, 1.1]))
  old[2, :] = 0.0                                           # ratios above
  adv[2, :] = np.array([1, 1, 1, 1, 1, 1, 1, -1, -1, -1, -1, -1], np.float32)
  _, metrics, g = policy_value_and_grad(*map(jnp.asarray, (logp, old, adv, m)), clip_eps=0.2)
  g2 = np.asarray(g)[2]
  # A > 0: clipped (zero grad) iff r > 1.2; A < 0: iff r < 0.8
  clipped = np.array([0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 1, 0], bool)
  assert (g2[clipped] == 0).all() and (g2[~clipped] != 0).all()


def test_dual_clip_bounds_negative_advantage_loss():
  logp, old, adv, m = make_batch(3)
  adv = -np.abs(adv) - 0.1
  old = (logp - 3.0).astype(np.float32)                     # every ratio = e^3 ~ 20 > c
  c = 3.0
  loss, metrics, g = policy_value_and_grad(*map(jnp.asarray, (logp, old, adv, m)), dual_clip=c)
  # loss = mean over real tokens of -c A, gradient exactly 0
  np.testing.assert_allclose(float(loss), np_aggregate(-c * np.float64(adv), m, "token_mean"), rtol=1e-5)
  assert (np.asarray(g) == 0).all()
  assert float(metrics["dual_clip_frac"]) == pytest.approx(1.0)
  # without the dual clip the loss grows with the ratio
  loss_nodual, _, _ = policy_value_and_grad(*map(jnp.asarray, (logp, old, adv, m)))
  assert float(loss_nodual) > float(loss) * 5


def test_ratio_one_and_zero_advantages():
  logp, _, adv, m = make_batch(4)
  lp = jnp.asarray(logp)
  loss, metrics, g = policy_value_and_grad(lp, lp, jnp.asarray(adv), jnp.asarray(m))
  w = np_agg_weights(m, "token_mean")
  np.testing.assert_allclose(float(loss), np_aggregate(-np.float64(adv), m, "token_mean"), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(g), -np.where(m > 0, adv, 0) * w, rtol=1e-5, atol=1e-8)
  assert float(metrics["approx_kl"]) == 0.0 and float(metrics["clip_frac"]) == 0.0
  assert float(metrics["ratio_min"]) == float(metrics["ratio_max"]) == 1.0
  # zero advantages: zero loss and gradient whatever the ratio
  _, old, _, _ = make_batch(5)
  loss, _, g = policy_value_and_grad(lp, jnp.asarray(old), jnp.zeros((B, T)), jnp.asarray(m))
  assert float(loss) == 0.0 and (np.asarray(g) == 0).all()
  # [B] advantages broadcast over tokens
  adv_B = adv[:, 0].copy()
  l1, _, _ = policy_value_and_grad(lp, jnp.asarray(old), jnp.asarray(np.repeat(adv_B[:, None], T, 1)),
                                   jnp.asarray(m))
  l2, _, _ = policy_value_and_grad(lp, jnp.asarray(old), jnp.asarray(adv_B), jnp.asarray(m))
  np.testing.assert_allclose(float(l1), float(l2), rtol=1e-6)


@jax.jit
def all_aggregations(logp, old, adv, m):
  return [_policy_value_and_grad(logp, old, adv, m, aggregation=agg) for agg in AGGREGATIONS]


def test_all_masked():
  logp, old, adv, m = make_batch(6)
  zero_m = np.zeros_like(m)
  for agg, (loss, metrics, g) in zip(AGGREGATIONS, all_aggregations(*map(jnp.asarray, (logp, old, adv, zero_m)))):
    assert float(loss) == 0.0 and (np.asarray(g) == 0).all(), agg
    assert all(np.isfinite(float(v)) for v in metrics.values())
    assert float(metrics["ratio_mean"]) == 0.0 and float(metrics["ratio_min"]) == 1.0
  # all-masked rows (with garbage) do not change the aggregate of the others
  keep = m.sum(1) > 0
  agg_all = jax.jit(lambda x, mm: [aggregate(x, mm, a, max_len=T) for a in AGGREGATIONS])
  for a, l_all, l_sub in zip(AGGREGATIONS, agg_all(jnp.asarray(adv), jnp.asarray(m)),
                             agg_all(jnp.asarray(adv[keep]), jnp.asarray(m[keep]))):
    np.testing.assert_allclose(float(l_all), float(l_sub), rtol=1e-6, err_msg=a)
    np.testing.assert_allclose(float(l_all), np_aggregate(adv, m, a), rtol=1e-5, err_msg=a)


# ----------------------------------------------------------------------------- value loss

@functools.partial(jax.jit, static_argnames=("aggregation",))   # clip_eps traced
def value_value_and_grad(v, v_old, ret, m, **kw):
  (loss, metrics), g = jax.value_and_grad(ppo_value_loss, has_aux=True)(v, v_old, ret, m, **kw)
  return loss, metrics, g


@pytest.mark.parametrize("eps,agg", [(0.2, "token_mean"), (0.05, "token_mean"), (None, "token_mean"),
                                     (0.2, "seq_mean_token_mean")])
def test_value_loss_matches_numpy(eps, agg):
  rng = np.random.default_rng(7)
  m = ragged_mask(rng)
  v_old = rng.normal(size=(B, T)).astype(np.float32)
  v = (v_old + rng.normal(0, 0.3, size=(B, T))).astype(np.float32)
  ret = (v_old + rng.normal(0, 1.0, size=(B, T))).astype(np.float32)
  v[m == 0], ret[m == 0] = 1e4, -1e4
  loss, metrics, g = value_value_and_grad(*map(jnp.asarray, (v, v_old, ret, m)), clip_eps=eps, aggregation=agg)
  want, want_g = np_value(v, v_old, ret, m, eps, agg)
  for k, val in want.items():
    np.testing.assert_allclose(float(metrics[k]), val, rtol=1e-5, atol=1e-6, err_msg=k)
  assert float(loss) == float(metrics["value_loss"])
  np.testing.assert_allclose(np.asarray(g), want_g, rtol=1e-5, atol=1e-7)
  if eps == 0.05:
    assert float(metrics["value_clip_frac"]) > 0.2


def test_explained_variance():
  rng = np.random.default_rng(8)
  m = ragged_mask(rng)
  ret = rng.normal(size=(B, T)).astype(np.float32)
  assert float(explained_variance(jnp.asarray(ret), jnp.asarray(ret), jnp.asarray(m))) == pytest.approx(1.0)
  assert float(explained_variance(jnp.zeros((B, T)), jnp.asarray(ret), jnp.asarray(m))) == pytest.approx(0.0, abs=1e-6)
  assert float(explained_variance(jnp.asarray(ret), jnp.ones((B, T)), jnp.asarray(m))) == 0.0   # Var R = 0
  assert float(explained_variance(jnp.asarray(ret), jnp.asarray(ret), jnp.zeros((B, T)))) == 0.0


# ----------------------------------------------------------------------------- entropy & combined loss

def test_entropy_from_logits():
  rng = np.random.default_rng(9)
  z = (rng.normal(size=(B, T, V)) * 3).astype(np.float32)
  for temp in (1.0, 0.7):
    zz = np.float64(z) / temp
    p = np.exp(zz - zz.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    want = -(p * np.log(p)).sum(-1)
    np.testing.assert_allclose(np.asarray(entropy_from_logits(jnp.asarray(z), temp)), want, rtol=1e-5, atol=1e-6)
  # banned tokens (-inf logits): finite entropy and gradient
  zb = z.copy()
  zb[..., :3] = -np.inf
  h, g = jax.jit(jax.value_and_grad(lambda x: jnp.sum(entropy_from_logits(x))))(jnp.asarray(zb))
  assert np.isfinite(float(h)) and np.isfinite(np.asarray(g)).all()
  zz = np.float64(z[..., 3:])
  p = np.exp(zz - zz.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  np.testing.assert_allclose(float(h), -(p * np.log(p)).sum(), rtol=1e-5)


def test_ppo_loss_combines_terms():
  logp, old, adv, m = make_batch(10)
  rng = np.random.default_rng(10)
  v_old = rng.normal(size=(B, T)).astype(np.float32)
  v = (v_old + rng.normal(0, 0.3, size=(B, T))).astype(np.float32)
  ret = (v_old + rng.normal(0, 1.0, size=(B, T))).astype(np.float32)
  ent = rng.uniform(0, 2, size=(B, T)).astype(np.float32)
  args = [jnp.asarray(x) for x in (logp, old, adv, v, v_old, ret, m)]
  f = jax.jit(functools.partial(ppo_loss, vf_coef=0.5, entropy_coef=0.01, dual_clip=3.0))
  loss, metrics = f(*args, entropy_BC=jnp.asarray(ent))
  pol, _ = np_policy(logp, old, adv, m, dual=3.0)
  val, _ = np_value(v, v_old, ret, m, 0.2)
  want = pol["policy_loss"] + 0.5 * val["value_loss"] - 0.01 * np_aggregate(ent, m, "token_mean")
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  assert float(metrics["loss"]) == float(loss)
  for k in ("clip_frac", "approx_kl", "value_loss", "value_clip_frac", "explained_variance", "entropy"):
    assert k in metrics


def test_errors():
  logp, old, adv, m = (jnp.asarray(x) for x in make_batch(11))
  with pytest.raises(ValueError, match="token_mean, seq_mean_token_mean"):
    ppo_policy_loss(logp, old, adv, m, aggregation="seq_mean")
  with pytest.raises(ValueError, match="dual_clip"):
    ppo_policy_loss(logp, old, adv, m, dual_clip=1.0)
  with pytest.raises(ValueError, match="clip_eps"):
    ppo_policy_loss(logp, old, adv, m, clip_eps=1.5)
  with pytest.raises(ValueError, match=r"\[B, T\]"):
    ppo_policy_loss(logp, old[:, :5], adv, m)
  with pytest.raises(ValueError, match="max_len"):
    ppo_policy_loss(logp, old, adv, m, aggregation="seq_mean_token_sum_norm", max_len=0)
