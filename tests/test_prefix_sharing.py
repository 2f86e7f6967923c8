"""Prefix sharing: rows that share a prompt (DPO's chosen/rejected, a GRPO group) run as
one packed row [prompt | continuation 1 | continuation 2 ...] and only continuation
positions are unembedded. Everything here is checked against the plain per-row
forward pass (the reference) on ragged, left- and right-padded rows."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax.data.sft import DataError
from rlhf_jax.models import ModelConfig, Transformer, init_params
from rlhf_jax.models.api import window_logits
from rlhf_jax.models.segments import pack_shared_prefix, shared_prefix_mask
from rlhf_jax.rollout import completion_logps_fn
from rlhf_jax.trainers import dpo, grpo

CFG = ModelConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                  d_ff=64, max_seq_len=128)


@pytest.fixture(scope="module")
def params():
  return jax.jit(init_params, static_argnums=0)(CFG, jax.random.PRNGKey(0))  # one compile


def grouped_rows(rng, N, G, T, W, left_pad=True):
  """N groups of G rows [T]: a shared (optionally left-padded) prompt, then ragged
  continuations of 0..W tokens; returns tokens, segment ids and continuation starts."""
  B = N * G
  tokens = np.zeros((B, T), np.int32)
  seg = np.zeros((B, T), np.int32)
  start = np.zeros(B, np.int32)
  for i in range(N):
    plen = int(rng.integers(1, T - W + 1))
    pad = int(rng.integers(0, min(2, plen))) if left_pad else 0
    prompt = rng.integers(1, CFG.vocab_size, plen)
    for g in range(G):
      b = i * G + g
      n = int(rng.integers(0, W + 1))
      tokens[b, :plen] = prompt
      tokens[b, :pad] = 0
      seg[b, pad:plen] = 1
      tokens[b, plen:plen + n] = rng.integers(1, CFG.vocab_size, n)
      seg[b, plen:plen + n] = 1
      start[b] = plen
  return tokens, seg, start


def test_shared_prefix_mask_matches_its_definition():
  rng = np.random.default_rng(0)
  seg = rng.integers(0, 4, (3, 9))
  got = np.asarray(shared_prefix_mask(jnp.asarray(seg)))
  want = np.zeros((3, 9, 9), bool)
  for b in range(3):
    for t in range(9):
      for s in range(t + 1):
        want[b, t, s] = seg[b, s] > 0 and (seg[b, s] == seg[b, t] or seg[b, s] == 1)
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("G,W", [(1, 5), (2, 5), (3, 4), (4, 7)])
def test_window_logits_equal_the_per_row_forward(params, G, W):
  """logits_BWV[b, w] == plain forward logits[b, start_b + w - 1] wherever the window
  token is real; invalid exactly where it is padding, past T, or at slot 0."""
  rng = np.random.default_rng(G * 10 + W)
  T = 14
  tokens, seg, start = grouped_rows(rng, 3, G, T, W)
  if G == 1:
    start[0] = 0  # slot 0 has no predictor: must be invalid
  model = Transformer(CFG)

  @jax.jit  # both passes in one program: one compilation instead of op-by-op dispatch
  def forward(params, tokens, seg, start):
    full = model.apply({"params": params}, tokens, seg)[0]
    return full, window_logits(model, params, tokens, seg, start, group_size=G, window=W)
  full, (logits, pk) = forward(params, tokens, seg, start)
  full = np.asarray(full)
  logits, valid = np.asarray(logits), np.asarray(pk.valid_BW)
  assert pk.tokens_NL.shape == (3, T + (G - 1) * W)
  checked = 0
  for b in range(len(tokens)):
    for w in range(W):
      s = start[b] + w
      real = s < T and seg[b, s] > 0 and s >= 1
      assert valid[b, w] == real, (b, w)
      if real:
        assert int(pk.targets_BW[b, w]) == tokens[b, s]
        np.testing.assert_allclose(logits[b, w], full[b, s - 1], atol=2e-5, rtol=1e-5)
        checked += 1
  assert checked >= len(tokens)  # not vacuous


def test_windows_past_the_row_end_are_invalid_and_give_finite_gradients(params):
  """Windows that run past T (start_b + W > T + 1) index no packed position beyond the
  row: their slots are invalid, and logits and gradients stay finite."""
  rng = np.random.default_rng(7)
  T, W = 10, 6
  tokens, seg, start = grouped_rows(rng, 4, 1, T, 3)
  start[:] = [8, 9, 10, 3]
  seg[:, :] = 1
  model = Transformer(CFG)

  def loss(p):
    logits, pk = window_logits(model, p, jnp.asarray(tokens), jnp.asarray(seg),
                               jnp.asarray(start), group_size=1, window=W)
    lp = jax.nn.log_softmax(logits)
    picked = jnp.take_along_axis(lp, pk.targets_BW[..., None], -1)[..., 0]
    return jnp.sum(jnp.where(pk.valid_BW, picked, 0.0)), (logits, pk)
  (value, (logits, pk)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  valid = np.asarray(pk.valid_BW)
  want = (start[:, None] + np.arange(W)[None]) < T
  np.testing.assert_array_equal(valid, want)
  assert np.isfinite(np.asarray(logits)).all() and np.isfinite(float(value))
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


def test_prefix_sharing_is_skipped_when_it_costs_flops():
  from rlhf_jax.models.api import prefix_sharing_saves_flops
  big = ModelConfig(vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3,
                    head_dim=64, d_ff=1536)
  bench = ModelConfig(vocab_size=1024, d_model=256, n_layers=4, n_heads=4, n_kv_heads=2,
                      head_dim=64, d_ff=1024)
  assert prefix_sharing_saves_flops(bench, 32, 64, 4)        # the CPU benchmark's GRPO
  assert prefix_sharing_saves_flops(bench, 64, 64, 2)        # ... and DPO shapes
  assert not prefix_sharing_saves_flops(big, 256, 512, 8)    # GSM8K: 8 x 512-token replies
  assert prefix_sharing_saves_flops(big, 256, 512, 1)


def test_pack_rejects_partial_groups():
  x = jnp.zeros((5, 8), jnp.int32)
  with pytest.raises(ValueError, match="whole groups of 2"):
    pack_shared_prefix(x, x, jnp.zeros(5, jnp.int32), 2, 3)


def _pairs(rng, B, P, C):
  """Tokenised preference pairs in the `pairs.tokenize` layout (right-padded rows)."""
  T = P + C
  out = {f"{s}_{k}": np.zeros((B, T), np.int32) for s in ("chosen", "rejected")
         for k in ("tokens", "segment_ids", "loss_mask")}
  for b in range(B):
    prompt = list(rng.integers(1, CFG.vocab_size, int(rng.integers(1, P + 1))))
    for s in ("chosen", "rejected"):
      reply = list(rng.integers(1, CFG.vocab_size, int(rng.integers(1, C + 1))))
      n = len(prompt) + len(reply)
      out[f"{s}_tokens"][b, :n] = prompt + reply
      out[f"{s}_segment_ids"][b, :n] = 1
      out[f"{s}_loss_mask"][b, len(prompt):n] = 1
  out["margin"] = np.zeros(B, np.float32)
  return out


def test_dpo_packed_pairs_give_the_separate_rows_logps_and_gradients(params):
  rng = np.random.default_rng(1)
  P, C = 7, 6
  batch = {k: jnp.asarray(v) for k, v in _pairs(rng, 5, P, C).items()}
  model = Transformer(CFG)
  names = ("chosen", "rejected")
  dpo.check_shared_prompts({k: np.asarray(v) for k, v in batch.items()}, C, "test")
  sep, packed = dpo.make_sequence_logps(model, names), dpo.make_sequence_logps(model, names, C)
  (sc, sr), (nc, nr) = jax.jit(sep)(params, batch)
  (pc, pr), (mc, mr) = jax.jit(packed)(params, batch)
  np.testing.assert_allclose(np.asarray(pc), np.asarray(sc), rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(np.asarray(pr), np.asarray(sr), rtol=1e-5, atol=1e-4)
  np.testing.assert_array_equal(np.asarray(mc), np.asarray(nc))
  np.testing.assert_array_equal(np.asarray(mr), np.asarray(nr))
  # The DPO loss's gradient through both paths.
  d = {"loss_type": "sigmoid", "reference_free": True, "beta": 0.1, "label_smoothing": 0.0,
       "simpo_gamma": 0.0, "orpo_lambda": 0.0, "kto_desirable_weight": 1.0,
       "kto_undesirable_weight": 1.0}

  class D(dict):
    __getattr__ = dict.__getitem__
  grads = [jax.jit(jax.grad(lambda p: dpo.make_loss_fn(model, D(d), w)(p, None, batch)[0]))(
      params) for w in (0, C)]
  for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads[0])) > 1e-4


def test_dpo_packing_refuses_pairs_without_a_shared_prompt():
  rng = np.random.default_rng(2)
  arrays = _pairs(rng, 4, 5, 4)
  dpo.check_shared_prompts(arrays, 4, "train")
  arrays["rejected_tokens"][2, 0] = (arrays["chosen_tokens"][2, 0] % 30) + 1
  with pytest.raises(DataError, match="train pair 2: .*dpo.share_prompt=False"):
    dpo.check_shared_prompts(arrays, 4, "train")
  long = _pairs(rng, 3, 5, 4)
  n_reply = np.maximum(long["chosen_loss_mask"].sum(1), long["rejected_loss_mask"].sum(1))
  first_long = int(np.flatnonzero(n_reply > 1)[0]) if (n_reply > 1).any() else None
  if first_long is None:  # make one reply 2 tokens long
    long["chosen_loss_mask"][0, 6] = long["chosen_segment_ids"][0, 6] = 1
    first_long = 0
  with pytest.raises(DataError, match=f"train pair {first_long}: .*max_completion_len=1"):
    dpo.check_shared_prompts(long, 1, "train")


def _grpo_batch(rng, N, G, P, C):
  """A GRPO minibatch: left-padded prompts shared by each group of G rows, ragged
  completions (the `rollout.generate_rollout` layout)."""
  B = N * G
  seq = np.zeros((B, P + C), np.int32)
  pmask = np.zeros((B, P), np.int32)
  for i in range(N):
    n = int(rng.integers(1, P + 1))
    prompt = rng.integers(1, CFG.vocab_size, n)
    for g in range(G):
      seq[i * G + g, P - n:P] = prompt
      pmask[i * G + g, P - n:] = 1
  lengths = rng.integers(1, C + 1, B)
  cmask = (np.arange(C)[None] < lengths[:, None]).astype(np.int32)
  seq[:, P:] = rng.integers(1, CFG.vocab_size, (B, C)) * cmask
  return seq, np.concatenate([pmask, cmask], 1), cmask


def test_completion_logps_shared_equal_separate(params):
  rng = np.random.default_rng(4)
  P, C, G = 6, 5, 3
  seq, seg, cmask = _grpo_batch(rng, 4, G, P, C)
  a = np.asarray(completion_logps_fn(CFG, P, 0.8)(params, seq, seg)) * cmask
  b = np.asarray(completion_logps_fn(CFG, P, 0.8, G)(params, seq, seg)) * cmask
  model = Transformer(CFG)
  logits = np.asarray(jax.jit(model.apply)({"params": params}, seq, seg)[0], np.float64)[:, P - 1:-1]
  z = logits / 0.8
  ref = np.take_along_axis(z, seq[:, P:, None], -1)[..., 0] - np.log(np.exp(z).sum(-1))
  np.testing.assert_allclose(a, ref * cmask, atol=2e-5)
  np.testing.assert_allclose(b, ref * cmask, atol=2e-5)


def test_grpo_update_with_shared_prompts_equals_separate_rows(params):
  """One SGD(lr 1) step (the parameter change is the gradient): packed groups vs rows."""
  rng = np.random.default_rng(5)
  P, C, G, N = 5, 6, 4, 3
  seq, seg, cmask = _grpo_batch(rng, N, G, P, C)
  B = N * G
  mb = {"sequences_BS": seq, "segment_ids_BS": seg, "mask_BC": cmask,
        "old_logps_BC": (rng.normal(size=(B, C)) * 0.1 - 3).astype(np.float32) * cmask,
        "advantages_BC": rng.normal(size=(B, C)).astype(np.float32) * cmask,
        "ref_logps_BC": (rng.normal(size=(B, C)) * 0.1 - 3).astype(np.float32) * cmask}
  state = {"step": jnp.zeros((), jnp.int32), "params": params,
           "opt_state": optax.sgd(1.0).init(params)}
  model = Transformer(CFG)
  algo = dict(grpo.VARIANTS["grpo"])
  out = {g: grpo.make_update(model, optax.sgd(1.0), algo, P, 0.9, C, 1, group_size=g)(state, mb)
         for g in (1, G)}
  for a, b in zip(jax.tree.leaves(out[1][0]["params"]), jax.tree.leaves(out[G][0]["params"])):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)
  delta = max(float(jnp.abs(x - y).max()) for x, y in
              zip(jax.tree.leaves(out[1][0]["params"]), jax.tree.leaves(params)))
  assert delta > 1e-4  # not vacuous
  for k in ("loss", "entropy", "kl"):
    np.testing.assert_allclose(float(out[G][1][k]), float(out[1][1][k]), rtol=1e-5, atol=1e-6)
