"""Decoding at scale: shared prefill for groups, the KV-cache dtype, a sharded KV cache.

The sharded cache runs tests/sharded_decode_check.py in its own process (8 simulated
CPU devices: XLA_FLAGS must be set before JAX starts).
"""
import json
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import xla_flags
from rlhf_jax import parallel, rollout, sampling
from rlhf_jax.models import ModelConfig, init_params
from rlhf_jax.sampling import generate

HERE = os.path.dirname(os.path.abspath(__file__))
CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                  d_ff=64, max_seq_len=64)
PAD = 0
LENGTHS = [7, 3, 5]        # three prompts (left-padded) ...
G = 4                      # ... of four samples each: B = 12 rows
P = max(LENGTHS)
N = 8                      # max_new_tokens


@pytest.fixture(scope="module")
def params():
  """Random init with weights scaled up so next-token distributions are peaked."""
  p = jax.jit(init_params, static_argnums=0)(CFG, jax.random.PRNGKey(0))
  return jax.tree.map(lambda x: x * 20.0 if x.ndim > 1 else x, p)


@pytest.fixture(scope="module")
def groups():
  """(tokens, mask) [B, P]: each prompt repeated G times (the rollout layout)."""
  rng = np.random.default_rng(0)
  mask = (np.arange(P)[None, :] >= P - np.array(LENGTHS)[:, None]).astype(np.int32)
  tokens = np.where(mask > 0, rng.integers(1, CFG.vocab_size, (len(LENGTHS), P)), PAD)
  return np.repeat(tokens.astype(np.int32), G, 0), np.repeat(mask, G, 0)


def _sample(params, groups, **kw):
  kw = {"max_new_tokens": N, "eos_id": None, "pad_id": PAD, "temperature": 1.0, **kw}
  return generate(CFG, params, *groups, jax.random.PRNGKey(1), **kw)


@pytest.fixture(scope="module")
def per_row(params, groups):
  return _sample(params, groups)


# ----------------------------------------------------------------------------
# Shared prefill
# ----------------------------------------------------------------------------

def test_shared_prefill_equals_per_row_prefill(params, groups, per_row):
  shared = _sample(params, groups, group_size=G)
  np.testing.assert_array_equal(np.asarray(shared.tokens_BN), np.asarray(per_row.tokens_BN))
  np.testing.assert_allclose(shared.logprobs_BN, per_row.logprobs_BN, atol=1e-5, rtol=0)
  for name in ("mask_BN", "lengths_B", "sequences_BS", "sequence_mask_BS"):
    np.testing.assert_array_equal(np.asarray(getattr(shared, name)),
                                  np.asarray(getattr(per_row, name)), err_msg=name)
  # The noise is per row: the G samples of one prompt differ from each other.
  toks = np.asarray(shared.tokens_BN)
  assert all(len({tuple(r) for r in toks[i:i + G]}) > 1 for i in range(0, len(toks), G))


def test_shared_prefill_greedy_with_stop_ids(params, groups):
  free = np.asarray(_sample(params, groups, greedy=True).tokens_BN)
  eos = tuple(int(t) for t in set(free[:, 2]))            # every row stops at step 2
  a = _sample(params, groups, greedy=True, eos_id=eos)
  b = _sample(params, groups, greedy=True, eos_id=eos, group_size=G)
  np.testing.assert_array_equal(np.asarray(b.tokens_BN), np.asarray(a.tokens_BN))
  np.testing.assert_array_equal(np.asarray(b.lengths_B), np.full(len(free), 3))
  np.testing.assert_allclose(b.logprobs_BN, a.logprobs_BN, atol=1e-5, rtol=0)


@pytest.mark.parametrize("group_size,match", [
    (0, "group_size=0: expected an int >= 1"),
    (2.0, "expected an int"),
    (5, "not whole groups"),
])
def test_bad_group_size(params, groups, group_size, match):
  with pytest.raises(ValueError, match=match):
    _sample(params, groups, group_size=group_size)


def test_rows_of_a_group_must_be_equal(params, groups):
  tokens, mask = (x.copy() for x in groups)
  tokens[G + 2, -1] = (tokens[G + 2, -1] + 1) % CFG.vocab_size   # row 6 of group 1
  with pytest.raises(ValueError, match=r"row 6 differs from row 4, the first row of its "
                                       r"group 1"):
    _sample(params, (tokens, mask), group_size=G)
  tokens, mask = (x.copy() for x in groups)
  mask[G + 1, :] = 1                                  # row 5: a longer prompt (pads real)
  with pytest.raises(ValueError, match="row 5 differs from row 4"):
    _sample(params, (tokens, mask), group_size=G)
  # Padding slots may hold anything: only real tokens are compared.
  tokens, mask = (x.copy() for x in groups)
  tokens[G + 1, 0] = 9                                # a pad slot (prompt 1 has 3 tokens)
  sampling._validate_groups(jnp.asarray(tokens), mask, G)


