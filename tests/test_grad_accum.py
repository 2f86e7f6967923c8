"""grad_accum_steps in the reward-model, PRM and DPO trainers: a step over A micro-batches
equals the step over the whole batch (issue #17: they used to ignore the setting).

SGD with learning rate 1 makes the parameter change the gradient itself, so comparing
the updated parameters compares gradients. Batches are ragged (different real-token
and step counts per micro-batch) so that a wrong weighting of the parts shows."""
from __future__ import annotations

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax import config as config_lib
from rlhf_jax.launch import load_config
from rlhf_jax.models import ModelConfig, Transformer
from rlhf_jax.models.heads import ScalarModel
from rlhf_jax import trainers
from rlhf_jax.trainers import dpo, prm, reward_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = ModelConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1,
                  head_dim=8, d_ff=32)
TX = optax.sgd(1.0)
B, T = 4, 10


def _state(model):
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))["params"])
  return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": TX.init(params)}


def _rows(rng, lengths, start=0):
  seg = (np.arange(T)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
  tokens = rng.integers(3, CFG.vocab_size, size=(len(lengths), T)) * seg
  mask = seg * (np.arange(T)[None] >= start)
  return jnp.asarray(tokens, jnp.int32), jnp.asarray(seg), jnp.asarray(mask, jnp.int32)


def _assert_same_update(make_step, state, *args, exact_metrics=(), accums=(2,)):
  s1, m1 = jax.jit(make_step(1))(state, *args)
  for a in accums:
    s2, m2 = jax.jit(make_step(a))(state, *args)
    deltas = []
    for p0, p1, p2 in zip(*(jax.tree.leaves(s["params"]) for s in (state, s1, s2))):
      g1, g2 = np.asarray(p0) - np.asarray(p1), np.asarray(p0) - np.asarray(p2)
      np.testing.assert_allclose(g2, g1, atol=1e-6, rtol=1e-4)
      deltas.append(np.abs(g1).max())
    assert max(deltas) > 1e-4  # the step did move the parameters
    assert set(m1) == set(m2)
    for k in m1:
      if k == "skipped_update":
        assert float(m2[k]) == float(m1[k]) == 0.0
      elif k in exact_metrics:
        assert float(m2[k]) == float(m1[k]), k
      else:
        np.testing.assert_allclose(float(m2[k]), float(m1[k]), rtol=2e-5, atol=1e-6, err_msg=k)
  return m1


def test_reward_model_accumulates_like_one_batch():
  model = ScalarModel(CFG)
  rng = np.random.default_rng(0)
  ct, cs, _ = _rows(rng, [10, 3, 7, 5])
  rt, rs, _ = _rows(rng, [4, 9, 2, 10])
  batch = {"chosen_tokens": ct, "chosen_segment_ids": cs, "rejected_tokens": rt,
           "rejected_segment_ids": rs, "margin": jnp.asarray([0.5, 0.0, 1.0, 0.25])}
  _assert_same_update(
      lambda a: reward_model.make_train_step(model, TX, 0.01, True, grad_accum_steps=a),
      _state(model), batch)


def test_prm_accumulates_like_one_batch_with_exact_counts():
  model = ScalarModel(CFG)
  rng = np.random.default_rng(1)
  tokens, seg, _ = _rows(rng, [10, 6, 8, 4])
  step_mask = np.zeros((B, T), np.int32)
  labels = np.zeros((B, T), np.int32)
  # row 0: 3 steps (2 correct), row 1: none, row 2: 2 wrong, row 3: 1 correct
  for b, pos, lab in [(0, 2, 1), (0, 5, 1), (0, 9, 0), (2, 3, 0), (2, 7, 0), (3, 3, 1)]:
    step_mask[b, pos], labels[b, pos] = 1, lab
  batch = {"tokens": tokens, "segment_ids": seg, "step_mask": jnp.asarray(step_mask),
           "step_labels": jnp.asarray(labels)}
  m = _assert_same_update(
      lambda a: prm.make_train_step(model, TX, 2.0, grad_accum_steps=a), _state(model), batch,
      exact_metrics=("num_steps",), accums=(2, 4))  # 4: one part has no steps at all
  assert float(m["num_steps"]) == 6.0
  assert float(m["positive_frac"]) == pytest.approx(3 / 6)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "simpo"])
def test_dpo_accumulates_like_one_batch(loss_type):
  model = Transformer(CFG)
  d = load_config(os.path.join(ROOT, "configs/dpo.py:tiny")).dpo
  d.loss_type = loss_type
  rng = np.random.default_rng(2)
  batch = {}
  for side, lengths in (("chosen", [10, 5, 8, 7]), ("rejected", [6, 9, 4, 10])):
    tok, seg, mask = _rows(rng, lengths, start=3)
    batch.update({f"{side}_tokens": tok, f"{side}_segment_ids": seg, f"{side}_loss_mask": mask})
  state = _state(model)
  ref = None
  if dpo.uses_reference(d):  # a reference that differs from the policy
    ref = jax.tree.map(lambda p: p * 0.9, state["params"])
  _assert_same_update(lambda a: dpo.make_train_step(model, TX, d, grad_accum_steps=a),
                      state, ref, batch)


def test_kto_refuses_grad_accumulation_at_validation():
  c = load_config(os.path.join(ROOT, "configs/dpo.py:tiny"))
  c.dpo.loss_type = "kto"
  c.batch_size = 4
  c.grad_accum_steps = 2
  with pytest.raises(config_lib.ConfigError, match=r"config.grad_accum_steps: must be 1 with "
                                                   r"dpo.loss_type 'kto'"):
    trainers.validate(c, 1)
  c.grad_accum_steps = 1
  trainers.validate(c, 1)


@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_online_rl_refuses_grad_accum_steps_and_names_its_knob(algo):
  # Every trainer honours grad_accum_steps or refuses it: PPO / GRPO accumulate with
  # rollout.train_micro_batch (tested in test_grpo_train / test_logprobs_chunked).
  c = load_config(os.path.join(ROOT, f"configs/{algo}.py:tiny"))
  trainers.validate(c, 1)
  c.grad_accum_steps = 2
  with pytest.raises(config_lib.ConfigError,
                     match=r"config.grad_accum_steps: .*set rollout.train_micro_batch"):
    trainers.validate(c, 1)
