"""Memory features: remat policies (same numbers, less saved), the analytic estimate
against what JAX saves and XLA compiles, FSDP sharding of the train state, and
optimizer-state offload to host memory."""
import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.ad_checkpoint import saved_residuals  # not exported; jax is pinned

from conftest import xla_flags
from rlhf_jax import memory, memory_offload, parallel
from rlhf_jax.losses.logprobs import shift_for_next_token, token_logprobs
from rlhf_jax.losses.sft import sft_loss_sums
from rlhf_jax.models import ModelConfig, Transformer, init_params
from rlhf_jax.models.transformer import REMAT_POLICIES
from rlhf_jax import workdir as workdir_lib
from rlhf_jax.trainers import optim
from rlhf_jax.trainers import state as state_lib
from rlhf_jax.trainers import step as step_lib

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                   head_dim=8, d_ff=64, tie_embeddings=False)


def tiny_loss(policy, tokens):
  cfg = dataclasses.replace(TINY, remat_policy=policy)

  def loss(p):
    logits, _ = Transformer(cfg).apply({"params": p}, tokens)
    return -token_logprobs(logits[:, :-1], tokens[:, 1:]).mean()
  return loss


TOKENS = np.random.default_rng(0).integers(0, TINY.vocab_size, (4, 24))


def test_every_remat_policy_gives_the_same_loss_and_gradients():
  params = init_params(TINY, jax.random.PRNGKey(0))
  tokens = jnp.asarray(TOKENS)
  # One jit for all policies (one compilation); each policy is its own jax.checkpoint.
  all_grads = jax.jit(lambda p: {policy: jax.value_and_grad(tiny_loss(policy, tokens))(p)
                                 for policy in REMAT_POLICIES})(params)
  loss0, grads0 = all_grads["none"]
  for policy in REMAT_POLICIES[1:]:
    loss, grads = all_grads[policy]
    assert float(loss) == float(loss0), policy  # the forward pass is the same computation
    for (path, g), g0 in zip(jax.tree_util.tree_leaves_with_path(grads),
                             jax.tree.leaves(grads0)):
      # recomputation may re-associate float32 sums: ~1e-8 here
      np.testing.assert_allclose(g, g0, rtol=1e-5, atol=1e-7, err_msg=f"{policy} {path}")


def test_remat_lowers_compiled_temp_memory():
  """XLA keeps the rematerialisation (no CSE back to the saved activations)."""
  params = jax.eval_shape(lambda: init_params(TINY, jax.random.PRNGKey(0)))
  tokens = jnp.asarray(TOKENS)
  temp = {policy: jax.jit(jax.value_and_grad(tiny_loss(policy, tokens))).lower(params)
          .compile().memory_analysis().temp_size_in_bytes for policy in ("none", "full")}
  assert temp["full"] < 0.6 * temp["none"], temp


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_saved_activations_per_layer_match_the_formula(dtype):
  """What JAX keeps for the backward pass, per layer and token, is the formula's count."""
  B, T = 2, 16
  m = ModelConfig(vocab_size=64, d_model=64, n_layers=1, n_heads=4, n_kv_heads=2,
                  head_dim=16, d_ff=96, dtype=dtype)

  def saved(policy, layers):
    cfg = dataclasses.replace(m, remat_policy=policy, n_layers=layers)
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
    tokens = jnp.zeros((B, T), jnp.int32)
    res = saved_residuals(lambda p: Transformer(cfg).apply({"params": p}, tokens)[0].sum(),
                          params)
    return sum(a.size * a.dtype.itemsize for a, why in res if "from the argument" not in why)

  counted = {}
  for policy in REMAT_POLICIES:
    per_layer = saved(policy, 3) - saved(policy, 2)
    if policy == "none" and dtype == "bfloat16":
      per_layer -= 2 * memory.layer_params(m)  # the layer's bf16 weight copies
    counted[policy] = per_layer / (B * T)
    formula = memory.saved_bytes_per_token_layer(m, policy, seq_len=T)
    assert counted[policy] == pytest.approx(formula, rel=0.02 if policy == "none" else 0), (
        policy, counted[policy], formula)
  assert (counted["full"] < counted["qkv_proj"] < counted["dots_no_batch"] < counted["dots"]
          < counted["none"])


