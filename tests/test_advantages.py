"""Advantage estimators (GAE, whiten, GRPO, RLOO, REINFORCE++) vs float64 numpy references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.losses.advantages import (discounted_returns, gae, group_advantages,
                                        masked_mean_var, reinforce_plus_plus_advantages,
                                        rloo_advantages, whiten)
from rlhf_jax.losses.kl import kl_penalty_rewards

B, T, G = 8, 12, 4

# jitted once per static configuration; every test reuses the [B, T] / [B] shapes
group_j = jax.jit(group_advantages, static_argnames=("group_size", "scale_by_std", "std_ddof"))
rloo_j = jax.jit(rloo_advantages, static_argnames=("group_size",))


def ragged_mask(rng):
  """Right-padded rows of random length, an all-masked row, a full row, a left-padded row, a row with a hole."""
  lengths = rng.integers(1, T + 1, size=B)
  m = (np.arange(T)[None, :] < lengths[:, None]).astype(np.float32)
  m[1] = 0.0
  m[2] = 1.0
  m[3] = 0.0
  m[3, 4:] = 1.0
  m[5] = 0.0
  m[5, [0, 1, 2, 6, 7]] = 1.0          # masked hole inside the row (e.g. tool output)
  return m


def make_batch(seed):
  rng = np.random.default_rng(seed)
  m = ragged_mask(rng)
  r = rng.normal(size=(B, T)).astype(np.float32)
  v = rng.normal(size=(B, T)).astype(np.float32)
  r[m == 0] = 1e3                      # garbage where masked
  v[m == 0] = -1e3
  return r, v, m


# ----------------------------------------------------------------------------- numpy references

def np_gae(r, v, m, gamma, lam):
  """Schulman et al. 2016 over the real tokens of each row; terminal after the last one."""
  adv = np.zeros((B, T))
  for b in range(B):
    idx = np.flatnonzero(m[b])
    rr, vv = np.float64(r[b, idx]), np.float64(v[b, idx])
    vnext = np.append(vv[1:], 0.0)
    delta = rr + gamma * vnext - vv
    a = np.zeros(len(idx))
    for k in range(len(idx)):     # A_t = sum_l (gamma lam)^l delta_{t+l}
      a[k] = sum((gamma * lam) ** l * delta[k + l] for l in range(len(idx) - k))
    adv[b, idx] = a
  ret = np.where(m > 0, adv + np.float64(v), 0.0)
  return adv, ret


def np_whiten(x, m, shift_mean=True, unbiased=False):
  sel = np.float64(x[m > 0])
  n = len(sel)
  mean = sel.mean() if n else 0.0
  var = ((sel - mean) ** 2).sum() / max(n - (1 if unbiased else 0), 1) if n else 0.0
  y = (np.float64(x) - mean) / np.sqrt(var + 1e-8)
  if not shift_mean:
    y = y + mean
  return np.where(m > 0, y, 0.0)


def np_grpo(r, G, scale, ddof, eps=1e-4):
  r = np.float64(r).reshape(-1, G)
  out = np.zeros_like(r)
  for p in range(r.shape[0]):
    g = r[p]
    a = g - g.mean()
    if scale:
      std = g.std(ddof=ddof) if len(g) > ddof else 0.0
      a = a / (std + eps)
    out[p] = a
  return out.reshape(-1)


def np_rloo(r, G):
  r = np.float64(r).reshape(-1, G)
  out = np.zeros_like(r)
  for p in range(r.shape[0]):
    for i in range(G):
      others = [r[p, j] for j in range(G) if j != i]
      out[p, i] = r[p, i] - np.mean(others)
  return out.reshape(-1)


# ----------------------------------------------------------------------------- GAE

gae_jit = jax.jit(gae)


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9), (1.0, 1.0), (0.9, 0.0)])
def test_gae_matches_numpy(gamma, lam):
  r, v, m = make_batch(0)
  adv, ret = gae_jit(jnp.asarray(r), jnp.asarray(v), jnp.asarray(m), gamma, lam)
  want_adv, want_ret = np_gae(r, v, m, gamma, lam)
  np.testing.assert_allclose(np.asarray(adv), want_adv, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(ret), want_ret, rtol=1e-5, atol=1e-5)
  assert (np.asarray(adv)[1] == 0).all() and (np.asarray(ret)[m == 0] == 0).all()


def test_gae_special_cases():
  r, v, m = make_batch(1)
  zeros = jnp.zeros((B, T))
  # gamma = lam = 1, V = 0: advantages = returns = reward-to-go
  adv, ret = gae_jit(jnp.asarray(r), zeros, jnp.asarray(m), 1.0, 1.0)
  rtg = np.zeros((B, T))
  for b in range(B):
    idx = np.flatnonzero(m[b])
    rtg[b, idx] = np.cumsum(np.float64(r[b, idx])[::-1])[::-1]
  np.testing.assert_allclose(np.asarray(adv), rtg, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(ret), rtg, rtol=1e-5, atol=1e-5)
  # lam = 0: one-step TD error with V = 0 after the last real token
  adv, _ = gae_jit(jnp.asarray(r), jnp.asarray(v), jnp.asarray(m), 0.9, 0.0)
  b = 0
  idx = np.flatnonzero(m[b])
  last = idx[-1]
  assert float(adv[b, last]) == pytest.approx(float(r[b, last]) - float(v[b, last]), rel=1e-6)
  # advantages are targets: no gradient flows through them
  g = jax.jit(jax.grad(lambda rr, vv: jnp.sum(gae(rr, vv, jnp.asarray(m))[0]), argnums=(0, 1)))(
      jnp.asarray(r), jnp.asarray(v))
  assert all((np.asarray(x) == 0).all() for x in g)


def test_discounted_returns():
  r, _, m = make_batch(2)
  got = jax.jit(discounted_returns)(jnp.asarray(r), jnp.asarray(m), 0.97)
  want = np_gae(r, np.zeros((B, T), np.float32), m, 0.97, 1.0)[0]
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- whiten

FLAGS = [(True, False), (False, False), (True, True), (False, True)]   # (shift_mean, unbiased)


@jax.jit
def whiten_all_flags(x, m):
  return [whiten(x, m, shift_mean=s, unbiased=u) for s, u in FLAGS]


def test_whiten_matches_numpy():
  r, _, m = make_batch(3)
  x = (r * 3 + 2).astype(np.float32)
  rows = (m.sum(1) > 0).astype(np.float32)
  got_BT = whiten_all_flags(jnp.asarray(x), jnp.asarray(m))
  got_B = whiten_all_flags(jnp.asarray(x[:, 0]), jnp.asarray(rows))   # sequence-level [B] with a row mask
  for (shift_mean, unbiased), y_BT, y_B in zip(FLAGS, got_BT, got_B):
    np.testing.assert_allclose(np.asarray(y_BT), np_whiten(x, m, shift_mean, unbiased), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(y_B), np_whiten(x[:, 0], rows, shift_mean, unbiased),
                               rtol=1e-5, atol=1e-5)
    if shift_mean:
      assert abs(np.asarray(y_BT)[m > 0].mean()) < 1e-5


def test_whiten_degenerate():
  x = jnp.asarray(np.random.default_rng(4).normal(size=(B, T)).astype(np.float32))
  for mask in (jnp.zeros((B, T)), jnp.zeros((B, T)).at[2, 3].set(1.0)):
    for (shift_mean, _), y in zip(FLAGS, whiten_all_flags(x, mask)):
      y = np.asarray(y)
      assert np.isfinite(y).all() and (y[np.asarray(mask) == 0] == 0).all()
      if shift_mean:   # zero variance: the lone element whitens to 0 (not NaN / inf)
        assert (y == 0).all()
  mean, var = jax.jit(masked_mean_var)(x, jnp.zeros((B, T)))
  assert float(mean) == 0.0 and float(var) == 0.0
  g = jax.jit(jax.grad(lambda x: jnp.sum(whiten(x, jnp.zeros((B, T)).at[2, 3].set(1.0)) ** 2)))(x)
  assert np.isfinite(np.asarray(g)).all()


# ----------------------------------------------------------------------------- GRPO / RLOO

def group_rewards(seed):
  rng = np.random.default_rng(seed)
  r = rng.normal(size=B).astype(np.float32)
  r[G:2 * G] = (rng.random(G) < 0.5).astype(np.float32)   # binary rewards in group 1
  r[G + 1], r[G + 2] = 1.0, 0.0                           # not all equal
  return r


@pytest.mark.parametrize("scale,ddof", [(True, 1), (True, 0), (False, 1)])
def test_group_advantages_match_numpy(scale, ddof):
  r = group_rewards(5)
  got = group_j(jnp.asarray(r), G, scale_by_std=scale, std_ddof=ddof)
  np.testing.assert_allclose(np.asarray(got), np_grpo(r, G, scale, ddof), rtol=1e-5, atol=1e-6)
  # zero mean within each group
  np.testing.assert_allclose(np.asarray(got).reshape(-1, G).sum(1), 0.0, atol=1e-5)


def test_group_advantages_degenerate():
  for value in (0.1, 1.0, 0.0, -3.7, 1e6):
    same = jnp.full((B,), value, jnp.float32)
    for scale in (True, False):
      for ddof in (0, 1):
        a = np.asarray(group_j(same, G, scale_by_std=scale, std_ddof=ddof))
        assert (a == 0).all(), (value, scale, ddof)
  # one constant group among varying ones
  r = group_rewards(6)
  r[:G] = 0.3
  a = np.asarray(group_j(jnp.asarray(r), G))
  assert (a[:G] == 0).all() and np.abs(a[G:]).max() > 0
  # group size 1: nothing to compare with -> 0 (both std conventions)
  r = group_rewards(7)
  for ddof in (0, 1):
    a = np.asarray(group_j(jnp.asarray(r), 1, std_ddof=ddof))
    assert np.isfinite(a).all() and (a == 0).all()
  with pytest.raises(ValueError, match="group_size=3"):
    group_advantages(jnp.asarray(r), 3)
  with pytest.raises(ValueError, match="std_ddof"):
    group_advantages(jnp.asarray(r), G, std_ddof=2)


def test_rloo_matches_numpy_and_degenerate():
  r = group_rewards(8)
  got = rloo_j(jnp.asarray(r), G)
  np.testing.assert_allclose(np.asarray(got), np_rloo(r, G), rtol=1e-5, atol=1e-6)
  # = G/(G-1) * (r - group mean): the Dr. GRPO advantage rescaled
  dr = np.asarray(group_j(jnp.asarray(r), G, scale_by_std=False))
  np.testing.assert_allclose(np.asarray(got), dr * G / (G - 1), rtol=1e-5, atol=1e-6)
  r2 = np.asarray(group_rewards(9))
  np.testing.assert_allclose(np.asarray(rloo_j(jnp.asarray(r2), 2)), np_rloo(r2, 2),
                             rtol=1e-5, atol=1e-6)
  assert (np.asarray(rloo_j(jnp.full((B,), 0.1), G)) == 0).all()
  with pytest.raises(ValueError, match="group_size must be >= 2"):
    rloo_advantages(jnp.asarray(r), 1)


# ----------------------------------------------------------------------------- REINFORCE++

def test_reinforce_plus_plus_matches_numpy():
  rng = np.random.default_rng(10)
  _, _, m = make_batch(10)
  logp = -rng.exponential(1.0, size=(B, T)).astype(np.float32)
  ref = np.minimum(logp + rng.normal(0, 0.3, size=(B, T)), 0).astype(np.float32)
  scores = rng.normal(size=B).astype(np.float32)
  beta = 0.01
  rewards = jax.jit(kl_penalty_rewards, static_argnames=("kind",))(jnp.asarray(logp), jnp.asarray(ref), jnp.asarray(m), beta, "k1",
                               scores_B=jnp.asarray(scores))
  adv, ret = jax.jit(reinforce_plus_plus_advantages)(rewards, jnp.asarray(m))
  # Hu 2025: r_t = 1[t = last] score - beta (logp - ref); G_t = sum_{s>=t} r_s; A = whiten over batch
  want_ret = np.zeros((B, T))
  for b in range(B):
    idx = np.flatnonzero(m[b])
    if not len(idx):
      continue
    rr = -beta * (np.float64(logp[b, idx]) - ref[b, idx])
    rr[-1] += scores[b]
    want_ret[b, idx] = np.cumsum(rr[::-1])[::-1]
  np.testing.assert_allclose(np.asarray(ret), want_ret, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(adv), np_whiten(want_ret, m), rtol=1e-4, atol=1e-5)
  adv_raw, _ = jax.jit(reinforce_plus_plus_advantages, static_argnames=("whiten_advantages",))(
      rewards, jnp.asarray(m), gamma=1.0, whiten_advantages=False)
  np.testing.assert_allclose(np.asarray(adv_raw), want_ret, rtol=1e-5, atol=1e-5)
