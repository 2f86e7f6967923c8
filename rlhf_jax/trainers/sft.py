"""Supervised fine-tuning trainer: `run(config, workdir)`.

Reads top to bottom: data -> tokenizer -> model -> sharded state (or resume)
-> jitted train step -> loop with logging, eval, samples, checkpoints.

Loss: token-mean next-token NLL over completion tokens only (prompt and
padding masked), see `rlhf_jax.losses.sft`; with model.logits_chunk > 0 it is
computed from the hidden states a chunk of tokens at a time (no [B, T, V] logits).
With grad_accum_steps = A the batch is split into A micro-batches whose summed NLL
and token counts are accumulated before dividing, so the update equals the
un-accumulated one.
With config.lora.rank > 0 only LoRA adapters train on the frozen base
(`state_lib.create_train_state`, `rlhf_jax.models.lora`).
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlhf_jax import config as config_lib
from rlhf_jax import evaluation
from rlhf_jax import flops as flops_lib
from rlhf_jax import parallel
from rlhf_jax.data import lengths
from rlhf_jax.data import sft as sft_data
from rlhf_jax.data import synthetic
from rlhf_jax.data.rows import file_digest
from rlhf_jax.envs import transcripts
from rlhf_jax.losses.logprobs import shift_for_next_token
from rlhf_jax.losses.sft import sft_loss_sums, sft_loss_sums_from_logps
from rlhf_jax.models import Transformer
from rlhf_jax.models.api import token_logprobs_from_hidden
from rlhf_jax.trainers import loop
from rlhf_jax.trainers import optim
from rlhf_jax.trainers import setup
from rlhf_jax.trainers import state as state_lib
from rlhf_jax.trainers import step as step_lib


# ----------------------------------------------------------------------------
# Steps (pure functions, jitted by `run`)
# ----------------------------------------------------------------------------

def make_loss_sums(model):
  """loss_sums(params, batch) -> (summed NLL, token count) of the completion tokens.

  model.config.logits_chunk > 0: from the final hidden states, `logits_chunk` tokens
  unembedded at a time (`models.api.token_logprobs_from_hidden`), never the [B, T, V]
  logits; 0: from the full logits."""
  chunk = model.config.logits_chunk

  def loss_sums(params, batch):
    if chunk:
      h_BTD, _ = model.apply({"params": params}, batch["tokens"], batch["segment_ids"],
                             output="hidden")
      h_BSD, targets_BS, mask_BS = shift_for_next_token(h_BTD, batch["tokens"],
                                                        batch["loss_mask"])
      logp_BS = token_logprobs_from_hidden(model, params, h_BSD, targets_BS, chunk=chunk)
      return sft_loss_sums_from_logps(logp_BS, mask_BS)
    logits_BTV, _ = model.apply({"params": params}, batch["tokens"], batch["segment_ids"])
    return sft_loss_sums(*shift_for_next_token(logits_BTV, batch["tokens"], batch["loss_mask"]))
  return loss_sums


def make_train_step(model, tx, grad_accum_steps: int = 1, frozen=None):
  """train_step(state, batch) -> (state, metrics); batch arrays are [B, T].

  `step_lib.make_step` on the summed completion-token NLL with normalizer="num_tokens":
  the gradient and the logged loss are the token-mean NLL of the whole batch, also with
  grad_accum_steps > 1 micro-batches. The model runs with frozen.merge(state["base"],
  state["params"]) (`state_lib.Frozen`: the parameters themselves, or with LoRA the
  adapters merged into the frozen base)."""
  frozen = frozen or state_lib.Frozen()
  loss_sums = make_loss_sums(model)

  def loss_fn(params, batch):
    nll, n = loss_sums(params, batch)
    return nll, {"num_tokens": n}
  update = step_lib.make_step(loss_fn, tx, grad_accum_steps, frozen=frozen,
                              normalizer="num_tokens")

  def train_step(state, batch):
    new_state, metrics = update(state, batch)
    merged = frozen.merge(state.get(state_lib.BASE), state["params"])
    return new_state, {**metrics, "param_norm": optax.tree.norm(merged)}
  return train_step


def make_eval_step(model):
  loss_sums = make_loss_sums(model)
  return lambda params, batch: loss_sums(params, batch)


# ----------------------------------------------------------------------------
# Data and tokenizer
# ----------------------------------------------------------------------------

def resolve_data(config, workdir):
  """Paths of the train / eval JSONL; generates the synthetic task when unset, converts
  GSM8K into tool-use transcripts with data.source=gsm8k_tools."""
  d = config.data
  train, evals = d.train_path, d.eval_path
  if d.get("source", "jsonl") == "gsm8k_tools":
    return tuple(_gsm8k_tools(p, workdir) if p else p for p in (train, evals))
  if not train:
    train = _synthetic(d, os.path.join(workdir, "data"), "train", d.synthetic_train_examples,
                       config.seed)
    if not evals:
      evals = _synthetic(d, os.path.join(workdir, "data"), "eval", d.synthetic_eval_examples,
                         config.seed + 10_000)
  return train, evals


def _synthetic(d, data_dir: str, split: str, n: int, seed: int) -> str:
  if d.synthetic_task in transcripts.TASKS:  # multi-turn transcripts, played through the env
    path = os.path.join(data_dir, f"{d.synthetic_task}_d{d.synthetic_digits}_{split}.jsonl")
    if not os.path.exists(path):
      transcripts.write_task(path, d.synthetic_task, n, seed, digits=d.synthetic_digits)
    return path
  path = os.path.join(data_dir, f"{d.synthetic_task}{d.synthetic_max_len}_{split}.jsonl")
  if not os.path.exists(path):
    synthetic.write_task(path, d.synthetic_task, n, seed, max_len=d.synthetic_max_len)
  return path


def _gsm8k_tools(path: str, workdir: str) -> str:
  """WORKDIR/data/gsm8k_tools_<sha256[:12] of path>.jsonl: GSM8K as tool-use transcripts."""
  out = os.path.join(workdir, "data", f"gsm8k_tools_{file_digest(path)[:12]}.jsonl")
  if not os.path.exists(out):
    stats = transcripts.write_gsm8k_tool_sft(path, out)
    print(f"gsm8k_tools: {path} -> {out} ({stats})", flush=True)
  return out


def corpus_lines(path):
  """Training rows rendered as the model sees them (for training a tokenizer)."""
  for lineno, row in sft_data.read_jsonl_rows(path):
    msgs, completion = sft_data.row_to_messages(path, lineno, row)
    yield msgs, completion


# ----------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------

def run(config, workdir: str) -> dict:
  validate(config, jax.device_count())
  os.makedirs(workdir, exist_ok=True)
  mesh = parallel.make_mesh(config.mesh.shape)
  T, B = config.data.max_seq_len, config.batch_size

  # Data.
  train_path, eval_path = resolve_data(config, workdir)
  tokenizer = setup.build_tokenizer(config, workdir, lambda: corpus_lines(train_path))
  train_ex = sft_data.tokenize_sft_file(train_path, tokenizer, T, config.data.overlength,
                                        config.data.loss_on_prompt)
  if config.data.packing:
    train_arrays = sft_data.pack_examples(train_ex, T, tokenizer.pad_id, config.seed)
  else:
    train_arrays = sft_data.pad_examples(train_ex, T, tokenizer.pad_id)
  train_ds = sft_data.batched(train_arrays, B, config.seed)
  eval_ds = None
  if eval_path:
    eval_arrays = sft_data.pad_examples(
        sft_data.tokenize_sft_file(eval_path, tokenizer, T, config.data.overlength,
                                   config.data.loss_on_prompt),
        T, tokenizer.pad_id)
    eval_ds = sft_data.batched(eval_arrays, min(B, len(eval_arrays["tokens"])), 0, shuffle=False)
    n_eval_batches = min(config.eval_batches, len(eval_arrays["tokens"]) // eval_ds[0]["tokens"].shape[0])
  # data.pad_to: each batch cut to its length (`data.lengths`; packed rows stay T long).
  pad = lengths.from_config(config.data, [len(t) for t, _ in train_ex], B, T,
                            verbose=parallel.is_primary())
  pad_train = (lambda b: b) if config.data.packing else pad

  # Model.
  mcfg, params = setup.policy_init(config, tokenizer)
  model = Transformer(mcfg)

  # State: fresh or resumed.
  tx, schedule = optim.make_optimizer(config.optimizer, config.num_steps)
  rng_init, rng_sample = jax.random.split(jax.random.PRNGKey(config.seed))
  dummy = jnp.zeros((1, 2), jnp.int32)
  # With config.lora.rank > 0 the state trains LoRA adapters; `frozen` holds the base.
  state, shardings, frozen = state_lib.create_train_state(
      lambda r: model.init(r, dummy)["params"], tx, mesh, rng_init, params, config=config,
      workdir=workdir)
  del params  # the host copy of the weights (e.g. a dequantised GGUF): on the devices now
  eval_ref = (frozen.initial(state["params"]) if evaluation.needs_reference(config)
              else None)  # the initial policy, for eval_kl
  policy_eval = evaluation.from_config(config, model_config=mcfg, tokenizer=tokenizer,
                                       ref_params=eval_ref, workdir=workdir)

  checkpointer, start, state = setup.open_run(config, workdir, state, shardings, mcfg,
                                               tokenizer)

  batch_sharding = parallel.batch_sharding(mesh)
  train_step = state_lib.jit_step(make_train_step(model, tx, config.grad_accum_steps, frozen),
                                  shardings, batch_sharding,
                                  metrics_sharding=parallel.replicated(mesh), donate=True)
  eval_step = jax.jit(make_eval_step(model),
                      in_shardings=(frozen.model_shardings(shardings), batch_sharding))

  def eval_loss(params):
    nll = n = 0.0
    for i in range(n_eval_batches):
      s, c = eval_step(params, parallel.shard_batch(pad(eval_ds[i], "eval"), mesh))
      nll, n = nll + float(s), n + float(c)
    return nll / max(n, 1.0)

  sample_rows = sft_data.read_jsonl_rows(eval_path)[:config.sample.num_prompts] if eval_path else []
  sample_prompts, sample_refs = zip(*[sft_data.row_to_messages(eval_path, n, r)
                                      for n, r in sample_rows]) if sample_rows else ((), ())

  def evaluate(params, step):
    params = frozen.full(params)  # LoRA: adapters merged into the base
    out = {"eval_loss": eval_loss(params)} if eval_ds is not None else {}
    if policy_eval is not None:
      out.update(policy_eval(params, step))
    if sample_rows and step and config.sample.every and (step % config.sample.every == 0
                                         or step == config.num_steps):
      out["sample_exact_match"] = loop.write_samples(
          workdir, step, mcfg, params, tokenizer, sample_prompts, sample_refs,
          jax.random.fold_in(rng_sample, step), config.sample)
    return out

  return loop.train_loop(
      config, workdir, state=state, start=start,
      train_step=train_step,
      get_batch=lambda i: pad_train(train_ds[i]), mesh=mesh, checkpointer=checkpointer,
      schedule=schedule,
      evaluate=evaluate if eval_ds is not None or policy_eval is not None else None, desc="sft",
      progress_keys=("loss", "eval_loss"),
      count_tokens=lambda b: b["segment_ids"].astype(bool).sum(),
      compute=lambda b: compute_counts(mcfg, b))


def compute_counts(mcfg, batch) -> dict:
  """One step's FLOPs and tokens (`rlhf_jax.flops`): forward + backward over the
  padded [B, T] batch, every position unembedded (T - 1 with model.logits_chunk);
  T is this step's padded length (data.pad_to: the batch as the step ran it);
  tokens/trained = the real (segment_ids > 0) tokens."""
  B, T = batch["tokens"].shape
  update, remat = flops_lib.train_flops(mcfg, B, T, T - 1 if mcfg.logits_chunk else T)
  return {"flops/update": update, "flops/remat": remat,
          "tokens/trained": int((batch["segment_ids"] > 0).sum()),
          # examples: segment ids count 1, 2, ... within a (packed) row
          "samples/completions": int(np.asarray(batch["segment_ids"]).max(axis=1).sum())}


def validate(config, num_devices: int | None = None) -> None:
  """The checks of an SFT config that need no files: the shared sections
  (`rlhf_jax.config.validate`) and batch_size split over the data-parallel devices
  (num_devices=None: the config alone). ConfigError naming the key."""
  config_lib.validate(config, num_devices)
  config_lib.check_batch_split(config, num_devices)
