"""Preference losses (DPO and variants) vs float64 numpy references written from the papers."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.losses.dpo import LOSS_TYPES, kto_reference_point, preference_loss


# ----------------------------------------------------------------------------- numpy references

def np_log_sigmoid(z):
  return -np.logaddexp(0.0, -z)


def np_sigmoid(z):
  return np.exp(np_log_sigmoid(z))


def np_losses(loss_type, pc, pr, rc, rr, lc, lr, beta, eps=0.0, gamma=0.5, lam=0.1, z0=None,
              wd=1.0, wu=1.0, nll=None):
  """(losses_B, chosen_reward_B, rejected_reward_B) straight from each paper, float64."""
  pc, pr, rc, rr, lc, lr = (np.asarray(x, np.float64) for x in (pc, pr, rc, rr, lc, lr))
  cw, cl = pc - rc, pr - rr          # log pi/pi_ref for y_w, y_l
  h = cw - cl
  if loss_type == "sigmoid":         # DPO / cDPO (Mitchell 2023)
    return (-(1 - eps) * np_log_sigmoid(beta * h) - eps * np_log_sigmoid(-beta * h),
            beta * cw, beta * cl)
  if loss_type == "robust":          # Chowdhury et al. 2024 eq. 8
    return ((-(1 - eps) * np_log_sigmoid(beta * h) + eps * np_log_sigmoid(-beta * h)) / (1 - 2 * eps),
            beta * cw, beta * cl)
  if loss_type == "ipo":             # Azar et al. 2023 eq. 17, tau = beta
    return (h - 1 / (2 * beta)) ** 2, beta * cw, beta * cl
  if loss_type == "hinge":           # SLiC / RSO
    return np.maximum(0.0, 1 - beta * h), beta * cw, beta * cl
  if loss_type == "simpo":           # Meng et al. 2024 eq. 6
    rw, rl = beta * pc / lc, beta * pr / lr
    return -np_log_sigmoid(rw - rl - gamma), rw, rl
  if loss_type == "orpo":            # Hong et al. 2024
    aw, al = pc / lc, pr / lr        # log P(y) = mean token log-prob
    ow = aw - np.log(1 - np.exp(aw))
    ol = al - np.log(1 - np.exp(al))
    sft = -aw if nll is None else np.asarray(nll, np.float64)
    return sft - lam * np_log_sigmoid(ow - ol), ow, ol
  if loss_type == "kto":             # Ethayarajh et al. 2024 eq. 8
    z = max(float(z0), 0.0)
    ld = 1 - 1 / (1 + np.exp(-beta * (cw - z)))
    lu = 1 - 1 / (1 + np.exp(-beta * (z - cl)))
    return (wd * ld + wu * lu) / 2, beta * cw, beta * cl
  raise AssertionError(loss_type)


def np_metrics(loss_type, pc, pr, rc, rr, lc, lr, w=None, **kw):
  losses, cwr, clr = np_losses(loss_type, pc, pr, rc, rr, lc, lr, **kw)
  w = np.ones_like(losses) if w is None else np.asarray(w, np.float64)
  mean = lambda x: float((np.asarray(x, np.float64) * w).sum() / w.sum())
  acc = np.where(cwr > clr, 1.0, np.where(cwr == clr, 0.5, 0.0))
  return {
      "loss": mean(losses),
      "reward_accuracy": mean(acc),
      "chosen_reward": mean(cwr),
      "rejected_reward": mean(clr),
      "reward_margin": mean(cwr - clr),
      "policy_chosen_logps": mean(pc),
      "policy_rejected_logps": mean(pr),
      "kl_chosen": mean((np.float64(pc) - rc) / lc),
  }


def make_batch(seed, scale, B=12):
  """Sequence-sum log-probs: per-token mean in [-3 scale, -0.01], lengths 1..64, ref nearby."""
  rng = np.random.default_rng(seed)
  lc = rng.integers(1, 65, size=B)
  lr = rng.integers(1, 65, size=B)
  pc = -lc * rng.uniform(0.01, 3.0, size=B) * scale
  pr = -lr * rng.uniform(0.01, 3.0, size=B) * scale
  rc = pc + rng.normal(size=B) * 2 * scale
  rr = pr + rng.normal(size=B) * 2 * scale
  rc[0], rr[0] = pc[0] - 1.0, pr[0] - 1.0   # exact reward tie in row 0
  f32 = lambda x: np.asarray(x, np.float32)
  return dict(pc=f32(pc), pr=f32(pr), rc=f32(rc), rr=f32(rr), lc=f32(lc), lr=f32(lr))


def call(loss_type, b, weights=None, **kw):
  return preference_loss(
      loss_type, policy_chosen_logps_B=jnp.asarray(b["pc"]),
      policy_rejected_logps_B=jnp.asarray(b["pr"]), ref_chosen_logps_B=jnp.asarray(b["rc"]),
      ref_rejected_logps_B=jnp.asarray(b["rr"]), chosen_lengths_B=jnp.asarray(b["lc"]),
      rejected_lengths_B=jnp.asarray(b["lr"]),
      weights_B=None if weights is None else jnp.asarray(weights), **kw)


def lib_kw(kw):
  """numpy-reference keyword names -> preference_loss keyword names."""
  names = {"eps": "label_smoothing", "gamma": "simpo_gamma", "lam": "orpo_lambda", "z0": "kto_z0",
           "wd": "kto_desirable_weight", "wu": "kto_undesirable_weight", "beta": "beta"}
  return {names[k]: v for k, v in kw.items()}


CASES = [
    ("sigmoid", dict(beta=0.1)),
    ("sigmoid", dict(beta=0.5, eps=0.1)),
    ("robust", dict(beta=0.1, eps=0.2)),
    ("ipo", dict(beta=0.1)),
    ("ipo", dict(beta=1.0)),
    ("hinge", dict(beta=0.1)),
    ("simpo", dict(beta=2.0, gamma=1.0)),
    ("orpo", dict(beta=0.1, lam=0.1)),
    ("orpo", dict(beta=0.1, lam=1.5)),
    ("kto", dict(beta=0.1, z0=0.3)),
    ("kto", dict(beta=0.5, z0=2.0, wd=1.33, wu=1.0)),
]


@pytest.mark.parametrize("seed,scale", [(0, 1.0), (1, 0.05), (2, 30.0)])
@pytest.mark.parametrize("loss_type,kw", CASES, ids=[f"{t}-{i}" for i, (t, _) in enumerate(CASES)])
def test_matches_numpy(loss_type, kw, seed, scale):
  b = make_batch(seed, scale)
  loss, m = call(loss_type, b, **lib_kw(kw))
  want = np_metrics(loss_type, **b, **kw)
  mag = max(1.0, np.abs(b["pc"]).max() * kw["beta"] / 1e3)  # float32 cancellation in large sums
  for k, v in want.items():
    np.testing.assert_allclose(float(m[k]), v, rtol=1e-5, atol=1e-6 * mag, err_msg=k)
  assert float(loss) == float(m["loss"])
  assert all(v.dtype == jnp.float32 and v.shape == () for v in m.values())


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_gradients_finite_large_magnitude(loss_type):
  b = make_batch(3, 300.0)   # sums down to ~ -6e4
  b["pc"][1] = -1e-12        # near-certain chosen completion (ORPO's p -> 1)
  b["pr"][2] = 0.0
  kw = dict(beta=0.1, kto_z0=0.5 if loss_type == "kto" else None)

  def f(pc, pr):
    return preference_loss(loss_type, policy_chosen_logps_B=pc, policy_rejected_logps_B=pr,
                           ref_chosen_logps_B=jnp.asarray(b["rc"]),
                           ref_rejected_logps_B=jnp.asarray(b["rr"]),
                           chosen_lengths_B=jnp.asarray(b["lc"]),
                           rejected_lengths_B=jnp.asarray(b["lr"]), **kw)[0]

  loss, grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(jnp.asarray(b["pc"]), jnp.asarray(b["pr"]))
  assert np.isfinite(float(loss))
  for g in grads:
    assert np.isfinite(np.asarray(g)).all()


def test_gradient_of_dpo_matches_closed_form():
  # d/d log pi(y_w) of -log sigmoid(beta h) / B = -beta sigmoid(-beta h) / B
  b = make_batch(4, 1.0)
  beta = 0.3
  g = jax.jit(jax.grad(lambda pc: call("sigmoid", {**b, "pc": pc}, beta=beta)[0]))(jnp.asarray(b["pc"]))
  h = (np.float64(b["pc"]) - b["rc"]) - (np.float64(b["pr"]) - b["rr"])
  np.testing.assert_allclose(np.asarray(g), -beta * np_sigmoid(-beta * h) / 12, rtol=1e-5, atol=1e-8)


# ----------------------------------------------------------------------------- limiting cases

@pytest.mark.parametrize("seed,scale", [(5, 1.0), (6, 30.0)])
def test_cdpo_and_robust_with_zero_smoothing_equal_dpo(seed, scale):
  b = make_batch(seed, scale)
  dpo, _ = call("sigmoid", b, beta=0.2)
  cdpo, _ = call("sigmoid", b, beta=0.2, label_smoothing=0.0)
  robust, _ = call("robust", b, beta=0.2, label_smoothing=0.0)
  assert float(dpo) == float(cdpo) == float(robust)
  np.testing.assert_allclose(float(dpo), np_metrics("sigmoid", **b, beta=0.2)["loss"], rtol=1e-5)


def test_cdpo_half_smoothing_is_symmetric():
  # eps = 1/2: (-log s(z) - log s(-z)) / 2 is even in h, so its gradient at h = 0 vanishes
  b = make_batch(7, 1.0)
  b["pc"] = b["rc"] + b["pr"] - b["rr"]   # h = 0 (up to float32 rounding)
  g = jax.jit(jax.grad(lambda pc: call("sigmoid", {**b, "pc": pc}, beta=0.5,
                                        label_smoothing=0.5)[0]))(jnp.asarray(b["pc"]))
  np.testing.assert_allclose(np.asarray(g), 0.0, atol=1e-5)


def ipo_batch(beta, B=12, seed=8):
  """Exactly representable log-probs with h = 1/(2 beta) in every row."""
  rng = np.random.default_rng(seed)
  pr = -rng.integers(1, 100, size=B).astype(np.float32)
  rc = -rng.integers(1, 100, size=B).astype(np.float32)
  rr = -rng.integers(1, 100, size=B).astype(np.float32)
  pc = (rc + pr - rr + np.float32(1 / (2 * beta))).astype(np.float32)
  ones = np.ones(B, np.float32)
  return dict(pc=pc, pr=pr, rc=rc, rr=rr, lc=ones * 7, lr=ones * 9)


@pytest.mark.parametrize("beta", [0.5, 0.25, 0.125])
def test_ipo_minimum_at_half_inverse_beta(beta):
  b = ipo_batch(beta)
  f = lambda pc, pr: call("ipo", {**b, "pc": pc, "pr": pr}, beta=beta)[0]
  loss, grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(jnp.asarray(b["pc"]), jnp.asarray(b["pr"]))
  assert float(loss) == 0.0
  for g in grads:
    np.testing.assert_array_equal(np.asarray(g), 0.0)
  # moving off the target in either direction increases the loss
  for d in (-0.5, 0.5):
    assert float(f(jnp.asarray(b["pc"] + d), jnp.asarray(b["pr"]))) == pytest.approx(d * d, rel=1e-5)


def test_hinge_zero_when_margin_reached():
  beta = 0.5
  b = make_batch(9, 1.0)
  h = (b["pc"] - b["rc"]) - (b["pr"] - b["rr"])
  b["pc"] = (b["pc"] + np.where(beta * h >= 1, 0, (1 - beta * h) / beta + 0.25)).astype(np.float32)
  f = lambda pc: call("hinge", {**b, "pc": pc}, beta=beta)[0]
  loss, g = jax.jit(jax.value_and_grad(f))(jnp.asarray(b["pc"]))
  assert float(loss) == 0.0 and np.all(np.asarray(g) == 0.0)
  # below the margin: loss 1 - beta h, gradient -beta / B
  b2 = ipo_batch(1.0)  # h = 0.5, beta h = 0.25 < 1
  loss, g = jax.jit(jax.value_and_grad(lambda pc: call("hinge", {**b2, "pc": pc}, beta=beta)[0]))(
      jnp.asarray(b2["pc"]))
  np.testing.assert_allclose(float(loss), 0.75, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(g), -beta / 12, rtol=1e-6)


def test_simpo_gamma0_equal_lengths_is_reference_free_dpo_with_beta_over_len():
  b = make_batch(10, 1.0)
  L = 17.0
  b["lc"][:] = L
  b["lr"][:] = L
  beta = 2.0
  simpo, ms = call("simpo", b, beta=beta, simpo_gamma=0.0)
  dpo, md = call("sigmoid", b, beta=beta / L, reference_free=True)
  np.testing.assert_allclose(float(simpo), float(dpo), rtol=1e-6)
  np.testing.assert_allclose(float(ms["reward_margin"]), float(md["reward_margin"]), rtol=1e-5)
  # simpo ignores the reference entirely
  no_ref = preference_loss("simpo", policy_chosen_logps_B=jnp.asarray(b["pc"]),
                           policy_rejected_logps_B=jnp.asarray(b["pr"]),
                           chosen_lengths_B=jnp.asarray(b["lc"]),
                           rejected_lengths_B=jnp.asarray(b["lr"]), beta=beta, simpo_gamma=0.0)[0]
  assert float(no_ref) == float(simpo)


def test_orpo_lambda0_is_nll():
  b = make_batch(11, 1.0)
  loss, m = call("orpo", b, beta=0.1, orpo_lambda=0.0)
  want = np.mean(-np.float64(b["pc"]) / b["lc"])
  np.testing.assert_allclose(float(loss), want, rtol=1e-6)
  np.testing.assert_allclose(float(m["nll"]), want, rtol=1e-6)
  nll = np.random.default_rng(0).uniform(0, 3, size=12).astype(np.float32)
  loss, _ = call("orpo", b, beta=0.1, orpo_lambda=0.0, chosen_nll_B=jnp.asarray(nll))
  np.testing.assert_allclose(float(loss), nll.astype(np.float64).mean(), rtol=1e-6)
  loss, m = call("orpo", b, beta=0.1, orpo_lambda=0.5, chosen_nll_B=jnp.asarray(nll))
  want = np_metrics("orpo", **b, beta=0.1, lam=0.5, nll=nll)
  np.testing.assert_allclose(float(loss), want["loss"], rtol=1e-5)


def test_orpo_log_odds_stable_near_certainty():
  # mean token log-prob close to 0: log(1 - p) must use expm1, not 1 - exp
  pc = np.array([-1e-6, -1e-4, -0.3, -50.0] * 3, np.float32)
  pr = np.array([-2e-6, -3e-4, -0.7, -80.0] * 3, np.float32)
  b = dict(pc=pc, pr=pr, rc=pc, rr=pr, lc=np.ones(12, np.float32), lr=np.ones(12, np.float32))
  loss, m = call("orpo", b, beta=0.1, orpo_lambda=1.0)
  want = np_metrics("orpo", **b, beta=0.1, lam=1.0)
  for k in ("loss", "chosen_reward", "rejected_reward", "reward_margin"):
    np.testing.assert_allclose(float(m[k]), want[k], rtol=1e-4, err_msg=k)


def test_kto_symmetric_with_zero_reference_point():
  beta = 0.4
  a = np.array([0.0, 0.5, -2.0, 7.0, 40.0, -40.0, 1e3, -1e3, 0.1, -0.1, 3.0, 1.0], np.float32)
  zeros = np.zeros(12, np.float32)
  ones = np.ones(12, np.float32)
  b = dict(pc=a, pr=-a, rc=zeros, rr=zeros, lc=ones, lr=ones)   # r_w = a, r_l = -a
  loss, m = call("kto", b, beta=beta, kto_z0=0.0)
  # L_d = 1 - s(beta a) = L_u, so the row loss is s(-beta a)
  np.testing.assert_allclose(float(loss), np_sigmoid(-beta * np.float64(a)).mean(), rtol=1e-6)
  at0, _ = call("kto", {**b, "pc": zeros, "pr": zeros}, beta=beta, kto_z0=0.0)
  assert float(at0) == 0.5
  # negative z0 is clamped to 0; z0 gets no gradient
  neg, _ = call("kto", b, beta=beta, kto_z0=-3.0)
  assert float(neg) == float(loss)
  gz = jax.jit(jax.grad(lambda z: call("kto", b, beta=beta, kto_z0=z)[0]))(jnp.float32(0.7))
  assert float(gz) == 0.0
  # desirable / undesirable weights scale their halves
  b2 = make_batch(12, 1.0)
  lw, _ = call("kto", b2, beta=beta, kto_z0=0.2, kto_desirable_weight=2.0, kto_undesirable_weight=0.0)
  ld, cw, _ = np_losses("kto", **b2, beta=beta, z0=0.2, wd=1.0, wu=0.0)
  np.testing.assert_allclose(float(lw), (2 * ld).mean(), rtol=1e-5)


def test_kto_reference_point():
  rng = np.random.default_rng(13)
  p = (rng.normal(size=8) * 10 - 50).astype(np.float32)
  r = (p - rng.normal(size=8) - 0.5).astype(np.float32)   # policy above reference: KL > 0
  z = kto_reference_point(jnp.asarray(p), jnp.asarray(r))
  np.testing.assert_allclose(float(z), max(0.0, np.mean(np.float64(p) - r)), rtol=1e-5)
  assert float(kto_reference_point(jnp.asarray(r), jnp.asarray(p))) == 0.0   # clamped
  g = jax.jit(jax.grad(lambda x: kto_reference_point(x, jnp.asarray(r))))(jnp.asarray(p))
  assert np.all(np.asarray(g) == 0.0)
  w = np.array([1, 1, 1, 0, 0, 0, 0, 0], np.float32)
  zw = kto_reference_point(jnp.asarray(p), jnp.asarray(r), jnp.asarray(w))
  np.testing.assert_allclose(float(zw), max(0.0, np.mean(np.float64(p[:3]) - r[:3])), rtol=1e-5)


def test_reference_free_zeroes_reference():
  b = make_batch(14, 1.0)
  zero = {**b, "rc": np.zeros_like(b["rc"]), "rr": np.zeros_like(b["rr"])}
  for t in ("sigmoid", "ipo", "hinge"):
    a, ma = call(t, b, beta=0.1, reference_free=True)
    z, mz = call(t, zero, beta=0.1)
    assert float(a) == float(z) and float(ma["chosen_reward"]) == float(mz["chosen_reward"])


def test_weights_ignore_padding_rows():
  b = make_batch(15, 1.0)
  w = np.array([1] * 7 + [0] * 5, np.float32)
  padded = {k: v.copy() for k, v in b.items()}
  padded["pc"][7:] = -1e9   # garbage rows
  padded["lc"][7:] = 0.0
  for t, kw in [("sigmoid", dict(beta=0.1)), ("ipo", dict(beta=0.1)), ("simpo", dict(beta=2.0)),
                ("orpo", dict(beta=0.1)), ("kto", dict(beta=0.1, z0=0.1))]:
    _, m = call(t, padded, weights=w, **lib_kw(kw))
    want = np_metrics(t, **{k: v[:7] for k, v in b.items()}, **kw)
    for k, v in want.items():
      np.testing.assert_allclose(float(m[k]), v, rtol=1e-5, atol=1e-7, err_msg=f"{t} {k}")


def test_jit_and_dispatch_errors():
  b = make_batch(16, 1.0)
  f = jax.jit(functools.partial(preference_loss, "ipo", beta=0.1))
  loss, _ = f(policy_chosen_logps_B=jnp.asarray(b["pc"]), policy_rejected_logps_B=jnp.asarray(b["pr"]),
              ref_chosen_logps_B=jnp.asarray(b["rc"]), ref_rejected_logps_B=jnp.asarray(b["rr"]),
              chosen_lengths_B=jnp.asarray(b["lc"]), rejected_lengths_B=jnp.asarray(b["lr"]))
  np.testing.assert_allclose(float(loss), np_metrics("ipo", **b, beta=0.1)["loss"], rtol=1e-5)
  with pytest.raises(ValueError, match="sigmoid, robust, ipo, hinge, simpo, orpo, kto"):
    call("dpo", b, beta=0.1)
  with pytest.raises(ValueError, match=r"\[0, 0.5\)"):
    call("robust", b, beta=0.1, label_smoothing=0.5)
  with pytest.raises(ValueError, match="only to loss_type"):
    call("ipo", b, beta=0.1, label_smoothing=0.1)
  with pytest.raises(ValueError, match="kto_reference_point"):
    call("kto", b, beta=0.1)
  with pytest.raises(ValueError, match="beta must be > 0"):
    call("sigmoid", b, beta=0.0)
  with pytest.raises(ValueError, match="reference_free"):
    preference_loss("sigmoid", policy_chosen_logps_B=jnp.asarray(b["pc"]),
                    policy_rejected_logps_B=jnp.asarray(b["pr"]),
                    chosen_lengths_B=jnp.asarray(b["lc"]), rejected_lengths_B=jnp.asarray(b["lr"]),
                    beta=0.1)
