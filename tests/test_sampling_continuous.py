"""Continuous batching (`sampling_continuous`) samples what the static sampler samples.

For the same rng, `generate_continuous` with fewer slots than rows (so slots are
refilled) or one slot per row gives `sampling.generate`'s tokens, masks and lengths
exactly and its log-probs to float rounding, on ragged prompts with rows that stop at
different steps (a stop id, per-row budgets). Few shapes on purpose: every distinct
(shape, static knob) compiles the whole sampler once.
"""
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import rollout
from rlhf_jax.models import ModelConfig, init_params
from rlhf_jax.sampling import generate
from rlhf_jax.sampling_choice import row_bits, row_keys, threefry2x32
from rlhf_jax.sampling_continuous import (continuous_generate_flops, decode_schedule,
                                          generate_continuous)

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                  d_ff=64, max_seq_len=64)
PAD, EOS = 0, 9
LENGTHS = [7, 3, 5, 1, 6, 2]           # real prompt lengths (left-padded)
BUDGETS = [8, 2, 1, 8, 5, 8]           # per-row max new tokens
B, P, N = len(LENGTHS), max(LENGTHS), 8
SAMPLED = dict(temperature=0.8, top_k=5, top_p=0.9)


@pytest.fixture(scope="module")
def params():
  """Random init with weights scaled up so next-token distributions are peaked."""
  p = jax.jit(init_params, static_argnums=0)(CFG, jax.random.PRNGKey(0))
  return jax.tree.map(lambda x: x * 20.0 if x.ndim > 1 else x, p)


@pytest.fixture(scope="module")
def prompts():
  rng = np.random.default_rng(0)
  mask = (np.arange(P)[None, :] >= P - np.array(LENGTHS)[:, None]).astype(np.int32)
  tokens = np.where(mask > 0, rng.integers(1, CFG.vocab_size, (B, P)), PAD)
  return tokens.astype(np.int32), mask


def _kw(greedy):
  return dict(max_new_tokens=N, eos_id=EOS, pad_id=PAD, max_new_tokens_B=np.array(BUDGETS),
              **(dict(greedy=True) if greedy else SAMPLED))


@pytest.fixture(scope="module")
def static(params, prompts):
  return {g: generate(CFG, params, *prompts, jax.random.PRNGKey(3), **_kw(g))
          for g in (False, True)}


def _assert_same(out, ref):
  for name in ("tokens_BN", "mask_BN", "lengths_B", "sequences_BS", "sequence_mask_BS"):
    np.testing.assert_array_equal(getattr(out, name), getattr(ref, name), err_msg=name)
  np.testing.assert_allclose(out.logprobs_BN, ref.logprobs_BN, atol=1e-5, rtol=0)


@pytest.mark.parametrize("greedy,num_slots", [(False, 2), (False, B), (True, 2)],
                         ids=["sampled-refill", "sampled-one_slot_per_row", "greedy-refill"])
def test_continuous_equals_static(params, prompts, static, greedy, num_slots):
  ref = static[greedy]
  lengths, tokens = np.asarray(ref.lengths_B), np.asarray(ref.tokens_BN)
  # the premise: rows stop at different steps, by their budget and by the stop id
  assert len(set(lengths.tolist())) >= 3
  assert any(n < b and tokens[i, n - 1] == EOS for i, (n, b) in enumerate(zip(lengths, BUDGETS)))
  out = generate_continuous(CFG, params, *prompts, jax.random.PRNGKey(3), num_slots=num_slots,
                            **_kw(greedy))
  _assert_same(out, ref)


def test_other_rng_other_samples(params, prompts, static):
  out = generate_continuous(CFG, params, *prompts, jax.random.PRNGKey(4), num_slots=2,
                            **_kw(False))
  assert not np.array_equal(out.tokens_BN, static[False].tokens_BN)


