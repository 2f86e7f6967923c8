"""KL estimators, KL-penalty rewards and the adaptive KL controller vs float64 numpy references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.losses.kl import (KL_KINDS, kl_controller_init, kl_controller_update, kl_estimate,
                                kl_penalty_rewards, last_token_index)

B, T = 8, 12


def ragged_mask(rng):
  """Right-padded rows of random length, one left-padded row, one all-masked row, one full row."""
  lengths = rng.integers(1, T + 1, size=B)
  m = (np.arange(T)[None, :] < lengths[:, None]).astype(np.float32)
  m[1] = 0.0                 # all-masked row
  m[2] = 1.0                 # full row
  m[3] = 0.0
  m[3, 4:] = 1.0             # left-padded row
  return m


def make_logps(seed):
  rng = np.random.default_rng(seed)
  m = ragged_mask(rng)
  logp = -rng.exponential(1.5, size=(B, T)).astype(np.float32)
  ref = (logp + rng.normal(0, 0.7, size=(B, T))).astype(np.float32)
  ref = np.minimum(ref, 0.0).astype(np.float32)
  logp[m == 0] = -1e4          # garbage at masked positions must never leak
  ref[m == 0] = 3e4
  return logp, ref, m


# ----------------------------------------------------------------------------- numpy references

def np_kl(logp, ref, kind):
  """Schulman 2020: r = pi_ref / pi on samples from pi."""
  logp, ref = np.float64(logp), np.float64(ref)
  log_r = ref - logp
  if kind == "k3":
    with np.errstate(over="ignore"):   # garbage at masked positions
      return np.expm1(log_r) - log_r   # = r - log r - 1, without float64 cancellation near r = 1
  if kind == "k1":
    return -log_r
  if kind == "k2":
    return 0.5 * log_r ** 2
  return np.exp(log_r) - log_r - 1.0


def np_penalty_rewards(logp, ref, m, beta, kind, scores=None):
  out = np.zeros((B, T))
  for b in range(B):
    idx = np.flatnonzero(m[b])
    for t in idx:
      out[b, t] = -beta * np_kl(logp[b, t], ref[b, t], kind)
    if scores is not None and len(idx):
      out[b, idx[-1]] += scores[b]
  return out


# ----------------------------------------------------------------------------- tests

@pytest.mark.parametrize("kind", KL_KINDS)
@pytest.mark.parametrize("seed", [0, 1])
def test_kl_estimate_matches_numpy(kind, seed):
  logp, ref, m = make_logps(seed)
  got = np.asarray(kl_estimate(jnp.asarray(logp), jnp.asarray(ref), kind, mask_BC=jnp.asarray(m)))
  want = np.where(m > 0, np_kl(logp, ref, kind), 0.0)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert got.dtype == np.float32 and np.isfinite(got).all()
  if kind != "k1":
    assert (got >= 0).all()
  # without a mask: the formula everywhere (finite inputs)
  sl = m > 0
  got_nomask = np.asarray(kl_estimate(jnp.asarray(logp), jnp.asarray(ref), kind))
  np.testing.assert_allclose(got_nomask[sl], np_kl(logp, ref, kind)[sl], rtol=1e-5, atol=1e-6)


def test_k3_accurate_near_zero_and_grad_masked():
  d = np.array([1e-6, -1e-5, 3e-4, -2e-3, 0.0, 0.1], np.float32)
  got = np.asarray(kl_estimate(jnp.asarray(d), jnp.zeros(6), "k3"))
  np.testing.assert_allclose(got, np_kl(d, np.zeros(6), "k3"), rtol=1e-5, atol=0)
  logp, ref, m = make_logps(2)
  g = jax.jit(jax.grad(lambda lp: jnp.sum(kl_estimate(lp, jnp.asarray(ref), "k3", mask_BC=jnp.asarray(m)))))(
      jnp.asarray(logp))
  g = np.asarray(g)
  assert np.isfinite(g).all() and (g[m == 0] == 0).all()
  # d k3 / d logp = 1 - pi_ref / pi
  sl = m > 0
  want = 1.0 - np.exp(np.float64(ref[sl]) - logp[sl])
  np.testing.assert_allclose(g[sl], want, rtol=1e-5, atol=1e-6)


def test_k1_k3_unbiased_on_policy_samples():
  # Monte Carlo: samples y ~ pi of a categorical; mean k1 and k3 -> KL(pi || pi_ref); k2 is biased.
  rng = np.random.default_rng(3)
  p = rng.dirichlet(np.ones(6))
  q = rng.dirichlet(np.ones(6))
  kl_true = float(np.sum(p * np.log(p / q)))
  y = rng.choice(6, size=(64, 1024), p=p)
  logp, ref = np.log(p)[y].astype(np.float32), np.log(q)[y].astype(np.float32)
  for kind in ("k1", "k3"):
    est = float(jnp.mean(kl_estimate(jnp.asarray(logp), jnp.asarray(ref), kind)))
    assert est == pytest.approx(kl_true, rel=0.05), kind


@pytest.mark.parametrize("kind", ["k1", "k3"])
def test_kl_penalty_rewards(kind):
  logp, ref, m = make_logps(4)
  scores = np.random.default_rng(4).normal(size=B).astype(np.float32)
  beta = 0.05
  got = kl_penalty_rewards(jnp.asarray(logp), jnp.asarray(ref), jnp.asarray(m), beta, kind,
                           scores_B=jnp.asarray(scores))
  np.testing.assert_allclose(np.asarray(got), np_penalty_rewards(logp, ref, m, beta, kind, scores),
                             rtol=1e-5, atol=1e-6)
  assert (np.asarray(got)[1] == 0).all()             # all-masked row: no score, no penalty
  got0 = kl_penalty_rewards(jnp.asarray(logp), jnp.asarray(ref), jnp.asarray(m), beta, kind)
  np.testing.assert_allclose(np.asarray(got0), np_penalty_rewards(logp, ref, m, beta, kind),
                             rtol=1e-5, atol=1e-6)


def test_last_token_index():
  _, _, m = make_logps(5)
  idx, has = last_token_index(jnp.asarray(m))
  for b in range(B):
    nz = np.flatnonzero(m[b])
    assert bool(has[b]) == bool(len(nz))
    assert int(idx[b]) == (nz[-1] if len(nz) else 0)


def np_controller(beta, kls, n_steps, target, horizon):
  out = []
  for kl in kls:
    e = np.clip(kl / target - 1.0, -0.2, 0.2)
    beta = beta * (1.0 + e * n_steps / horizon)
    out.append(beta)
  return np.array(out)


def test_adaptive_kl_controller_trajectory():
  # KLs far above / below the target (clipped error) and near it (proportional).
  kls = np.array([12.0, 9.0, 6.5, 6.0, 5.0, 0.1, 0.0, 3.0, 7.2, 100.0] * 3, np.float32)
  n_steps, target, horizon = 512, 6.0, 10000
  update = jax.jit(lambda s, kl: kl_controller_update(s, kl, n_steps, target, horizon))
  state = kl_controller_init(0.2)
  got = []
  for kl in kls:
    state = update(state, jnp.float32(kl))
    got.append(float(state["beta"]))
  np.testing.assert_allclose(got, np_controller(0.2, np.float64(kls), n_steps, target, horizon), rtol=1e-5)
  # state is a small pytree of float32 arrays (checkpointable)
  leaves = jax.tree_util.tree_leaves(state)
  assert len(leaves) == 1 and leaves[0].dtype == jnp.float32 and leaves[0].shape == ()


def test_fixed_controller_and_errors():
  s = kl_controller_init(0.05)
  assert kl_controller_update(s, 100.0, 512, None, 10000) is s
  assert float(s["beta"]) == pytest.approx(0.05)
  with pytest.raises(ValueError, match="k1, k2, k3"):
    kl_estimate(jnp.zeros((2, 2)), jnp.zeros((2, 2)), "k4")
  with pytest.raises(ValueError, match="target must be > 0"):
    kl_controller_update(s, 1.0, 1, 0.0, 10)
  with pytest.raises(ValueError, match="horizon"):
    kl_controller_update(s, 1.0, 1, 6.0, 0)
  with pytest.raises(ValueError, match="init_beta"):
    kl_controller_init(-1.0)
