"""The analytic memory model (rlhf_jax/memory.py) against XLA's compiled memory of the real
steps (rlhf_jax/memory_aot.py: compiled from abstract inputs, nothing allocated), per
attention backend and with log-probs whole or chunked; and the GRPO gsm8k preset at
4096 new tokens on v5e-8."""
import dataclasses
import os

import jax
import jax.numpy as jnp
import pytest
from jax._src.ad_checkpoint import saved_residuals  # not exported; jax is pinned

from rlhf_jax import memory, memory_aot, memory_plan
from rlhf_jax.launch import load_config
from rlhf_jax.models import ModelConfig, Transformer, init_params
from rlhf_jax.models.transformer import REMAT_POLICIES

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Small enough to compile in seconds, large enough that attention and logits matter:
# per token, dense attention keeps (4 + 4) H S + 8 H S = 32 KiB in the layer being
# recomputed and differentiated, the logits 8 V = 16 KiB. float32: XLA:CPU computes bf16
# through float32 copies (docs/memory.md). T = one 512-block of the chunked backend
# (see test_chunked_attention_keeps_no_quadratic_scratch_under_the_layer_scan).
SMALL = ModelConfig(vocab_size=2048, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2,
                    head_dim=32, d_ff=384, max_seq_len=1024, remat_policy="full")
ROWS, T = 4, 512


def _within(est, measured, tol=0.35):
  return (1 - tol) * measured <= est <= (1 + tol) * measured


def _lc_param(chunk):
  marks = ()
  if chunk and not memory_aot.logits_chunk_supported():
    marks = pytest.mark.skip(reason="the trainers do not read model.logits_chunk yet")
  return pytest.param(chunk, marks=marks, id=f"logits_chunk={chunk}")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_saved_activations_with_chunked_attention_match_the_formula(dtype):
  """What JAX keeps per layer and token under the chunked backend (its custom VJP's
  residuals instead of the [T, S] scores): the formula's count (test_memory.py does the
  same for dense)."""
  B, T = 2, 32
  m = ModelConfig(vocab_size=64, d_model=64, n_layers=1, n_heads=4, n_kv_heads=2,
                  head_dim=16, d_ff=96, dtype=dtype, attention="chunked")

  def saved(policy, layers):
    cfg = dataclasses.replace(m, remat_policy=policy, n_layers=layers)
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
    tokens = jnp.zeros((B, T), jnp.int32)
    res = saved_residuals(lambda p: Transformer(cfg).apply({"params": p}, tokens)[0].sum(),
                          params)
    return sum(a.size * a.dtype.itemsize for a, why in res if "from the argument" not in why)

  for policy in REMAT_POLICIES:
    per_layer = saved(policy, 3) - saved(policy, 2)
    if policy == "none" and dtype == "bfloat16":
      per_layer -= 2 * memory.layer_params(m)  # the layer's bf16 weight copies
    formula = memory.saved_bytes_per_token_layer(m, policy, seq_len=T, attention="chunked")
    # dots: the per-block scores are saved like dense's (+ a bf16 copy: within 10%)
    rel = {"none": 0.02, "dots": 0.1}.get(policy, 0)
    assert per_layer / (B * T) == pytest.approx(formula, rel=rel), (policy, formula)
  dense = memory.saved_bytes_per_token_layer(m, "none", 4096, attention="dense")
  assert memory.saved_bytes_per_token_layer(m, "none", 4096, attention="chunked") < dense / 10


@pytest.mark.parametrize("logits_chunk", [_lc_param(0), _lc_param(256)])
@pytest.mark.parametrize("attention", ["dense", "chunked"])
def test_sft_step_estimate_agrees_with_compiled(attention, logits_chunk):
  m = dataclasses.replace(SMALL, attention=attention, logits_chunk=logits_chunk)
  measured = memory_aot.sft_step(m, ROWS, T).peak
  est = memory.train_step_bytes(m, rows=ROWS, seq_len=T, platform="cpu")["total"]
  est += 3 * 4 * ROWS * T  # the batch
  assert _within(est, measured), (est / 2**20, measured / 2**20)