def test_rollout_continuous_equals_static_micro_batches(params, prompts):
  """rollout.sampler="continuous" gives the rollout of the static sampler in micro-batches
  (whose rows keep their noise through row_offset)."""
  class Tok:
    pad_id, eos_id = PAD, EOS

    def decode(self, ids):
      return " ".join(map(str, ids))

  def run(**knobs):
    cfg = types.SimpleNamespace(max_new_tokens=N, generate_micro_batch=3, logprob_micro_batch=B,
                                **SAMPLED, **knobs)
    return rollout.generate_rollout(
        model_config=CFG, params=params, ref_params=None, prompt_tokens_NP=prompts[0],
        prompt_mask_NP=prompts[1], group_size=1, rng=jax.random.PRNGKey(5), rollout_cfg=cfg,
        tokenizer=Tok(), reward_fn=lambda p, t, m: (np.zeros(len(t)), {}), metadata={},
        need_ref=False, need_old=False)
  static_ro = run()
  cont = run(sampler="continuous", decode_slots=2)
  np.testing.assert_array_equal(cont.sequences_BS, static_ro.sequences_BS)
  np.testing.assert_array_equal(cont.completion_mask_BC, static_ro.completion_mask_BC)
  np.testing.assert_allclose(cont.sample_logps_BC, static_ro.sample_logps_BC, atol=1e-5, rtol=0)
  assert cont.texts == static_ro.texts
  assert rollout.decode_slots(types.SimpleNamespace(decode_slots=0, generate_micro_batch=4),
                              6) == 4
  assert rollout.decode_slots(types.SimpleNamespace(decode_slots=16, generate_micro_batch=4),
                              6) == 6


def test_row_noise_depends_on_row_and_step_only():
  """row_bits is Threefry-2x32 (JAX's, bit for bit) of (step, j) under the row's key: row b
  gets the same bits alone or in a batch."""
  from jax.extend.random import threefry_2x32
  key = jnp.array([123, 456], jnp.uint32)
  x = jnp.arange(8, dtype=jnp.uint32)
  y0, y1 = threefry2x32(key[0], key[1], x[:4], x[4:])
  np.testing.assert_array_equal(jnp.concatenate([y0, y1]), threefry_2x32(key, x))
  keys = row_keys(jax.random.PRNGKey(0), jnp.arange(5))
  together = row_bits(keys, jnp.array([0, 1, 2, 3, 4]), 7)
  alone = row_bits(keys[3:4], jnp.array([3]), 7)
  np.testing.assert_array_equal(together[3:4], alone)
  assert together.shape == (5, 7) and len(np.unique(np.asarray(together))) == 35


def test_decode_schedule_and_flops():
  """The host replay of the slot schedule: lengths [3, 1, 2, 5] in 2 slots. Row 1 stops
  at its first token and row 2 takes its slot before any decode step; row 3 takes slot 1
  after two steps; slot 0 idles (at its last step, capped at N - 1) until row 3 ends."""
  assert decode_schedule([3, 1, 2, 5], 2, 8) == [[1, 1], [2, 1], [3, 2], [4, 3], [5, 4]]
  assert decode_schedule([3, 1, 2, 5], 2, 5) == [[1, 1], [2, 1], [3, 2], [4, 3], [4, 4]]
  assert decode_schedule([1, 1, 1], 2, 4) == []
  assert decode_schedule([4, 4], 8, 4) == [[1, 1], [2, 2], [3, 3]]
  # one slot per row, equal lengths: the static sampler's FLOPs
  from rlhf_jax import flops
  assert continuous_generate_flops(CFG, [4, 4], 5, 2, 4) == flops.generate_flops(CFG, 2, 5, 3)


def test_bad_arguments(params, prompts):
  with pytest.raises(ValueError, match="num_slots"):
    generate_continuous(CFG, params, *prompts, jax.random.PRNGKey(0), num_slots=0,
                        max_new_tokens=N, eos_id=None, pad_id=PAD)
  with pytest.raises(ValueError, match="max_new_tokens_B"):
    generate_continuous(CFG, params, *prompts, jax.random.PRNGKey(0), num_slots=2,
                        max_new_tokens=N, eos_id=None, pad_id=PAD,
                        max_new_tokens_B=np.array([0] * B))
  with pytest.raises(ValueError, match="max_new_tokens_B"):
    generate(CFG, params, *prompts, jax.random.PRNGKey(0), max_new_tokens=N, eos_id=None,
             pad_id=PAD, max_new_tokens_B=np.array([N + 1] * B))
