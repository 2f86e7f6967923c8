"""XLA's compiled per-device memory of the real steps, from abstract inputs (no device).

Each function below builds one of the trainers' own step functions (SFT
`sft.make_train_step`, DPO `dpo.make_train_step`, the GRPO update
`grpo.make_update`, the sampler `sampling._generate`, the rollout's log-prob pass
`rollout.completion_logps_fn`), jits it with the trainer's shardings (and state
donation where the trainer donates), lowers it for `jax.ShapeDtypeStruct` inputs
(the train state from `jax.eval_shape` of its init: nothing is allocated) and
compiles it. `compiled.memory_analysis()` then gives per device:

    args   the inputs (train state, batch, frozen copies)
    out    the outputs; alias: the outputs written over donated inputs
    temp   XLA's scratch: activations kept for the backward pass, gradients,
           logits, the optimizer update's temporaries
    peak   args + out - alias + temp (everything live at once)

This is XLA's plan for the backend it compiles on (CPU here, which computes
bf16 matmuls through float32 copies: an upper bound for TPU/GPU), and it covers
real sizes in seconds to a minute per compile: the layers are `nn.scan`-ed, so
compile time does not grow with depth. `benchmarks/memory.py --aot` tabulates it
(docs/memory.md) and tests/test_memory_aot.py checks `rlhf_jax.memory` against it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from rlhf_jax import parallel
from rlhf_jax.models import ModelConfig, Transformer


@dataclasses.dataclass
class Compiled:
  args: int
  out: int
  alias: int
  temp: int
  compile_s: float

  @property
  def peak(self) -> int:
    return self.args + self.out - self.alias + self.temp

  def as_dict(self) -> dict:
    return {**dataclasses.asdict(self), "peak": self.peak}


def analyse(jitted, *args, mesh_=None, **kwargs) -> Compiled:
  """Lower and compile `jitted` for the (abstract) arguments; its memory_analysis().
  With a multi-device `mesh_` the activations are batch-sharded while tracing
  (`batch_sharded_activations`)."""
  t = time.perf_counter()
  with batch_sharded_activations(mesh_) if mesh_ is not None else contextlib.nullcontext():
    lowered = jitted.lower(*args, **kwargs)
  ma = lowered.compile().memory_analysis()
  return Compiled(ma.argument_size_in_bytes, ma.output_size_in_bytes, ma.alias_size_in_bytes,
                  ma.temp_size_in_bytes, time.perf_counter() - t)


def logits_chunk_supported() -> bool:
  """Whether the trainers read model.logits_chunk yet (chunked log-probs): until they do,
  a model with logits_chunk > 0 compiles exactly like logits_chunk = 0."""
  import inspect
  from rlhf_jax.trainers import sft
  return "logits_chunk" in inspect.getsource(sft)


def preset_model(size: str, **overrides) -> ModelConfig:
  """ModelConfig of a `rlhf_jax.presets` size (bf16 compute, remat full, as the presets),
  with `overrides` (max_seq_len, attention, logits_chunk, ...)."""
  from rlhf_jax import presets
  fields = {**presets._LLAMA_DEFAULTS, **presets.SIZES[size].model,
            "dtype": "bfloat16", "remat_policy": "full"}
  if fields.get("rope_scaling") == ():
    fields["rope_scaling"] = None
  fields.update(overrides)
  return ModelConfig(**fields)


def default_optimizer():
  """The trainers' AdamW (+ clipping, schedule): its state is what the step carries."""
  from rlhf_jax import config as config_lib
  from rlhf_jax.trainers import optim
  return optim.make_optimizer(config_lib.base_config("sft").optimizer, 100)[0]


def abstract_state(model: Transformer, tx, mesh):
  """(state, shardings): ShapeDtypeStructs of the train state {"step", "params",
  "opt_state"} laid out as `state_lib.create_state` lays it out on `mesh`. Nothing is
  allocated (jax.eval_shape of the init)."""
  dummy = jnp.zeros((1, 2), jnp.int32)

  def init_boxed():
    p = model.init(jax.random.PRNGKey(0), dummy)["params"]
    return {"step": jnp.zeros((), jnp.int32), "params": p, "opt_state": tx.init(p)}

  shardings = parallel.boxed_shardings(init_boxed, mesh)
  shapes = jax.eval_shape(lambda: nn.meta.unbox(init_boxed()))
  state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                       shapes, shardings)
  return state, shardings