def test_estimate_is_close_to_the_compiled_train_step():
  """memory.train_step_bytes vs XLA's peak (arguments + temporaries) of a real AdamW step:
  an upper bound, within 35%."""
  m = ModelConfig(vocab_size=512, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2,
                  head_dim=16, d_ff=192)
  B, T = 8, 64
  tx, _ = optim.make_optimizer(common_opt(), 10)
  for policy in ("full",):  # "none"'s activations: test_saved_activations_per_layer_...
    cfg = dataclasses.replace(m, remat_policy=policy)
    model = Transformer(cfg)

    def step(state, batch):
      def loss(p):
        logits, _ = model.apply({"params": p}, batch["tokens"])
        return sft_loss_sums(*shift_for_next_token(logits, batch["tokens"], batch["mask"]))
      (nll, n), grads = jax.value_and_grad(loss, has_aux=True)(state["params"])
      return step_lib.apply_gradients(state, jax.tree.map(lambda g: g / n, grads), tx)

    params = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
    state = jax.eval_shape(lambda p: {"step": jnp.zeros((), jnp.int32), "params": p,
                                      "opt_state": tx.init(p)}, params)
    batch = {k: jax.ShapeDtypeStruct((B, T), jnp.int32) for k in ("tokens", "mask")}
    ma = jax.jit(step, donate_argnums=0).lower(state, batch).compile().memory_analysis()
    measured = ma.argument_size_in_bytes + ma.temp_size_in_bytes
    est = memory.train_step_bytes(cfg, rows=B, seq_len=T)["total"]
    # The estimate is a planning bound: never below XLA's figure, at most 35% above it
    # (its 12 V bytes/token of float32 logits buffers are an upper bound; XLA:CPU fuses
    # the log-softmax into the 2-D unembedding and shares small buffers).
    assert measured <= est <= 1.35 * measured, (policy, est, measured)


def common_opt():
  from ml_collections import ConfigDict
  return ConfigDict(dict(lr=1e-3, warmup_steps=0, final_lr_ratio=1.0, b1=0.9, b2=0.95,
                         eps=1e-8, weight_decay=0.01, grad_clip_norm=1.0))


def test_old_model_config_without_remat_policy_loads():
  old = {k: v for k, v in TINY.to_dict().items() if k != "remat_policy"}
  assert ModelConfig.from_dict({**old, "remat": True}).resolved_remat_policy == "full"
  assert ModelConfig.from_dict({**old, "remat": False}).resolved_remat_policy == "none"
  assert ModelConfig.from_dict({**old, "remat": False,
                                "remat_policy": "dots"}).resolved_remat_policy == "dots"
  with pytest.raises(ValueError, match=r"model.remat_policy='all'.*dots_no_batch"):
    ModelConfig.from_dict({**old, "remat_policy": "all"})


def test_fsdp_shards_params_and_adam_state_eightfold():
  env = dict(os.environ, XLA_FLAGS=xla_flags(8),
             JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, os.path.join(HERE, "fsdp_memory_check.py")], env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  r = json.loads(out.stdout.strip().splitlines()[-1])
  dp, fsdp = r["(8, 1, 1)"], r["(1, 8, 1)"]
  assert dp["params"] == dp["total_params_bytes"]  # data parallel: every device has all
  assert dp["opt_state"] >= 2 * dp["params"]  # AdamW mu and nu
  for key in ("params", "opt_state"):
    ratio = fsdp[key] / dp[key]
    assert 1 / 8 <= ratio < 1 / 8 + 0.01, (key, ratio)  # only norm scales, counters replicated