# Issue #20: the Gemma 2 / 3 features at SMALL's size -- sandwich norms, QK-norm, GeGLU,
# local / global layers with a window shorter than T, attention and final logit soft-caps.
SMALL_GEMMA = dataclasses.replace(
    SMALL, norm_offset=1.0, embed_scale=True, activation="gelu_tanh", post_norms=True,
    qk_norm=True, sliding_window=128, window_pattern="LG", rope_local_theta=1e4,
    attn_softcap=50.0, final_softcap=30.0)


@pytest.mark.parametrize("attention", ["dense", "chunked"])
def test_gemma_sft_step_estimate_agrees_with_compiled(attention):
  """Within 15% (1.06 dense, 0.96 chunked on 2026-12-04): the attention soft-cap's extra
  float32 scores (dense: 4 H S per token; chunked: a third block tile) are counted;
  without them the estimate was 0.92 / 0.83 of the compiled peak."""
  m = dataclasses.replace(SMALL_GEMMA, attention=attention)
  measured = memory_aot.sft_step(m, ROWS, T).peak
  est = memory.train_step_bytes(m, rows=ROWS, seq_len=T, platform="cpu")["total"]
  est += 3 * 4 * ROWS * T  # the batch
  assert _within(est, measured, tol=0.15), (est / 2**20, measured / 2**20)


@pytest.mark.parametrize("donate", [True, False], ids=["donated", "undonated"])
def test_grpo_update_estimate_agrees_with_compiled(donate):
  """The GRPO update: completions-only logits; the state donated (synchronous rollouts:
  the new state written over the old) or not (the rollout pipeline: a second copy)."""
  m = dataclasses.replace(SMALL, attention="chunked")
  P = 128
  c = memory_aot.grpo_update(m, ROWS, P, T - P, donate=donate)
  assert c.out >= 12 * memory.num_params(m)  # the new state: over the old one, or beside it
  assert c.alias >= 12 * memory.num_params(m) if donate else c.alias == 0
  est = memory.train_step_bytes(m, rows=ROWS, seq_len=T, logit_tokens=ROWS * (T - P),
                                donated=donate, platform="cpu")["total"]
  est += ROWS * (8 * T + 16 * (T - P))  # the batch
  assert _within(est, c.peak), (est / 2**20, c.peak / 2**20)


def test_chunked_attention_keeps_no_quadratic_scratch_under_the_layer_scan():
  T2 = 2048  # 4 x 4 blocks of 512
  temp = {}
  for att in ("dense", "chunked"):
    m = dataclasses.replace(SMALL, attention=att, max_seq_len=T2, vocab_size=256)
    temp[att] = memory_aot.sft_step(m, 1, T2).temp
  assert temp["chunked"] < 0.5 * temp["dense"], temp


def test_memory_model_follows_the_attention_backend_and_logits_chunk():
  m = memory_aot.preset_model("llama3_2_1b", max_seq_len=32768)
  dense = memory.train_step_bytes(m, rows=1, seq_len=32768, attention="dense")
  chunked = memory.train_step_bytes(m, rows=1, seq_len=32768, attention="chunked")
  assert dense["activations"] > 20 * chunked["activations"]  # (4 + c) H S vs O(1) per token
  lc = memory.train_step_bytes(dataclasses.replace(m, logits_chunk=1024), rows=1,
                               seq_len=32768, attention="chunked")
  assert lc["logits"] == chunked["logits"] * 1024 / 32768  # one [rows, C, V] chunk
  # "auto" resolves per platform as the model does: splash on TPU, dense on CPU <= 2048.
  assert memory.attention_backend(m, "causal", 4096, "tpu") == "splash"
  assert memory.attention_backend(m, "causal", 2048, "cpu") == "dense"
  assert memory.attention_backend(m, "causal", 4096, "cpu") == "chunked"


def gsm8k_4096():
  c = load_config(f"{REPO}/configs/grpo.py:gsm8k")
  c.rollout.max_new_tokens = 4096
  c.model.max_seq_len = c.data.max_prompt_len + 4096
  return c


def test_gsm8k_preset_with_4096_new_tokens_fits_v5e_8():
  c = gsm8k_4096()
  ok, est, budget = memory_plan.fits(c, "v5e-8")
  assert ok, (est / 2**30, budget / 2**30)
  e = memory_plan.config_estimate(c, 8, platform="tpu")
  assert e["total"] == max(e["train_step"], e["generate"], e["logprob_pass"])
