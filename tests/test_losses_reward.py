"""Bradley–Terry reward loss vs a float64 numpy reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.losses.reward import bradley_terry_loss


def np_bt(rc, rr, margin=None, eta=0.0, w=None):
  """-log sigmoid(rc - rr - m) = log(1 + exp(-(z))) in float64, plus eta (rc + rr)^2."""
  rc, rr = rc.astype(np.float64), rr.astype(np.float64)
  w = np.ones_like(rc) if w is None else w.astype(np.float64)
  m = 0.0 if margin is None else margin.astype(np.float64)
  z = rc - rr - m
  nll = np.logaddexp(0.0, -z)
  acc = np.where(rc > rr, 1.0, np.where(rc == rr, 0.5, 0.0))
  mean = lambda x: (x * w).sum() / w.sum()
  return {
      "loss": mean(nll) + eta * mean((rc + rr) ** 2),
      "accuracy": mean(acc),
      "margin": mean(rc - rr),
      "chosen_reward": mean(rc),
      "rejected_reward": mean(rr),
  }


@pytest.mark.parametrize("seed,scale", [(0, 1.0), (1, 5.0), (2, 300.0)])
@pytest.mark.parametrize("use_margin,eta", [(False, 0.0), (True, 0.0), (True, 0.01)])
def test_bradley_terry_matches_numpy(seed, scale, use_margin, eta):
  rng = np.random.default_rng(seed)
  B = 8
  rc = (rng.normal(size=B) * scale).astype(np.float32)
  rr = (rng.normal(size=B) * scale).astype(np.float32)
  rr[:2] = rc[:2]  # ties
  margin = rng.uniform(0, 2, size=B).astype(np.float32) if use_margin else None
  loss, m = bradley_terry_loss(jnp.asarray(rc), jnp.asarray(rr),
                               None if margin is None else jnp.asarray(margin), eta)
  want = np_bt(rc, rr, margin, eta)
  for k, v in want.items():
    np.testing.assert_allclose(float(m[k]), v, rtol=1e-5, atol=1e-6 * scale, err_msg=k)
  assert float(loss) == float(m["loss"]) and all(v.dtype == jnp.float32 for v in m.values())
  g = jax.jit(jax.grad(lambda a, b: bradley_terry_loss(a, b, None, eta)[0], argnums=(0, 1)))(
      jnp.asarray(rc), jnp.asarray(rr))
  assert all(np.isfinite(np.asarray(x)).all() for x in g)


def test_equal_rewards_give_log2_and_half_accuracy():
  r = jnp.asarray([0.0, 3.0, -7.0, 1e4, -1e4, 0.5, 2.0, -3.0])
  loss, m = bradley_terry_loss(r, r)
  np.testing.assert_allclose(float(loss), np.log(2.0), rtol=1e-6)
  assert float(m["accuracy"]) == 0.5 and float(m["margin"]) == 0.0


def test_weights_ignore_padding_rows():
  rng = np.random.default_rng(7)
  rc = rng.normal(size=8).astype(np.float32)
  rr = rng.normal(size=8).astype(np.float32)
  w = np.array([1, 1, 1, 1, 1, 0, 0, 0], np.float32)
  rc_pad, rr_pad = rc.copy(), rr.copy()
  rc_pad[5:] = np.nan  # garbage in padding rows must not leak
  rr_pad[5:] = 1e30
  loss, m = bradley_terry_loss(jnp.asarray(rc_pad), jnp.asarray(rr_pad), None, 0.05, jnp.asarray(w))
  want = np_bt(rc[:5], rr[:5], None, 0.05)
  for k, v in want.items():
    np.testing.assert_allclose(float(m[k]), v, rtol=1e-5, err_msg=k)
  g = jax.jit(jax.grad(lambda a: bradley_terry_loss(a, jnp.asarray(rr), None, 0.05, jnp.asarray(w))[0]))(
      jnp.asarray(rc))
  assert np.all(np.asarray(g)[5:] == 0) and np.isfinite(np.asarray(g)).all()
  loss0, _ = bradley_terry_loss(jnp.asarray(rc), jnp.asarray(rr), None, 0.0, jnp.zeros(8))
  assert float(loss0) == 0.0


def test_gradient_matches_numpy_formula():
  # d/d rc [-log sigmoid(z)] / B = -(1 - sigmoid(z)) / B; plus centring 2 eta (rc + rr) / B
  rng = np.random.default_rng(8)
  rc = rng.normal(size=8).astype(np.float32) * 3
  rr = rng.normal(size=8).astype(np.float32) * 3
  eta = 0.1
  g = jax.jit(jax.grad(lambda a: bradley_terry_loss(a, jnp.asarray(rr), None, eta)[0]))(jnp.asarray(rc))
  z = rc.astype(np.float64) - rr
  want = (-(1 - 1 / (1 + np.exp(-z))) + 2 * eta * (rc.astype(np.float64) + rr)) / 8
  np.testing.assert_allclose(np.asarray(g), want, rtol=1e-5, atol=1e-7)
