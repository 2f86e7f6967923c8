"""model.logits_chunk: log-probs (and entropies) from the hidden states a chunk of tokens
at a time (`losses.logprobs.chunked_token_logprobs`) equal the unchunked ones, with
gradients, in every log-prob pass that uses them (SFT loss, DPO-family scoring, GRPO and
PPO updates, old/reference log-probs); and the chunked loss compiles to a fraction of
the temporary memory."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax import memory
from rlhf_jax.losses.logprobs import chunked_token_logprobs, token_entropy, token_logprobs
from rlhf_jax.models import ModelConfig, Transformer, init_params
from rlhf_jax.models.api import token_logprobs_from_hidden, window_logprobs
from rlhf_jax.rollout import completion_logps_fn
from rlhf_jax.trainers import dpo, grpo, ppo, sft
from test_prefix_sharing import CFG, _grpo_batch, _pairs

CHUNK = 4  # divides none of the window / sequence lengths below


def chunked(cfg, chunk=CHUNK):
  return dataclasses.replace(cfg, logits_chunk=chunk)


@pytest.fixture(scope="module")
def params():
  return jax.jit(init_params, static_argnums=0)(CFG, jax.random.PRNGKey(0))  # one compile


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol,
                               err_msg=jax.tree_util.keystr(path))


def sgd_state(p):
  return {"step": jnp.zeros((), jnp.int32), "params": p, "opt_state": optax.sgd(1.0).init(p)}


# ----------------------------------------------------------------------------
# The function itself
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("tie", [True, False])
def test_chunked_logprobs_and_entropy_equal_unchunked_with_gradients(tie):
  """T = 13 with chunks of 1, 4 (T not a multiple), 13 and 32 (> T): the log-probs, the
  entropies and the gradients of a masked loss of both (wrt the parameters and the
  hidden states) equal the all-at-once values; float32, temperature 0.7."""
  cfg = dataclasses.replace(CFG, tie_embeddings=tie)
  model = Transformer(cfg)
  p = jax.jit(init_params, static_argnums=0)(cfg, jax.random.PRNGKey(1))
  rng = np.random.default_rng(0)
  B, T = 3, 13
  h = jnp.asarray(rng.normal(size=(B, T, cfg.d_model)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, T)), jnp.int32)
  lengths = np.array([13, 6, 0])  # ragged, one row with nothing to score
  mask = jnp.asarray((np.arange(T)[None] < lengths[:, None]).astype(np.float32))

  def f(p, h, chunk):
    logp, ent = token_logprobs_from_hidden(model, p, h, targets, chunk=chunk, temperature=0.7,
                                           entropy=True)
    return jnp.sum(logp * mask) + 0.3 * jnp.sum(ent * mask), (logp, ent)

  chunks = (0, 1, 4, 13, 32)
  out = jax.jit(lambda p, h: {c: jax.value_and_grad(f, (0, 1), has_aux=True)(p, h, c)
                              for c in chunks})(p, h)
  (loss0, (logp0, ent0)), grads0 = out[0]
  logits = model.apply({"params": p}, h, method=Transformer.unembed)
  np.testing.assert_allclose(logp0, token_logprobs(logits, targets, 0.7), rtol=1e-6)
  np.testing.assert_allclose(ent0, token_entropy(logits, 0.7), rtol=1e-6)
  # Independent float64 reference from the formulas: z = h W / tau,
  # log p(y) = z_y - log sum_v exp z_v,  H = -sum_v p_v log p_v.
  pp = jax.tree.map(lambda x: np.asarray(x, np.float64), p)
  w_DV = pp["embed"]["embedding"].T if tie else pp["lm_head"]
  z = np.einsum("btd,dv->btv", np.asarray(h, np.float64), w_DV) / 0.7
  z -= z.max(-1, keepdims=True)
  logsm = z - np.log(np.exp(z).sum(-1, keepdims=True))
  want_logp = np.take_along_axis(logsm, np.asarray(targets)[..., None], -1)[..., 0]
  want_ent = -(np.exp(logsm) * logsm).sum(-1)
  for c in chunks:
    np.testing.assert_allclose(out[c][0][1][0], want_logp, rtol=1e-5, atol=1e-5, err_msg=str(c))
    np.testing.assert_allclose(out[c][0][1][1], want_ent, rtol=1e-5, atol=1e-5, err_msg=str(c))
  assert logp0.shape == ent0.shape == (B, T)
  for c in chunks[1:]:
    (loss, (logp, ent)), grads = out[c]
    np.testing.assert_allclose(logp, logp0, rtol=1e-6, atol=1e-6, err_msg=str(c))
    np.testing.assert_allclose(ent, ent0, rtol=1e-6, atol=1e-6, err_msg=str(c))
    np.testing.assert_allclose(loss, loss0, rtol=1e-6, err_msg=str(c))
    assert_trees_close(grads, grads0, rtol=1e-5, atol=1e-6)
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads0)) > 1e-3  # not vacuous


def test_chunked_logprobs_alone_from_any_unembed_function():
  """entropy=False returns the log-probs alone; any unembed function works (the losses
  layer knows nothing of models); bfloat16 hidden states are fine."""
  rng = np.random.default_rng(2)
  w = jnp.asarray(rng.normal(size=(8, 50)), jnp.float32)
  unembed = lambda h: jnp.einsum("btd,dv->btv", h.astype(jnp.float32), w)
  h = jnp.asarray(rng.normal(size=(2, 9, 8)), jnp.bfloat16)
  t = jnp.asarray(rng.integers(0, 50, (2, 9)))
  want = token_logprobs(unembed(h), t)
  for c in (0, 2, 9, 100):
    got = chunked_token_logprobs(unembed, h, t, chunk=c)
    assert got.shape == (2, 9) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_chunked_loss_compiles_to_a_fraction_of_the_temporary_memory():
  """value_and_grad of the SFT loss, V = 32768, T = 1024, D = 64 (abstract inputs, nothing
  allocated): the unchunked loss keeps [T, V] float32 buffers (128 MiB each), chunks of
  128 tokens only [128, V] ones (16 MiB)."""
  base = ModelConfig(vocab_size=32768, d_model=64, n_layers=1, n_heads=2, n_kv_heads=1,
                     head_dim=32, d_ff=128, max_seq_len=1024)
  B, T = 1, 1024
  batch = {k: jax.ShapeDtypeStruct((B, T), jnp.int32)
           for k in ("tokens", "segment_ids", "loss_mask")}
  temp = {}
  for chunk in (0, 128):
    model = Transformer(chunked(base, chunk))
    p = nn.meta.unbox(jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))["params"]))
    loss = lambda p, b: sft.make_loss_sums(model)(p, b)[0]
    temp[chunk] = (jax.jit(jax.value_and_grad(loss)).lower(p, batch).compile()
                   .memory_analysis().temp_size_in_bytes)
  MiB = 2 ** 20
  full_logits = B * T * base.vocab_size * 4
  assert temp[0] >= 1.5 * full_logits, temp       # measured: 278 MiB
  assert temp[128] * 4 < temp[0], temp            # measured: 54 MiB
  assert temp[128] < 0.5 * full_logits, temp      # less than one [T, V] buffer
  print({k: f"{v / MiB:.0f} MiB" for k, v in temp.items()})
  # The planning estimate (rlhf_jax/memory.py) counts one chunk of logits per row.
  est = {c: memory.train_step_bytes(chunked(base, c), rows=B, seq_len=T)["logits"]
         for c in (0, 128, 4096)}
  assert est[0] == est[4096] == 8 * B * T * base.vocab_size  # logits + their gradient, f32
  assert est[128] == 8 * B * 128 * base.vocab_size


# ----------------------------------------------------------------------------
# Every wired log-prob pass: logits_chunk = 0 vs CHUNK (loss and gradients)
# ----------------------------------------------------------------------------

def test_sft_step_and_eval_equal(params):
  rng = np.random.default_rng(3)
  B, T = 4, 11
  seg = (np.arange(T)[None] < np.array([11, 3, 7, 5])[:, None]).astype(np.int32)
  loss_mask = seg * (np.arange(T)[None] >= 2)
  batch = {"tokens": jnp.asarray(rng.integers(1, CFG.vocab_size, (B, T)) * seg, jnp.int32),
           "segment_ids": jnp.asarray(seg), "loss_mask": jnp.asarray(loss_mask)}
  out = {}
  for c in (0, CHUNK):
    model = Transformer(chunked(CFG, c))
    step = sft.make_train_step(model, optax.sgd(1.0))
    out[c] = jax.jit(lambda s, b: (step(s, b), sft.make_eval_step(model)(s["params"], b)))(
        sgd_state(params), batch)
  (s0, m0), e0 = out[0]
  (s1, m1), e1 = out[CHUNK]
  np.testing.assert_allclose(m1["loss"], m0["loss"], rtol=1e-6)
  np.testing.assert_allclose(e1[0], e0[0], rtol=1e-6)
  assert float(e1[1]) == float(e0[1]) == loss_mask[:, 1:].sum()
  assert_trees_close(s1["params"], s0["params"])  # SGD(lr 1): the change is the gradient
  assert float(m0["grad_norm"]) > 1e-2


def test_dpo_scoring_equal_packed_and_unpacked(params):
  """Policy and on-the-fly reference log-probs, packed pairs (window) and separate rows."""
  rng = np.random.default_rng(4)
  P, C = 7, 6
  batch = {k: jnp.asarray(v) for k, v in _pairs(rng, 5, P, C).items()}

  class D(dict):
    __getattr__ = dict.__getitem__
  d = D(loss_type="sigmoid", reference_free=False, beta=0.1, label_smoothing=0.0,
        simpo_gamma=0.0, orpo_lambda=0.0, kto_desirable_weight=1.0, kto_undesirable_weight=1.0)
  ref = jax.tree.map(lambda x: x * 0.9, params)
  windows = (0, C)

  def run(c, w):
    loss_fn = dpo.make_loss_fn(Transformer(chunked(CFG, c)), d, w)
    return jax.value_and_grad(lambda p: loss_fn(p, ref, batch), has_aux=True)(params)

  out = jax.jit(lambda: {(c, w): run(c, w) for c in (0, CHUNK) for w in windows})()
  for w in windows:
    (l0, m0), g0 = out[(0, w)]
    (l1, m1), g1 = out[(CHUNK, w)]
    np.testing.assert_allclose(l1, l0, rtol=1e-5, atol=1e-7, err_msg=str(w))
    for k in m0:
      np.testing.assert_allclose(m1[k], m0[k], rtol=1e-5, atol=1e-6, err_msg=f"{w} {k}")
    assert_trees_close(g1, g0, rtol=1e-5, atol=1e-7)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g0)) > 1e-4


def test_grpo_update_and_old_ref_logps_equal(params):
  """The clipped-policy update (log-probs, entropy; groups packed) and the old/reference
  log-prob pass (`rollout.completion_logps_fn`, rows separate and groups packed)."""
  rng = np.random.default_rng(5)
  P, C, G = 5, 7, 3
  seq, seg, cmask = _grpo_batch(rng, 2, G, P, C)
  B = len(seq)
  mb = {"sequences_BS": seq, "segment_ids_BS": seg, "mask_BC": cmask,
        "old_logps_BC": (rng.normal(size=(B, C)) * 0.1 - 3).astype(np.float32) * cmask,
        "advantages_BC": rng.normal(size=(B, C)).astype(np.float32) * cmask,
        "ref_logps_BC": (rng.normal(size=(B, C)) * 0.1 - 3).astype(np.float32) * cmask}
  algo = dict(grpo.VARIANTS["grpo"])
  out, lp = {}, {}
  for c in (0, CHUNK):
    out[c] = grpo.make_update(Transformer(chunked(CFG, c)), optax.sgd(1.0), algo, P, 0.8, C, 1,
                              group_size=G)(sgd_state(params), mb)
    for g in (1, G):
      lp[c, g] = completion_logps_fn(chunked(CFG, c), P, 0.8, g)(params, seq, seg)
  for g in (1, G):
    np.testing.assert_allclose(np.asarray(lp[CHUNK, g]) * cmask, np.asarray(lp[0, g]) * cmask,
                               rtol=1e-6, atol=1e-6)
  assert_trees_close(out[CHUNK][0]["params"], out[0][0]["params"], rtol=1e-5, atol=1e-7)
  for k in ("loss", "entropy", "kl"):
    np.testing.assert_allclose(out[CHUNK][1][k], out[0][1][k], rtol=1e-5, atol=1e-7, err_msg=k)
  assert float(out[0][1]["entropy"]) > 1.0


@pytest.mark.parametrize("critic", ["separate", "shared"])
def test_ppo_update_equal(critic):
  """Policy log-probs and the entropy bonus (in the loss: entropy_coef > 0) from chunks;
  the value head is untouched."""
  rng = np.random.default_rng(6)
  P, C = 5, 6
  seq, seg, cmask = _grpo_batch(rng, 4, 1, P, C)
  B = len(seq)
  mb = {"sequences_BS": seq, "segment_ids_BS": seg, "mask_BC": cmask,
        "old_logps_BC": (rng.normal(size=(B, C)) * 0.1 - 3).astype(np.float32) * cmask,
        "advantages_BC": rng.normal(size=(B, C)).astype(np.float32) * cmask,
        "old_values_BC": rng.normal(size=(B, C)).astype(np.float32) * cmask,
        "returns_BC": rng.normal(size=(B, C)).astype(np.float32) * cmask}

  class PP(dict):
    __getattr__ = dict.__getitem__
  p = PP(clip_eps=0.2, clip_eps_high=0.0, dual_clip=0.0, value_clip_eps=0.2, vf_coef=0.1,
         entropy_coef=0.05, aggregation="token_mean")
  pv0 = ppo.PolicyValue(CFG, critic)
  params = nn.meta.unbox(jax.jit(pv0.init)(jax.random.PRNGKey(2), jnp.asarray(seq),
                                           jnp.asarray(seg))["params"])
  out = {c: ppo.make_update(ppo.PolicyValue(chunked(CFG, c), critic), optax.sgd(1.0), p, P, 0.9,
                            C)(sgd_state(params), mb) for c in (0, CHUNK)}
  assert_trees_close(out[CHUNK][0]["params"], out[0][0]["params"], rtol=1e-5, atol=1e-7)
  for k in ("loss", "entropy", "value_loss"):
    np.testing.assert_allclose(out[CHUNK][1][k], out[0][1][k], rtol=1e-5, atol=1e-7, err_msg=k)
