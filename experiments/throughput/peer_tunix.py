"""Tunix (JAX) side of the peer throughput harness (issue #7).

Runs in the Tunix peer venv (`.peers/tunix/bin/python`, made by setup_peers.sh), never
in the project venv:

  .peers/tunix/bin/python experiments/throughput/peer_tunix.py --workload=sft [--steps=10]
      [--warmup=3] [--out=result.json]

Does exactly the work of `spec.py` with Tunix's own trainers: `PeftTrainer` (full
fine-tuning, no LoRA) for SFT, `DPOTrainer` for DPO and `GRPOLearner` on an `RLCluster`
(vanilla rollout engine, actor / reference / rollout colocated on the one CPU device)
for GRPO, on Tunix's own `Llama3` model class at the spec with random init. Random token
ids; optax AdamW lr 1e-5 constant behind a global-norm clip of 1.0; fp32; no eval,
checkpoints or metric backends. Timing by wall clock around Tunix's own step boundaries
(training hooks for SFT / DPO, the learner's global step for GRPO); the median over the
timed steps (after warm-up) is reported. One JSON line on stdout (prefixed
`PEER_RESULT `) and --out.
"""

import os
import platform
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("WANDB_MODE", "disabled")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import spec  # noqa: E402  (plain-python spec shared with our suite)

PAD, BOS, EOS, UNK = 0, 1, 2, 3   # special ids; data ids are uniform over [FIRST_DATA_ID, vocab)
FIRST_DATA_ID = 4


class IdTokenizer:
  """The minimal tokenizer interface Tunix accepts (encode / decode / bos_id / eos_id /
  pad_id): a prompt is its token ids written as decimal words, so tokenisation is a
  split and costs next to nothing. No BOS is prepended (bos_id() is None), so a prompt of
  P ids stays P tokens."""

  def encode(self, text, **kw):
    return [int(t) for t in text.split()]

  def decode(self, ids, **kw):
    return " ".join(str(int(i)) for i in ids)

  def bos_id(self):
    return None

  def eos_id(self):
    return EOS

  def pad_id(self):
    return PAD