def test_rollout_generates_whole_groups_with_shared_prefill(params, groups, monkeypatch):
  """generate_rollout passes group_size=G when its generation micro-batch holds whole
  groups (else 1), and its rollouts are the same either way."""
  assert rollout.generate_group_size(4, 8, 32) == 4
  assert rollout.generate_group_size(4, 64, 32) == 4        # one call of all 32 rows
  assert rollout.generate_group_size(4, 6, 24) == 1         # calls would split groups
  assert rollout.generate_group_size(1, 3, 9) == 1

  class Tok:
    pad_id, eos_id = PAD, 1

    def decode(self, ids):
      return " ".join(map(str, ids))

  seen = []
  real_generate = sampling.generate

  def spy(*a, **kw):
    seen.append(kw["group_size"])
    return real_generate(*a, **kw)
  monkeypatch.setattr(sampling, "generate", spy)
  tokens, mask = groups
  cfg = types.SimpleNamespace(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=N,
                              generate_micro_batch=len(tokens), logprob_micro_batch=len(tokens))

  def run():
    return rollout.generate_rollout(
        model_config=CFG, params=params, ref_params=None, prompt_tokens_NP=tokens[::G],
        prompt_mask_NP=mask[::G], group_size=G, rng=jax.random.PRNGKey(5), rollout_cfg=cfg,
        tokenizer=Tok(), reward_fn=lambda p, t, m: (np.zeros(len(t)), {}), metadata={},
        need_ref=False, need_old=False)
  shared = run()
  monkeypatch.setattr(rollout, "generate_group_size", lambda g, micro, rows: 1)
  plain = run()
  assert seen == [G, 1]
  np.testing.assert_array_equal(shared.sequences_BS, plain.sequences_BS)
  np.testing.assert_array_equal(shared.completion_mask_BC, plain.completion_mask_BC)
  np.testing.assert_allclose(shared.sample_logps_BC, plain.sample_logps_BC, atol=1e-5, rtol=0)
  assert shared.texts == plain.texts


# ----------------------------------------------------------------------------
# KV-cache dtype
# ----------------------------------------------------------------------------

def test_kv_cache_dtype_resolution(monkeypatch):
  resolve = sampling.resolve_kv_cache_dtype
  bf16 = ModelConfig(**{**CFG.to_dict(), "dtype": "bfloat16"})
  assert jax.default_backend() == "cpu"
  assert resolve(CFG) == "float32"                   # CPU: the compute dtype, unchanged
  assert resolve(bf16) == "bfloat16"
  assert resolve(CFG, "bfloat16") == resolve(CFG, jnp.bfloat16) == "bfloat16"
  assert resolve(bf16, "float32") == "float32"
  for backend in ("gpu", "tpu"):
    monkeypatch.setattr(jax, "default_backend", lambda b=backend: b)
    assert resolve(CFG) == "bfloat16"
    assert resolve(ModelConfig(**{**CFG.to_dict(), "dtype": "float16"})) == "float16"
  with pytest.raises(ValueError, match="kv_cache_dtype='int8': expected one of auto"):
    resolve(CFG, "int8")


def test_bfloat16_cache_decodes_like_float32(params, groups):
  """A bf16 cache under a float32 model: the same greedy tokens as the float32 cache on
  this peaked model (its logits reach |z| ~ 50, so the bf16 rounding of K/V (2^-9 relative)
  moves log-probs by up to ~0.05), and the cache really is bf16."""
  tokens, mask = groups[0][::G], groups[1][::G]
  kw = dict(max_new_tokens=N, greedy=True, eos_id=None, pad_id=PAD)
  f32 = generate(CFG, params, tokens, mask, jax.random.PRNGKey(0), **kw)
  bf16 = generate(CFG, params, tokens, mask, jax.random.PRNGKey(0), kv_cache_dtype="bfloat16",
                  **kw)
  np.testing.assert_array_equal(np.asarray(bf16.tokens_BN), np.asarray(f32.tokens_BN))
  diff = np.abs(np.asarray(bf16.logprobs_BN) - np.asarray(f32.logprobs_BN))
  assert diff.max() < 0.1 and diff.mean() < 0.02, diff
  assert bf16.logprobs_BN.dtype == jnp.float32
  S = P + N - 1
  lowered = sampling._generate.lower(
      CFG, params, jnp.asarray(tokens), jnp.asarray(mask), jax.random.PRNGKey(0),
      jnp.float32(1.0), jnp.float32(1.0), max_new_tokens=N, top_k=0, use_top_p=False,
      greedy=True, eos_ids=(), pad_id=PAD, group_size=1, kv_cache_dtype="bfloat16").as_text()
  cache_type = f"{CFG.n_layers}x{len(tokens)}x{S}x{CFG.n_kv_heads}x{CFG.head_dim}x"
  assert cache_type + "bf16>" in lowered and cache_type + "f32>" not in lowered