@contextlib.contextmanager
def batch_sharded_activations(mesh):
  """Constrain the residual stream (every block's input and output) and the unembedding's
  input to the batch sharding P(("data", "fsdp")) while tracing: the activation sharding
  the model does not declare yet (docs/memory.md, FSDP note). Without it XLA's sharding
  propagation shards activations like the weights (on d_model) and keeps whole-batch
  activations and logits on every device under FSDP. A flax method interceptor: no model
  code changes; a no-op on one device."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  from rlhf_jax.models.transformer import Block
  if mesh.size == 1:
    yield
    return
  rows = NamedSharding(mesh, P(("data", "fsdp")))
  put = lambda x: jax.lax.with_sharding_constraint(x, rows)

  def interceptor(fn, args, kwargs, context):
    if isinstance(context.module, Block) and context.method_name == "__call__":
      x, *rest = args
      out, cache = fn(put(x), *rest, **kwargs)
      return put(out), cache
    if isinstance(context.module, Transformer) and context.method_name == "unembed":
      return fn(put(args[0]), *args[1:], **kwargs)
    return fn(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    yield


def _spec(shape, dtype, sharding):
  return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def mesh_of(shape=(1, 1, 1)):
  n = shape[0] * shape[1] * shape[2]
  if jax.device_count() < n:
    raise RuntimeError(f"mesh {shape} needs {n} devices, JAX has {jax.device_count()}: set "
                       f"XLA_FLAGS=--xla_force_host_platform_device_count={n} before JAX starts")
  return parallel.make_mesh(shape, jax.devices()[:n])


@contextlib.contextmanager
def _quiet():
  with contextlib.redirect_stdout(sys.stderr):
    yield


def sft_step(m: ModelConfig, rows: int, seq: int, mesh_shape=(1, 1, 1),
             grad_accum: int = 1, tx=None) -> Compiled:
  """The SFT train step (`sft.make_train_step`) as the trainer jits it: state donated."""
  from rlhf_jax.trainers import sft
  tx = tx or default_optimizer()
  mesh = mesh_of(mesh_shape)
  model = Transformer(m)
  state, shardings = abstract_state(model, tx, mesh)
  bs = parallel.batch_sharding(mesh)
  batch = {k: _spec((rows, seq), jnp.int32, bs) for k in ("tokens", "segment_ids", "loss_mask")}
  step = jax.jit(sft.make_train_step(model, tx, grad_accum),
                 in_shardings=(shardings, bs),
                 out_shardings=(shardings, parallel.replicated(mesh)), donate_argnums=0)
  return analyse(step, state, batch, mesh_=mesh)


def dpo_step(m: ModelConfig, pairs: int, prompt_len: int, completion_len: int,
             mesh_shape=(1, 1, 1), dpo_config=None, tx=None) -> Compiled:
  """The DPO train step (`dpo.make_train_step`) as the trainer jits it: state donated;
  reference log-probs precomputed (`dpo.precompute_reference`, the presets' default: no
  reference parameters in the step); chosen + rejected packed into one row when the
  trainer would (`dpo.share_prompt` and `prefix_sharing_saves_flops`)."""
  from rlhf_jax.models.api import prefix_sharing_saves_flops
  from rlhf_jax.trainers import dpo
  if dpo_config is None:
    from ml_collections import ConfigDict
    dpo_config = ConfigDict(dict(loss_type="sigmoid", beta=0.1, label_smoothing=0.0,
                                 simpo_gamma=0.5, orpo_lambda=0.1, kto_desirable_weight=1.0,
                                 kto_undesirable_weight=1.0, reference_free=False,
                                 precompute_reference=True, share_prompt=True))
  tx = tx or default_optimizer()
  mesh = mesh_of(mesh_shape)
  model = Transformer(m)
  state, shardings = abstract_state(model, tx, mesh)
  bs = parallel.batch_sharding(mesh)
  T = prompt_len + completion_len
  window = completion_len if dpo.shares_prompt(dpo_config) and prefix_sharing_saves_flops(
      m, prompt_len, completion_len, 2) else 0
  batch = {f"{n}_{k}": _spec((pairs, T), jnp.int32, bs) for n in dpo.sides(dpo_config)
           for k in ("tokens", "segment_ids", "loss_mask")}
  if dpo.uses_reference(dpo_config):
    batch.update({f"ref_{n}_logps": _spec((pairs,), jnp.float32, bs)
                  for n in dpo.sides(dpo_config)})
  step = jax.jit(dpo.make_train_step(model, tx, dpo_config, None, window),
                 in_shardings=(shardings, None, bs),
                 out_shardings=(shardings, parallel.replicated(mesh)), donate_argnums=0)
  return analyse(step, state, None, batch, mesh_=mesh)


def grpo_update(m: ModelConfig, rows: int, prompt_len: int, completion_len: int,
                mesh_shape=(1, 1, 1), grpo_config=None, micro_rows: int = 0,
                group_size: int = 1, tx=None, donate: bool = True) -> Compiled:
  """The GRPO update (`grpo.make_update`) on a minibatch of `rows` rows of
  [prompt | completion], gradients accumulated over micro-batches of `micro_rows`
  (rollout.train_micro_batch; 0 = one). As the trainer runs it: its own jit, the state
  donated (synchronous rollouts; donate=False: as with the rollout pipeline, the new
  state a second copy: `out`), on-policy (one update per rollout), prompts shared within
  groups of `group_size` when the trainer would."""
  from rlhf_jax.models.api import prefix_sharing_saves_flops
  from rlhf_jax.trainers import grpo
  if grpo_config is None:
    from rlhf_jax.launch import load_config
    import os
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    grpo_config = load_config(f"{repo}/configs/grpo.py:gsm8k").grpo
  algo = grpo.resolve(grpo_config)
  tx = tx or default_optimizer()
  mesh = mesh_of(mesh_shape)
  model = Transformer(m)
  state, shardings = abstract_state(model, tx, mesh)
  bs = parallel.batch_sharding(mesh)
  S = prompt_len + completion_len
  micro = grpo.micro_batches_of(rows, micro_rows)
  mrows = rows // micro
  G = group_size
  share = G if (G > 1 and mrows % G == 0
                and prefix_sharing_saves_flops(m, prompt_len, completion_len, G)) else 1
  update = grpo.make_update(model, tx, algo, prompt_len, 1.0, completion_len, micro,
                            on_policy=True, group_size=share, donate=donate)
  C = completion_len
  batch = {"sequences_BS": _spec((rows, S), jnp.int32, bs),
           "segment_ids_BS": _spec((rows, S), jnp.int32, bs),
           "mask_BC": _spec((rows, C), jnp.int32, bs),
           **{k: _spec((rows, C), jnp.float32, bs)
              for k in ("old_logps_BC", "advantages_BC", "ref_logps_BC")}}
  # the update's own jit (`state_lib.jit_step`: donation), laid out by the inputs' shardings
  return analyse(update, state, batch, mesh_=mesh)


def sampler(m: ModelConfig, rows: int, prompt_len: int, max_new_tokens: int,
            mesh_shape=(1, 1, 1), group_size: int = 1, kv_cache_dtype: str = "auto",
            tx=None) -> Compiled:
  """`sampling.generate` (prefill + the decode loop with its KV cache) for `rows` prompts
  of `prompt_len` tokens, parameters laid out as the trainer's (float32, FSDP-sharded),
  each group of `group_size` rows prefilled once and the cache sharded over the mesh as
  the rollout runs it (`rollout.generate_group_size`, `sampling` docstring)."""
  from rlhf_jax import sampling
  tx = tx or default_optimizer()
  mesh = mesh_of(mesh_shape)
  model = Transformer(m)
  state, _ = abstract_state(model, tx, mesh)
  bs = parallel.batch_sharding(mesh)
  rep = parallel.replicated(mesh)
  prompt = _spec((rows, prompt_len), jnp.int32, bs)
  key = _spec((2,), jnp.uint32, rep)
  scalar = _spec((), jnp.float32, rep)
  return analyse(sampling._generate, m, state["params"], prompt, prompt, key, scalar, scalar,
                 max_new_tokens=max_new_tokens, top_k=0, use_top_p=False, greedy=False,
                 eos_ids=(1,), pad_id=0, group_size=group_size,
                 kv_cache_dtype=sampling.resolve_kv_cache_dtype(m, kv_cache_dtype),
                 mesh=mesh if mesh.size > 1 else None, mesh_=mesh)


def logprob_pass(m: ModelConfig, rows: int, prompt_len: int, completion_len: int,
                 mesh_shape=(1, 1, 1), group_size: int = 1, tx=None) -> Compiled:
  """The rollout's no-grad log-prob pass (`rollout.completion_logps_fn`: old or reference
  policy) over `rows` rows of [prompt | completion]."""
  from rlhf_jax import rollout
  from rlhf_jax.models.api import prefix_sharing_saves_flops
  tx = tx or default_optimizer()
  mesh = mesh_of(mesh_shape)
  state, _ = abstract_state(Transformer(m), tx, mesh)
  bs = parallel.batch_sharding(mesh)
  G = group_size
  share = G if (G > 1 and rows % G == 0
                and prefix_sharing_saves_flops(m, prompt_len, completion_len, G)) else 1
  f = rollout.completion_logps_fn(m, prompt_len, 1.0, share)
  S = prompt_len + completion_len
  seq = _spec((rows, S), jnp.int32, bs)
  return analyse(f, state["params"], seq, seq, mesh_=mesh)
