"""A trainer config on an accelerator slice -> its per-device memory estimate; `fits`.

The hardware presets (`HARDWARE`: devices, HBM, hosts, default mesh, platform; defined
in rlhf_jax/hardware.py, re-exported here), the planning headroom, and
`config_estimate`: the largest phase of a trainer's step (train step; for online RL also
the sampler and the no-grad log-prob passes) from the formulas of `rlhf_jax.memory`.

On a CPU (platform="cpu") the arrays live in the process's own memory, so the estimate is
of its peak resident set: the largest phase plus `CPU_RUNTIME_BYTES` (Python, jaxlib and
XLA:CPU, the compiled programs, the data pipeline: what a run holds before its weights
load) and, for a run that starts from pretrained weights (`config.init_from`), their host
copy as loaded (4 bytes a parameter: freed once the train state is built, but the pages
stay with the process under the malloc settings `rlhf-jax` applies, `rlhf_jax.allocator`).
Measured on SmolLM2-135M (README "Run a real model on your laptop"): GRPO 4.9 GB estimated
/ 4.85 GB peak RSS, PPO 8.1 / 8.0 GB.
"""
from __future__ import annotations

import math

from rlhf_jax.hardware import HARDWARE, Hardware  # noqa: F401 (re-exported)
from rlhf_jax.memory import (_activation_dtype, attention_backend, attention_scratch_bytes,
                             forward_transient_per_token, generation_phase_bytes, logits_bytes,
                             num_params, train_step_bytes)

GiB = 1024 ** 3

# A step is planned to fit when its estimate is at most this share of HBM: headroom
# for XLA's fragmentation, collective buffers, code and the runtime. (On GPUs JAX
# preallocates 75% by default: set XLA_PYTHON_CLIENT_MEM_FRACTION=0.9.)
HEADROOM = 0.8
# A CPU run's resident memory besides its arrays: Python, jaxlib / XLA:CPU, the compiled
# programs and the data pipeline (0.51-0.53 GB RSS when SmolLM2's weights start loading,
# every trainer; experiments/memory/trace_rss.py).
CPU_RUNTIME_BYTES = 0.6e9


def resolve_mesh(shape, devices: int) -> tuple[int, int, int]:
  shape = [int(s) for s in shape]
  if -1 in shape:
    known = math.prod(s for s in shape if s != -1)
    shape[shape.index(-1)] = devices // known
  return tuple(shape)