# ----------------------------------------------------------------------------
# Sharded KV cache (8 simulated devices, own process)
# ----------------------------------------------------------------------------

def test_fitted_spec_splits_only_what_divides():
  mesh = types.SimpleNamespace(shape={"data": 2, "fsdp": 2, "tensor": 2})
  spec = lambda shape: tuple(parallel.fitted_spec(mesh, parallel.KV_CACHE_AXES, shape))
  assert spec((2, 8, 12, 2, 8)) == (None, ("data", "fsdp"), None, "tensor", None)
  assert spec((2, 2, 12, 2, 8)) == (None, "data", None, "tensor", None)
  assert spec((2, 3, 12, 1, 8)) == (None, None, None, None, None)
  with pytest.raises(ValueError, match="do not match shape"):
    spec((2, 8, 12))


def test_no_mesh_without_sharded_params(params):
  assert parallel.mesh_of(params) is None                  # one device
  assert parallel.mesh_of({"a": np.zeros(3)}) is None       # host arrays
  mesh = parallel.make_mesh((1, 1, 1))
  placed = jax.device_put(params, parallel.replicated(mesh))
  assert parallel.mesh_of(placed) is None                   # a 1-device mesh
  with pytest.raises(ValueError, match="mesh='x'"):
    generate(CFG, params, np.ones((1, 2), np.int32), np.ones((1, 2), np.int32),
             jax.random.PRNGKey(0), max_new_tokens=2, eos_id=None, pad_id=PAD, mesh="x")


@pytest.fixture(scope="module")
def sharded():
  env = dict(os.environ, XLA_FLAGS=xla_flags(8),
             JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, os.path.join(HERE, "sharded_decode_check.py"),
                        "2,2,2", "4,1,2"], env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mesh", ["(2, 2, 2)", "(4, 1, 2)"])
@pytest.mark.parametrize("group_size", [1, 4])
def test_sharded_cache_decodes_like_one_device(sharded, mesh, group_size):
  r = sharded[f"{mesh} G={group_size}"]
  assert sharded["ref_distinct_rows_in_group"] > 1          # really sampled, per row
  assert r["tokens_equal"], r
  assert r["max_logprob_diff"] <= 1e-5, r


@pytest.mark.parametrize("mesh,rows", [("(2, 2, 2)", 2), ("(4, 1, 2)", 2)])
def test_cache_is_really_sharded(sharded, mesh, rows):
  """In the partitioned HLO of generate every KV-cache buffer is a per-device shard: 8 rows
  over data x fsdp = 4 devices (2 each), 2 kv heads over tensor = 2 (1 each); the whole
  cache (8 rows) never appears. Without the constraint XLA kept all 8 rows per device."""
  for group_size in (1, 4):
    r = sharded[f"{mesh} G={group_size}"]
    assert [2, rows, 12, 1, 8] in r["cache_shapes"], r
    assert all(b < 8 and k == 1 for _, b, _, k, _ in r["cache_shapes"]), r
    assert r["cache_spec"] == [None, ["data", "fsdp"], None, "tensor", None]
  assert [2, 8, 12, 1, 8] in sharded[f"{mesh} unconstrained"]["cache_shapes"]
  # Shared prefill runs on 2 rows (one per prompt): split as far as 2 divides.
  want = "data" if mesh == "(2, 2, 2)" else None
  assert sharded[f"{mesh} G=4"]["prefill_spec"] == [None, want, None, "tensor", None]


def test_rollout_stop_at_eos_false_runs_to_max_new_tokens(params, groups):
  """rollout.stop_at_eos=False passes no stop id: every completion has max_new_tokens
  tokens, even where the policy samples EOS (here every token is the 'EOS' of the first
  run's first completion, so stopping would have cut it short)."""
  tokens, mask = groups
  cfg = dict(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=N,
             generate_micro_batch=len(tokens), logprob_micro_batch=len(tokens))

  def run(eos, **knobs):
    class Tok:
      pad_id, eos_id = PAD, eos

      def decode(self, ids):
        return " ".join(map(str, ids))
    return rollout.generate_rollout(
        model_config=CFG, params=params, ref_params=None, prompt_tokens_NP=tokens[::G],
        prompt_mask_NP=mask[::G], group_size=G, rng=jax.random.PRNGKey(5),
        rollout_cfg=types.SimpleNamespace(**cfg, **knobs), tokenizer=Tok(),
        reward_fn=lambda p, t, m: (np.zeros(len(t)), {}), metadata={}, need_ref=False,
        need_old=False)
  free = run(eos=None)
  P = free.prompt_len
  eos = int(free.sequences_BS[0, P + 1])  # a token sampled mid-completion
  stopped = run(eos=eos)
  assert stopped.lengths_B.min() < N  # with EOS stopping that row ends early
  full = run(eos=eos, stop_at_eos=False)
  assert (full.lengths_B == N).all() and full.completion_mask_BC.all()
  np.testing.assert_array_equal(full.sequences_BS, free.sequences_BS)  # same samples
