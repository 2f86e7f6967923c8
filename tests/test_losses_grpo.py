"""GRPO-family policy loss (GRPO, DAPO, Dr. GRPO, GSPO) and DAPO's overlong penalty vs float64 numpy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.losses.grpo import grpo_loss, importance_log_ratio, overlong_penalty

B, T, G = 8, 12, 4


def ragged_mask(rng):
  lengths = rng.integers(1, T + 1, size=B)
  m = (np.arange(T)[None, :] < lengths[:, None]).astype(np.float32)
  m[1] = 0.0                 # all-masked row
  m[2] = 1.0                 # full row
  m[3] = 0.0
  m[3, 4:] = 1.0             # left-padded row
  return m


def make_batch(seed, spread=0.3):
  rng = np.random.default_rng(seed)
  m = ragged_mask(rng)
  logp = -rng.exponential(1.0, size=(B, T)).astype(np.float32)
  old = (logp + rng.normal(0, spread, size=(B, T))).astype(np.float32)
  ref = (logp + rng.normal(0, 0.5, size=(B, T))).astype(np.float32)
  adv = rng.normal(size=B).astype(np.float32)
  logp[m == 0], old[m == 0], ref[m == 0] = 40.0, -40.0, 1e3    # garbage where masked
  return logp, old, ref, adv, m


# ----------------------------------------------------------------------------- numpy reference

def np_aggregate(l, m, agg, max_len=None):
  l = np.where(m > 0, np.float64(l), 0.0)
  n = m.sum(1)
  rows = n > 0
  if agg == "token_mean":                     # DAPO
    return l.sum() / max(m.sum(), 1)
  if agg == "seq_mean_token_mean":            # GRPO
    per = l.sum(1)[rows] / n[rows]
  elif agg == "seq_mean_token_sum":
    per = l.sum(1)[rows]
  else:                                       # Dr. GRPO
    per = l.sum(1)[rows] / (T if max_len is None else max_len)
  return per.mean() if rows.any() else 0.0


def np_kl(logp, ref, kind):
  d = np.float64(logp) - ref
  with np.errstate(over="ignore"):   # garbage at masked positions
    return {"k1": d, "k2": 0.5 * d * d, "k3": np.expm1(-d) + d}[kind]


def np_grpo(logp, old, ref, adv, m, agg="seq_mean_token_mean", max_len=None, eps_low=0.2,
            eps_high=None, importance="token", beta=0.0, kind="k3"):
  """Loss and metrics from the papers' formulas.

  token: r_{i,t} = pi/pi_old per token (GRPO / DAPO / Dr. GRPO).
  sequence: GSPO s_i = exp(mean_t log(pi/pi_old)), the same value for every token of row i.
  """
  eps_high = eps_low if eps_high is None else eps_high
  logp, old = np.float64(logp), np.float64(old)
  sel = m > 0
  a = np.broadcast_to(np.float64(adv)[:, None], (B, T)) if np.ndim(adv) == 1 else np.float64(adv)
  with np.errstate(over="ignore"):
    tok_ratio = np.exp(logp - old)
  if importance == "token":
    w = tok_ratio
  else:
    n = np.maximum(m.sum(1), 1)
    s = np.exp(np.where(sel, logp - old, 0.0).sum(1) / n)
    w = np.broadcast_to(s[:, None], (B, T))
  obj = np.minimum(w * a, np.clip(w, 1 - eps_low, 1 + eps_high) * a)
  kl = np_kl(logp, ref, kind)
  policy = np_aggregate(-obj, m, agg, max_len)
  kl_loss = np_aggregate(kl, m, agg, max_len)
  ws, as_ = w[sel], a[sel]
  low = ((ws < 1 - eps_low) & (as_ < 0)).mean()
  high = ((ws > 1 + eps_high) & (as_ > 0)).mean()
  rt = tok_ratio[sel]
  return {
      "loss": policy + beta * kl_loss, "policy_loss": policy, "kl_loss": kl_loss,
      "kl": kl[sel].mean(), "clip_frac_low": low, "clip_frac_high": high, "clip_frac": low + high,
      "approx_kl": (rt - 1 - np.log(rt)).mean(),
      "ratio_mean": ws.mean(), "ratio_min": ws.min(), "ratio_max": ws.max(),
  }


def np_gspo_grad(logp, old, adv, m, eps_low, eps_high):
  """Gradient of GSPO's sequence objective -(1/|S|) sum_i min(s_i A_i, clip(s_i) A_i) (GSPO sec. 4.2):
  d/d logp_{i,t} = -A_i s_i / |y_i| / |S| where the row is not clipped, else 0."""
  sel = m > 0
  n = m.sum(1)
  rows = max((n > 0).sum(), 1)
  s = np.exp(np.where(sel, np.float64(logp) - old, 0.0).sum(1) / np.maximum(n, 1))
  a = np.float64(adv)
  live = np.where(a > 0, s <= 1 + eps_high, s >= 1 - eps_low)
  g_row = np.where(live, -a * s / np.maximum(n, 1) / rows, 0.0)
  return np.where(sel, g_row[:, None], 0.0)


# ----------------------------------------------------------------------------- loss vs numpy

CASES = [
    dict(),                                                                    # GRPO, no KL
    dict(kl_beta=0.04, kl_kind="k3"),                                          # GRPO (DeepSeekMath)
    dict(kl_beta=0.1, kl_kind="k1", aggregation="token_mean"),
    dict(kl_beta=0.1, kl_kind="k2", aggregation="seq_mean_token_sum"),
    dict(aggregation="token_mean", clip_eps_high=0.28),                        # DAPO
    dict(aggregation="seq_mean_token_sum_norm"),                               # Dr. GRPO
    dict(aggregation="seq_mean_token_sum_norm", max_len=30, kl_beta=0.02),
    dict(importance="sequence", clip_eps_low=0.03, clip_eps_high=0.04),        # GSPO (loose eps)
    dict(importance="sequence", aggregation="token_mean", kl_beta=0.05),
]


def np_kw(kw):
  names = {"aggregation": "agg", "max_len": "max_len", "clip_eps_low": "eps_low",
           "clip_eps_high": "eps_high", "importance": "importance", "kl_beta": "beta", "kl_kind": "kind"}
  return {names[k]: v for k, v in kw.items()}


def _value_and_grad(logp, old, ref, adv, m, **kw):
  (loss, metrics), g = jax.value_and_grad(
      lambda lp: grpo_loss(lp, old, adv, m, ref_logps_BC=ref, **kw), has_aux=True)(logp)
  return loss, metrics, g


_vg_jit = jax.jit(_value_and_grad, static_argnames=("aggregation", "importance", "kl_kind"))


def value_and_grad(logp, old, ref, adv, m, aggregation="seq_mean_token_mean", importance="token",
                   kl_kind="k3", kl_beta=0.0, clip_eps_low=0.2, clip_eps_high=None, dual_clip=None):
  """Jitted loss, metrics and d loss / d logp; numeric knobs are traced (no recompiles for new values).

  dual_clip=None is passed as a bound too large to bind (same compiled function); the None
  code path itself is covered by `all_cases`.
  """
  return _vg_jit(logp, old, ref, adv, m, aggregation=aggregation, importance=importance,
                 kl_kind=kl_kind, kl_beta=kl_beta, clip_eps_low=clip_eps_low,
                 clip_eps_high=clip_eps_low if clip_eps_high is None else clip_eps_high,
                 dual_clip=1e30 if dual_clip is None else dual_clip)


@jax.jit
def all_cases(logp, old, ref, adv, m):
  return [_value_and_grad(logp, old, ref, adv, m, **kw) for kw in CASES]


@pytest.mark.parametrize("seed", [0, 1])
def test_grpo_loss_matches_numpy(seed):
  logp, old, ref, adv, m = make_batch(seed)
  results = all_cases(*map(jnp.asarray, (logp, old, ref, adv, m)))
  for kw, (loss, metrics, g) in zip(CASES, results):
    want = np_grpo(logp, old, ref, adv, m, **np_kw(kw))
    for k, v in want.items():
      np.testing.assert_allclose(float(metrics[k]), v, rtol=1e-5, atol=1e-6, err_msg=f"{kw} {k}")
    assert float(loss) == float(metrics["loss"])
    assert np.isfinite(np.asarray(g)).all() and (np.asarray(g)[m == 0] == 0).all()
    assert all(v.dtype == jnp.float32 and v.shape == () for v in metrics.values())


def test_gspo_gradient_is_sequence_level():
  # GSPO-token with per-sequence advantages and seq_mean_token_mean = GSPO's sequence objective,
  # gradient included; some rows clipped (zero gradient), some not.
  logp, old, ref, adv, m = make_batch(2, spread=0.15)
  kw = dict(importance="sequence", clip_eps_low=0.02, clip_eps_high=0.03)
  loss, metrics, g = value_and_grad(*map(jnp.asarray, (logp, old, ref, adv, m)), **kw)
  want_g = np_gspo_grad(logp, old, adv, m, 0.02, 0.03)
  np.testing.assert_allclose(np.asarray(g), want_g, rtol=1e-5, atol=1e-7)
  rows_live = np.abs(want_g).sum(1) > 0
  assert rows_live.sum() >= 1 and (~rows_live & (m.sum(1) > 0)).sum() >= 1


@jax.jit
def ratio_one_cases(logp, ref, adv, m):
  """At old = logp: token vs sequence importance for two aggregations, no-KL, on-policy (old=None)."""
  out = [_value_and_grad(logp, logp, ref, adv, m, aggregation=agg, kl_beta=0.04, importance=imp)
         for agg in ("seq_mean_token_mean", "token_mean") for imp in ("token", "sequence")]
  out.append(_value_and_grad(logp, logp, ref, adv, m))
  on_policy = jax.value_and_grad(lambda lp: grpo_loss(lp, None, adv, m)[0])(logp)
  return out, on_policy


def test_gspo_equals_token_level_at_ratio_one():
  logp, _, ref, adv, m = make_batch(3)
  (smtm_tok, smtm_seq, tm_tok, tm_seq, no_kl), on = ratio_one_cases(*map(jnp.asarray, (logp, ref, adv, m)))
  for tok, seq in ((smtm_tok, smtm_seq), (tm_tok, tm_seq)):
    np.testing.assert_allclose(float(tok[0]), float(seq[0]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(tok[2]), np.asarray(seq[2]), rtol=1e-5, atol=1e-8)
  # and the gradient is A grad log pi (weights 1/(|y_i| |S|)) plus the KL term
  n = m.sum(1, keepdims=True)
  w = m / np.maximum(n, 1) / (n[:, 0] > 0).sum()
  np.testing.assert_allclose(np.asarray(no_kl[2]), -np.float64(adv)[:, None] * w, rtol=1e-5, atol=1e-8)
  # old_logps_BC=None is on-policy: the same loss and gradient
  np.testing.assert_allclose(float(on[0]), float(no_kl[0]), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(on[1]), np.asarray(no_kl[2]), rtol=1e-6, atol=1e-9)


def test_importance_log_ratio_sequence_values():
  logp, old, _, _, m = make_batch(4)
  lw = np.asarray(importance_log_ratio(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(m), "sequence"))
  for b in range(B):
    idx = np.flatnonzero(m[b])
    if len(idx):
      want = np.mean(np.float64(logp[b, idx]) - old[b, idx])
      np.testing.assert_allclose(lw[b, idx], want, rtol=1e-5, atol=1e-6)
    assert (lw[b, m[b] == 0] == 0).all()


def test_clip_higher_and_zero_gradient_on_clipped_tokens():
  logp, old, ref, adv, m = make_batch(5)
  # row 2 (full): ratios 1.25 with A > 0 -- clipped at eps_high = 0.2, live at 0.28
  old[2] = (logp[2] - np.log(1.25)).astype(np.float32)
  adv[2] = 1.0
  args = tuple(map(jnp.asarray, (logp, old, ref, adv, m)))
  _, m_sym, g_sym = value_and_grad(*args, aggregation="token_mean")
  _, m_hi, g_hi = value_and_grad(*args, aggregation="token_mean", clip_eps_high=0.28)
  assert (np.asarray(g_sym)[2] == 0).all()
  assert (np.asarray(g_hi)[2] < 0).all()
  assert float(m_sym["clip_frac_high"]) > float(m_hi["clip_frac_high"])
  # dual clip bounds negative-advantage tokens with huge ratios
  old[2] = (logp[2] - 2.0).astype(np.float32)
  adv[2] = -1.0
  args = tuple(map(jnp.asarray, (logp, old, ref, adv, m)))
  _, md, gd = value_and_grad(*args, aggregation="token_mean", dual_clip=3.0)
  assert (np.asarray(gd)[2] == 0).all() and float(md["dual_clip_frac"]) > 0


def test_degenerate_inputs():
  logp, old, ref, _, m = make_batch(6)
  args = lambda adv, mask: tuple(map(jnp.asarray, (logp, old, ref, adv, mask)))
  # zero advantages and no KL: zero loss, zero gradient
  loss, _, g = value_and_grad(*args(np.zeros(B, np.float32), m))
  assert float(loss) == 0.0 and (np.asarray(g) == 0).all()
  # all-masked batch: zero and finite, for both importance levels
  for imp in ("token", "sequence"):
    loss, metrics, g = value_and_grad(*args(np.ones(B, np.float32), np.zeros_like(m)), importance=imp,
                                      kl_beta=0.04)
    assert float(loss) == 0.0 and (np.asarray(g) == 0).all()
    assert all(np.isfinite(float(v)) for v in metrics.values())
  # [B, T] advantages equal to the broadcast [B] ones
  adv = np.random.default_rng(6).normal(size=B).astype(np.float32)
  l_b, _, g_b = value_and_grad(*args(adv, m))
  l_bt, _, g_bt = value_and_grad(*args(np.repeat(adv[:, None], T, 1), m))
  np.testing.assert_allclose(float(l_b), float(l_bt), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(g_b), np.asarray(g_bt), rtol=1e-6, atol=1e-9)


def test_errors():
  logp, old, ref, adv, m = (jnp.asarray(x) for x in make_batch(7))
  with pytest.raises(ValueError, match="needs ref_logps_BC"):
    grpo_loss(logp, old, adv, m, kl_beta=0.04)
  with pytest.raises(ValueError, match="token, sequence"):
    grpo_loss(logp, old, adv, m, importance="seq")
  with pytest.raises(ValueError, match="seq_mean_token_sum_norm"):
    grpo_loss(logp, old, adv, m, aggregation="dr_grpo")
  with pytest.raises(ValueError, match="k1, k2, k3"):
    grpo_loss(logp, old, adv, m, ref_logps_BC=ref, kl_beta=0.1, kl_kind="low_var_kl")
  with pytest.raises(ValueError, match="dual_clip"):
    grpo_loss(logp, old, adv, m, dual_clip=0.5)


# ----------------------------------------------------------------------------- overlong penalty

def test_overlong_penalty():
  max_len, cache = 20, 4
  lengths = np.arange(0, 26)
  got = np.asarray(jax.jit(overlong_penalty, static_argnums=(1, 2))(jnp.asarray(lengths), max_len, cache))
  # DAPO sec. 3.4: 0 up to L_max - L_cache, linear to -1 at L_max, -1 beyond
  want = np.array([0.0 if L <= max_len - cache else
                   ((max_len - cache) - L) / cache if L <= max_len else -1.0 for L in lengths])
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  assert got[16] == 0.0 and got[20] == -1.0 and got[18] == pytest.approx(-0.5)
  with pytest.raises(ValueError, match="cache_len"):
    overlong_penalty(jnp.asarray(lengths), 20, 0)
  with pytest.raises(ValueError, match="cache_len"):
    overlong_penalty(jnp.asarray(lengths), 20, 21)