def config_estimate(config, devices: int, platform: str | None = None) -> dict[str, float]:
  """Per-device bytes of the largest phase of `config`'s trainer on `devices` devices of
  `platform` ("tpu", "gpu", "cpu"; None: this process's), which decides what
  model.attention="auto" runs.

  Phases: the train step (every trainer), plus for online RL the sampler (KV cache,
  prefill, sampling) and the no-grad log-prob passes; what the trainer holds throughout
  (params, AdamW state, reference copies) is counted in each phase. Keys: the train-step
  breakdown, "train_step" (its total), "kv_cache", "generate" and "logprob_pass" (those
  phases' totals, 0 for offline trainers), "total" (the largest). platform="cpu": also
  "runtime" and "host_weights" (module docstring), added to "total" (the process's peak
  resident set).
  """
  from rlhf_jax import config as config_lib
  from rlhf_jax.models.api import prefix_sharing_saves_flops
  m = config_lib.model_config(config, vocab_size=config.tokenizer.vocab_size)
  mesh = resolve_mesh(config.mesh.shape, devices)
  d, f, t = mesh
  trainer = config.trainer
  extra = 0
  if trainer in ("sft", "dpo") and config.get("eval_kl") and config.get("prompt_eval") \
      and config.prompt_eval.path:
    extra += 1  # the initial policy kept for eval_kl
  if trainer == "sft":
    rows = config.batch_size // config.grad_accum_steps
    seq = config.data.max_seq_len
    kw = dict(grad_accum=config.grad_accum_steps)
  elif trainer in ("dpo", "reward_model"):
    from rlhf_jax.losses.dpo import variant
    per_pair = len(variant(config.dpo.loss_type).sides) if trainer == "dpo" else 2
    rows = config.batch_size * per_pair
    seq = config.data.max_prompt_len + config.data.max_completion_len
    kw = dict(logits=trainer == "dpo")
    if trainer == "dpo" and not config.dpo.precompute_reference:
      extra += 1
    if trainer == "dpo" and per_pair == 2 and config.dpo.get("share_prompt", True) \
        and prefix_sharing_saves_flops(m, config.data.max_prompt_len,
                                       config.data.max_completion_len, 2):
      kw.update(mask_kind="shared_prefix",  # packed [prompt | chosen | rejected]
                logit_tokens=rows * config.data.max_completion_len)
  elif trainer in ("grpo", "ppo"):
    r = config.rollout
    minibatches = config[trainer].minibatches
    rows = r.train_micro_batch or r.prompts_per_step * r.group_size // minibatches
    P = config.data.max_prompt_len
    seq = P + r.max_new_tokens
    extra += 1  # the reference policy
    # The update donates its state with synchronous rollouts; with the rollout pipeline
    # (a sampler thread may read the parameters) the new state comes beside the old one.
    from rlhf_jax.rollout_pipeline import enabled as pipelined
    kw = dict(trained_models=2 if trainer == "ppo" and config.ppo.critic == "separate" else 1,
              logit_tokens=rows * r.max_new_tokens, donated=not pipelined(config))
    G, W = r.group_size, r.max_new_tokens
    if (trainer == "grpo" and G > 1 and config.grpo.get("share_prompt", True)
        and r.prompts_per_step % minibatches == 0 and rows % G == 0
        and prefix_sharing_saves_flops(m, P, W, G)):
      rows, seq = rows // G, P + G * W  # a group's completions packed after one prompt
      kw["mask_kind"] = "shared_prefix"
  else:
    raise ValueError(f"config.trainer={trainer!r}: no memory model")
  out = train_step_bytes(m, rows=rows, seq_len=seq, mesh=mesh, extra_param_copies=extra,
                         platform=platform, **kw)
  out["train_step"] = out["total"]
  out["kv_cache"] = out["generate"] = out["logprob_pass"] = 0.0
  if trainer in ("grpo", "ppo"):
    static = out["params"] + out["adam"] + out["extra_params"]
    from rlhf_jax.rollout import generate_group_size
    B = r.prompts_per_step * r.group_size
    gen = generation_phase_bytes(
        m, rows=min(r.generate_micro_batch, B), prompt_len=P, length=seq, mesh=mesh,
        platform=platform, group_size=generate_group_size(r.group_size, r.generate_micro_batch, B))
    lp_rows = r.logprob_micro_batch / (d * f)
    backend = attention_backend(m, "causal", seq, platform)
    act = _activation_dtype(m.dtype, platform)
    logprob = (lp_rows * seq * forward_transient_per_token(m, seq, backend, t, act)
               + logits_bytes(m, lp_rows, r.max_new_tokens, t, grad=False)
               + attention_scratch_bytes(m, lp_rows, seq, backend, t))
    out["kv_cache"] = gen["kv_cache"]
    out["generate"] = static + gen["total"]
    out["logprob_pass"] = static + logprob
    out["total"] = max(out["train_step"], out["generate"], out["logprob_pass"])
  if (platform or _default_platform()) == "cpu":
    out["runtime"] = CPU_RUNTIME_BYTES
    out["host_weights"] = 4.0 * num_params(m) if config.get("init_from") else 0.0
    out["total"] += out["runtime"] + out["host_weights"]
  return out


def _default_platform() -> str:
  import jax
  return jax.devices()[0].platform


def fits(config, hardware: str | Hardware) -> tuple[bool, float, float]:
  """(fits, estimated bytes per device, budget = HEADROOM x HBM) for `config` on `hardware`
  (its platform decides what model.attention="auto" runs)."""
  hw = HARDWARE[hardware] if isinstance(hardware, str) else hardware
  est = config_estimate(config, hw.devices, platform=hw.platform)["total"]
  budget = HEADROOM * hw.hbm_bytes
  return est <= budget, est, budget