def build_model(seed):
  """Tunix's Llama3 at the spec, every weight matrix redrawn N(0, 0.02) (Tunix's own init
  leaves the MLP kernels at zero, which would make gradients degenerate), norms at one."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from tunix.models.llama3 import model as llama
  m = spec.MODEL
  cfg = llama.ModelConfig(
      num_layers=m["n_layers"], vocab_size=m["vocab_size"], embed_dim=m["d_model"],
      hidden_dim=m["d_ff"], num_heads=m["n_heads"], head_dim=m["head_dim"],
      num_kv_heads=m["n_kv_heads"], rope_theta=int(m["rope_theta"]), norm_eps=m["norm_eps"],
      weight_tying=m["tie_embeddings"])
  model = llama.Llama3(cfg, rngs=nnx.Rngs(params=seed))
  state = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  new = [0.02 * jax.random.normal(k, x.shape, jnp.float32) if x.ndim >= 2 else jnp.ones_like(x)
         for k, x in zip(keys, leaves)]
  nnx.update(model, jax.tree.unflatten(treedef, new))
  n = sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  if n != spec.num_params():
    raise SystemExit(f"model has {n} parameters, spec says {spec.num_params()}")
  dtypes = sorted({str(x.dtype) for x in jax.tree.leaves(nnx.state(model, nnx.Param))})
  return model, cfg, n, dtypes


def clone(model):
  from flax import nnx
  return nnx.clone(model)


def optimizer():
  import optax
  o = spec.OPTIMIZER
  return optax.chain(
      optax.clip_by_global_norm(o["grad_clip_norm"]),
      optax.adamw(learning_rate=o["lr"], b1=o["b1"], b2=o["b2"], eps=o["eps"],
                  weight_decay=o["weight_decay"]))


class Hooks:
  """tunix.sft.hooks.TrainingHooks that record when each train step has finished.

  PeftTrainer dispatches steps asynchronously (up to `max_inflight_computations` in
  flight) and reports step k through `on_train_step_end` only when it reads step k's
  loss back, i.e. once step k has finished; the last step is reported after
  `on_train_end` (which follows Tunix waiting for every in-flight step). So the time
  between two consecutive completions is the steady-state cost of one step, pipelining
  included."""

  def __init__(self):
    from tunix.sft import hooks

    outer = self
    self.done, self.end = [], None

    class _H(hooks.TrainingHooks):
      def on_train_start(self, ctx):
        pass

      def on_train_end(self, ctx):
        outer.end = time.perf_counter()

      def on_train_step_start(self, ctx):
        pass

      def on_train_step_end(self, ctx, step, loss):
        if outer.end is None:   # the last step is reported again from close(); ignore it
          outer.done.append(time.perf_counter())

      def on_eval_step_start(self, ctx):
        pass

      def on_eval_step_end(self, ctx, loss):
        pass

    self.hooks = _H()

  def intervals(self, total, warmup):
    marks = self.done + [self.end]
    if len(marks) != total or self.end is None:
      raise SystemExit(f"saw {len(marks)} finished train steps, expected {total}")
    return [b - a for a, b in zip(marks[:-1], marks[1:])][warmup - 1:], marks


def intervals_from_starts(starts, end, warmup):
  """Per-step wall time from the start of each step to the start of the next (the end of
  the run for the last one); the warm-up steps dropped."""
  marks = list(starts) + [end]
  return [b - a for a, b in zip(marks[:-1], marks[1:])][warmup:]


def run(workload, steps, warmup, seed=0):
  import warnings
  import numpy as np
  import jax
  import jax.numpy as jnp
  import flax
  import optax
  from importlib.metadata import version
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)
  # Tunix reads the mesh from `with mesh:` (thread resources), which JAX now calls deprecated
  warnings.filterwarnings("ignore", message=".*with mesh.*", category=DeprecationWarning)
  w = spec.WORKLOADS[workload]
  V = spec.MODEL["vocab_size"]
  rng = np.random.default_rng(seed)
  total = warmup + steps
  model, cfg, n_params, dtypes = build_model(seed)
  # Tunix's sharding annotations need Auto axes (jax.make_mesh defaults to Explicit)
  mesh = jax.make_mesh((1, 1), ("fsdp", "tp"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  extra = {}
  flops_per_step = None

  if workload in ("sft", "dpo"):
    from tunix.sft import peft_trainer, utils as sft_utils
    hooks = Hooks()
    if workload == "sft":
      B, T = w["batch_size"], w["seq_len"]
      tcfg = peft_trainer.TrainingConfig(eval_every_n_steps=10**9, max_steps=total)
      trainer = peft_trainer.PeftTrainer(model, optimizer(), tcfg)

      def gen_model_input_fn(x):
        pad_mask = x.input_tokens != PAD
        return dict(input_tokens=x.input_tokens, input_mask=x.input_mask,
                    positions=sft_utils.build_positions_from_mask(pad_mask),
                    attention_mask=sft_utils.make_causal_attn_mask(pad_mask))

      trainer = trainer.with_gen_model_input_fn(gen_model_input_fn)
      data = []
      for _ in range(total):
        ids = rng.integers(FIRST_DATA_ID, V, size=(B, T)).astype(np.int32)
        data.append(peft_trainer.TrainingInput(input_tokens=ids,
                                               input_mask=np.ones((B, T), np.bool_)))
      tokens_per_step, seq = B * T, T
      flops_per_step = spec.train_flops(tokens_per_step, seq)
    else:
      from tunix.sft.dpo import dpo_trainer
      B, P, C = w["pairs"], w["prompt_len"], w["completion_len"]
      tcfg = dpo_trainer.DPOTrainingConfig(eval_every_n_steps=10**9, max_steps=total,
                                           algorithm="dpo", beta=w["beta"], label_smoothing=0.0)
      trainer = dpo_trainer.DPOTrainer(model=model, ref_model=clone(model),
                                       optimizer=optimizer(), training_config=tcfg)
      data = []
      for _ in range(total):
        ri = lambda L: rng.integers(FIRST_DATA_ID, V, size=(B, L)).astype(np.int32)  # noqa: E731
        data.append(dpo_trainer.TrainingInput(
            prompt_ids=ri(P), prompt_mask=np.ones((B, P), np.bool_),
            chosen_ids=ri(C), chosen_mask=np.ones((B, C), np.bool_),
            rejected_ids=ri(C), rejected_mask=np.ones((B, C), np.bool_)))
      tokens_per_step, seq = B * 2 * (P + C), P + C
      flops_per_step = spec.train_flops(tokens_per_step, seq) + spec.forward_flops(tokens_per_step, seq)
    trainer.with_training_hooks(hooks.hooks)
    extra["max_inflight_computations"] = tcfg.max_inflight_computations
    t0 = time.perf_counter()
    with mesh:
      trainer.train(data)
    wall = time.perf_counter() - t0
    intervals, marks = hooks.intervals(total, warmup)
    window_mean = (marks[-1] - marks[warmup - 1]) / steps

  elif workload == "grpo":
    from tunix.rl import rl_cluster as rl_cluster_lib
    from tunix.rl.grpo import grpo_learner
    from tunix.rl.rollout import base_rollout
    Np, G, P, N = w["prompts"], w["group_size"], w["prompt_len"], w["max_new_tokens"]
    Role = rl_cluster_lib.Role
    rollout_config = base_rollout.RolloutConfig(
        max_tokens_to_generate=N, max_prompt_length=P, kv_cache_size=P + N,
        temperature=1.0, top_p=1.0, top_k=None,
        # an id the model cannot sample: no row stops early, exactly N tokens each
        # seed left at its default (None -> PRNGKey(0) per call): a key array passed
        # here is donated by the sampler's decode loop and dies after the first rollout
        eos_tokens=[V])
    cluster_config = rl_cluster_lib.ClusterConfig(
        role_to_mesh={Role.ACTOR: mesh, Role.REFERENCE: mesh, Role.ROLLOUT: mesh},
        rollout_engine="vanilla", offload_to_cpu=False,
        training_config=rl_cluster_lib.RLTrainingConfig(
            actor_optimizer=optimizer(), eval_every_n_steps=10**9, max_steps=total),
        rollout_config=rollout_config)
    cluster = rl_cluster_lib.RLCluster(actor=model, reference=clone(model),
                                       tokenizer=IdTokenizer(), cluster_config=cluster_config)
    algo = grpo_learner.GRPOConfig(num_generations=G, num_iterations=w["num_iterations"],
                                   beta=w["beta"], epsilon=0.2)

    def even_fraction(prompts, completions, **kw):
      out = []
      for c in completions:
        ids = c.split()
        out.append(sum(1 for t in ids if int(t) % 2 == 0) / max(len(ids), 1))
      return out

    learner = grpo_learner.GRPOLearner(rl_cluster=cluster, algo_config=algo,
                                       reward_fns=[even_fraction])
    starts, gen_times, gen_lens = [], [], []
    orig_step = learner._run_global_step
    orig_generate = cluster.generate

    def timed_step(*a, **kw):
      starts.append(time.perf_counter())
      return orig_step(*a, **kw)

    def timed_generate(*a, **kw):
      t0 = time.perf_counter()
      out = orig_generate(*a, **kw)
      gen_times.append(time.perf_counter() - t0)
      gen_lens.extend(len(t) for t in out.tokens)
      return out

    learner._run_global_step = timed_step
    cluster.generate = timed_generate
    prompts = rng.integers(FIRST_DATA_ID, V, size=(total, Np, P))
    # a batch is {"prompts": array of strings}, as a grain / tfds pipeline would hand it over
    data = [{"prompts": np.array([" ".join(str(int(t)) for t in row) for row in batch])}
            for batch in prompts]
    t0 = time.perf_counter()
    learner.train(data)
    end = time.perf_counter()
    wall = end - t0
    if len(starts) != total:
      raise SystemExit(f"saw {len(starts)} global steps, expected {total}")
    intervals = intervals_from_starts(starts, end, warmup)
    window_mean = (end - starts[warmup]) / steps
    if set(gen_lens) != {N}:
      raise SystemExit(f"generated lengths {sorted(set(gen_lens))}, want exactly {N}")
    if len(gen_times) != total:
      raise SystemExit(f"{len(gen_times)} rollouts in {total} steps, want one per step")
    g = gen_times[warmup:warmup + steps]
    extra.update(gen_s_per_step=statistics.median(g),
                 decode_tokens_per_s=Np * G * N / statistics.median(g),
                 gen_share=statistics.median([a / b for a, b in zip(g, intervals)]),
                 gen_lengths=sorted(set(gen_lens)), kv_cache_size=P + N,
                 rollout_engine="vanilla", ref_model=True,
                 loss_agg_mode=algo.loss_agg_mode, weights_synced=learner.should_sync_weights,
                 generated_tokens_per_step=Np * G * N)
    tokens_per_step, seq = Np * G * (P + N), P + N
    # update (fwd+bwd) + the reference forward over prompt+completion; generation apart
    flops_per_step = spec.train_flops(tokens_per_step, seq) + spec.forward_flops(tokens_per_step, seq)
  else:
    raise SystemExit(f"unknown workload {workload!r}")

  if len(intervals) != steps:
    raise SystemExit(f"timed {len(intervals)} steps, expected {steps}")
  med = statistics.median(intervals)
  res = dict(
      peer="tunix", workload=workload, spec=w, steps=steps, warmup=warmup,
      s_per_step=med, s_per_step_window_mean=window_mean, step_times=intervals,
      tokens_per_step=tokens_per_step, tokens_per_s=tokens_per_step / med,
      total_train_wall_s=wall,
      achieved_gflops=(flops_per_step / med / 1e9) if flops_per_step else None,
      n_params=n_params, param_dtypes=dtypes, attention="tunix Llama3 einsum attention (XLA)",
      jax_devices=[str(d) for d in jax.devices()], xla_flags=os.environ.get("XLA_FLAGS", ""),
      versions=dict(tunix=version("google-tunix"), jax=jax.__version__,
                    jaxlib=version("jaxlib"), flax=flax.__version__, optax=optax.__version__,
                    python=platform.python_version()),
      env={k: os.environ[k] for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                      "XLA_FLAGS") if k in os.environ},
      machine=dict(cpu_count=os.cpu_count(), loadavg=os.getloadavg(),
                   platform=platform.platform()))
  res.update(extra)
  del jnp
  return res


def main():
  spec.peer_main(run, __doc__.splitlines()[0])


if __name__ == "__main__":
  main()