def test_offloaded_optimizer_state_lives_in_host_memory_and_changes_nothing():
  # The model's real parameter tree, shardings and AdamW state; a cheap stand-in loss
  # (the mechanism does not look at the loss, and compiling a model twice costs ~15 s).
  model = Transformer(TINY)
  tx, _ = optim.make_optimizer(common_opt(), 10)
  mesh = parallel.make_mesh((1, 1, 1), jax.devices()[:1])
  state, shardings = state_lib.create_state(
      lambda r: model.init(r, jnp.zeros((1, 2), jnp.int32))["params"], tx, mesh,
      jax.random.PRNGKey(0))

  def step(state, x):
    loss = lambda p: sum(jnp.sum(jnp.sin(w * x) ** 2) for w in jax.tree.leaves(p))
    value, grads = jax.value_and_grad(loss)(state["params"])
    return step_lib.apply_gradients(state, grads, tx), value

  x = jnp.float32(1.5)
  ref_state, ref_loss = jax.jit(step)(state, x)
  off = memory_offload.offload_opt_state(shardings)
  compiled = jax.jit(memory_offload.with_offloaded_opt_state(step, shardings),
                     in_shardings=(off, None), out_shardings=(off, None)).lower(
                         jax.device_put(state, off), x).compile()
  new_state, loss = compiled(jax.device_put(state, off), x)
  assert float(loss) == float(ref_loss)
  for a, b in zip(jax.tree.leaves(new_state), jax.tree.leaves(ref_state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert np.abs(np.asarray(new_state["params"]["embed"]["embedding"])
                - np.asarray(state["params"]["embed"]["embedding"])).max() > 0
  kinds = {x.sharding.memory_kind for x in jax.tree.leaves(new_state["opt_state"])}
  assert kinds == {"pinned_host"}
  assert new_state["params"]["embed"]["embedding"].sharding.memory_kind == "device"
  # XLA's entry layout puts every optimizer-state buffer in the host memory space S(5).
  n_opt = len(jax.tree.leaves(state["opt_state"]))
  header = compiled.as_text().split("entry_computation_layout={")[1].split("->")[0]
  assert header.count("S(5)") == n_opt


def test_init_from_keeps_the_configs_remat_policy(tmp_path):
  """config.model.remat_policy reaches the model when starting from a workdir or an HF dir
  (both carry their own model_config; dtype / remat / remat_policy are run-time fields)."""
  from rlhf_jax.models import save_pretrained
  cfg = ModelConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1,
                    head_dim=8, d_ff=32)
  params = jax.tree.map(np.asarray, init_params(cfg, jax.random.PRNGKey(0)))
  save_pretrained(cfg, params, tmp_path / "hf")
  mcfg, _ = workdir_lib.load_init(str(tmp_path / "hf"), "float32", False, "dots_no_batch")
  assert mcfg.remat_policy == "dots_no_batch" and mcfg.d_model == 16


def _laptop(trainer, **rollout):
  from rlhf_jax.launch import load_config
  c = load_config(os.path.join(os.path.dirname(HERE), "configs", f"{trainer}.py:smollm2_laptop"))
  c.tokenizer.vocab_size = c.model.vocab_size
  c.rollout.update(rollout)
  return c


@pytest.mark.parametrize("trainer", ["grpo", "ppo"])
def test_cpu_estimate_is_the_process_peak_and_follows_donation(trainer):
  """memory_plan on a CPU: the largest phase + the runtime + the loaded weights' host copy;
  the online-RL update donates its state unless the rollout pipeline runs."""
  from rlhf_jax import memory_plan
  from rlhf_jax.config import model_config
  c = _laptop(trainer)
  n = memory.num_params(model_config(c, vocab_size=c.tokenizer.vocab_size))
  n_trained = n * (2 if trainer == "ppo" else 1)  # PPO: a separate critic of the same shape
  e = memory_plan.config_estimate(c, 1, platform="cpu")
  phases = max(e["train_step"], e["generate"], e["logprob_pass"])
  assert e["runtime"] == memory_plan.CPU_RUNTIME_BYTES and e["host_weights"] == 0.0
  assert e["total"] == phases + memory_plan.CPU_RUNTIME_BYTES
  assert e["state_copy"] == 0.0 and e["update"] == 12 * n_trained  # donated
  c.init_from = "SmolLM2-135M-Instruct.Q4_1.gguf"  # pretrained: + their float32 host copy
  e2 = memory_plan.config_estimate(c, 1, platform="cpu")
  assert e2["host_weights"] == 4 * n and e2["total"] == e["total"] + 4 * n
  tpu = memory_plan.config_estimate(c, 1, platform="tpu")  # an accelerator: arrays only
  assert "runtime" not in tpu and tpu["total"] == max(tpu["train_step"], tpu["generate"],
                                                      tpu["logprob_pass"])
  piped = memory_plan.config_estimate(_laptop(trainer, max_staleness=1), 1, platform="cpu")
  assert piped["state_copy"] == 12 * n_trained and piped["update"] == 0.0  # not donated
  assert piped["train_step"] > e["train_step"]


def test_peak_memory_reads_rss_and_the_devices_that_report_it():
  from rlhf_jax import metrics as metrics_lib

  class Dev:
    def __init__(self, stats):
      self.stats = stats

    def memory_stats(self):
      return self.stats
  import resource
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin"
                                                              else 1024)
  host = metrics_lib.peak_memory([Dev(None)])  # XLA:CPU reports nothing
  assert host == {"host_rss": pytest.approx(rss, rel=0.5)} and host["host_rss"] > 1e7
  assert metrics_lib.peak_memory_line({"host_rss": 4.85e9}) == "peak memory: host RSS 4.85 GB"
  dev = metrics_lib.peak_memory([Dev({"peak_bytes_in_use": 3e9}), Dev({"bytes_in_use": 1}),
                                 Dev({"peak_bytes_in_use": 5e9})])
  assert dev["device_peak"] == 5e9
  assert metrics_lib.peak_memory_line(dev).endswith(
      ", device 5.00 GB (largest peak_bytes_in_use)")
