"""Process-reward-model trainer: `run(config, workdir)`.

A PRM (Uesato et al. 2022, "Solving math word problems with process- and
outcome-based feedback"; Lightman et al. 2023, "Let's Verify Step by Step")
scores every step of a solution. Model: a decoder backbone + scalar head
(`rlhf_jax.models.heads.ScalarModel`) whose per-token value at each step's LAST
token is the logit of p(step correct); trained with per-step binary
cross-entropy (`rlhf_jax.losses.prm.prm_step_loss`) on step labels that need no
annotators: GSM8K's calculator annotations `<<48/2=24>>` checked by a safe
evaluator, plus a corrupted copy of every solution (one step's result changed
consistently), cut after the first wrong step (`rlhf_jax.data.prm`).

Data (config.data, `rlhf_jax.config_defaults.prm_data_config`): source "gsm8k" (official
files; WORKDIR/data/prm_{train,eval}.jsonl are written from them) or "jsonl"
({"prompt","steps","labels"} rows). Rows hold prompt + steps, max_len tokens.

Eval (held-out file; threshold p = 0.5): eval_step_accuracy over every labelled
step, eval_accuracy_clean (steps of uncorrupted solutions, all correct),
eval_accuracy_corrupted (the wrong steps; = recall of errors),
eval_accuracy_corrupted_prefix (the correct steps before the error in
corrupted solutions), eval_balanced_accuracy (mean of the correct-step and
wrong-step accuracies; chance 0.5), eval_first_error_accuracy (over solutions:
the first step predicted wrong -- or none -- is the true first error -- or
none), and eval_majority_baseline (accuracy of always predicting the majority
label, for honesty). The workdir ({"backbone","head"} params + model_config.json
+ tokenizer) is what `rlhf_jax.rewards.prm.PRMReward` loads.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import config as config_lib
from rlhf_jax import flops as flops_lib
from rlhf_jax import parallel
from rlhf_jax.data import lengths
from rlhf_jax.data import prm as prm_data
from rlhf_jax.data import sft as sft_data
from rlhf_jax.data.sft import DataError
from rlhf_jax.losses.prm import prm_step_loss
from rlhf_jax.models.heads import ScalarModel, backbone_params_from_lm
from rlhf_jax import workdir as workdir_lib
from rlhf_jax.trainers import loop
from rlhf_jax.trainers import optim
from rlhf_jax.trainers import setup
from rlhf_jax.trainers import state as state_lib
from rlhf_jax.trainers import step as step_lib

SOURCES = ("gsm8k", "jsonl")
ARRAY_KEYS = ("tokens", "segment_ids", "step_mask", "step_labels")


def load_rows(config, workdir: str):
  """(train rows, eval rows or None, stats): PRM rows of config.data (module docstring)."""
  d = config.data
  if d.source not in SOURCES:
    raise DataError(f"config.data.source={d.source!r}: expected one of {SOURCES}")
  if not d.train_path:
    raise DataError("config.data.train_path: required (a GSM8K .jsonl file for source="
                    "'gsm8k', e.g. ../shared/data/gsm8k_train.jsonl)")
  stats = {}
  out = []
  for split, path, limit, seed in (("train", d.train_path, d.max_train_examples, config.seed),
                                   ("eval", d.eval_path, d.max_eval_examples, config.seed + 1)):
    if not path:
      out.append(None)
      continue
    if not os.path.isfile(path):
      raise DataError(f"config.data.{split}_path={path}: no such file")
    if d.source == "gsm8k":
      s = {}
      rows = prm_data.gsm8k_prm_rows(path, limit, seed, d.corrupt, s)
      stats.update({f"{split}_{k}": v for k, v in s.items()})
      if parallel.is_primary():
        os.makedirs(os.path.join(workdir, "data"), exist_ok=True)
        prm_data.write_prm_jsonl(os.path.join(workdir, "data", f"prm_{split}.jsonl"), rows)
    else:
      rows = prm_data.read_prm_jsonl(path)
      rows = rows[:limit] if limit else rows
    out.append(rows)
  return out[0], out[1], stats


def corpus(rows):
  for r in rows:
    yield prm_data.messages(r["prompt"]), "\n".join(r["steps"])


def step_logits(model, params, batch):
  return model.apply({"params": params}, batch["tokens"], batch["segment_ids"])


def make_train_step(model, tx, negative_weight: float, frozen=None, grad_accum_steps: int = 1):
  """train_step(state, batch) -> (state, metrics). With grad_accum_steps = A > 1
  the rows are split into A micro-batches; each part's gradient is weighted by its share
  of sum w (the loss's denominator) and each metric by the count it is a ratio of, so the
  update and the metrics equal the whole-batch ones (`step_lib.make_step`)."""
  def loss_fn(params, batch):
    return prm_step_loss(step_logits(model, params, batch), batch["step_mask"],
                         batch["step_labels"], negative_weight)

  def counts(part):
    m = (part["step_mask"] != 0).astype(jnp.float32)
    y = (part["step_labels"] != 0).astype(jnp.float32)
    return m, y

  def loss_weight(part):  # sum_bt w_bt of the module formula
    m, y = counts(part)
    return jnp.sum(m * (y + negative_weight * (1 - y)))

  def metric_weights(part):
    m, y = counts(part)
    n = jnp.sum(m)
    return {"step_accuracy": n, "positive_frac": n, "accuracy_correct": jnp.sum(m * y),
            "accuracy_wrong": jnp.sum(m * (1 - y))}

  return step_lib.make_step(loss_fn, tx, grad_accum_steps, loss_weight, frozen=frozen,
                            metric_weights=metric_weights, summed_metrics=("num_steps",))


def step_metrics(logits_NT, arrays) -> dict:
  """The eval metrics of the module docstring from logits [N, T] (numpy)."""
  mask = arrays["step_mask"] != 0
  y = arrays["step_labels"] != 0
  pred = logits_NT > 0
  corrupted = arrays["corrupted"][:, None] != 0
  hit = (pred == y) & mask

  def acc(sel):
    n = int(sel.sum())
    return float((hit & sel).sum() / n) if n else 0.0

  n_pos, n_all = int((mask & y).sum()), int(mask.sum())
  first_hits = []
  for i in range(len(logits_NT)):
    if arrays["first_error"][i] == -2:  # its error was cut off by max_len
      continue
    ends = np.flatnonzero(mask[i])
    predicted = next((j for j, t in enumerate(ends) if not pred[i, t]), -1)
    first_hits.append(predicted == arrays["first_error"][i])
  return {
      "eval_step_accuracy": acc(mask),
      "eval_accuracy_clean": acc(mask & ~corrupted),
      "eval_accuracy_corrupted": acc(mask & ~y),
      "eval_accuracy_corrupted_prefix": acc(mask & corrupted & y),
      "eval_balanced_accuracy": 0.5 * (acc(mask & y) + acc(mask & ~y)),
      "eval_first_error_accuracy": float(np.mean(first_hits)) if first_hits else 0.0,
      "eval_majority_baseline": max(n_pos, n_all - n_pos) / max(n_all, 1),
      "eval_steps": n_all,
  }


def run(config, workdir: str) -> dict:
  validate(config, jax.device_count())
  os.makedirs(workdir, exist_ok=True)
  mesh = parallel.make_mesh(config.mesh.shape)
  d = config.data

  train_rows, eval_rows, data_stats = load_rows(config, workdir)
  tokenizer = setup.build_tokenizer(config, workdir, lambda: corpus(train_rows))
  tok_stats = {}
  train_arrays = prm_data.tokenize_prm_rows(train_rows, tokenizer, d.max_prompt_len, d.max_len,
                                            tok_stats)
  train_ds = sft_data.batched({k: train_arrays[k] for k in ARRAY_KEYS}, config.batch_size,
                              config.seed)
  eval_arrays = None
  if eval_rows:
    eval_arrays = prm_data.tokenize_prm_rows(eval_rows, tokenizer, d.max_prompt_len, d.max_len)
  # data.pad_to: each batch cut to its length (`data.lengths`).
  pad = lengths.from_config(d, lengths.row_lengths(train_arrays), config.batch_size, d.max_len,
                            verbose=parallel.is_primary())

  rng_init = jax.random.PRNGKey(config.seed)
  init_params = None
  mcfg, lm_params = setup.policy_init(config, tokenizer, workdir_lib.LM_OR_RM)
  if mcfg.max_seq_len < d.max_len:
    raise config_lib.ConfigError(f"config.data.max_len={d.max_len} exceeds the model's "
                                 f"max_seq_len={mcfg.max_seq_len}")
  model = ScalarModel(mcfg)
  dummy = jnp.zeros((1, 2), jnp.int32)
  if lm_params is not None:
    backbone = lm_params["backbone"] if "backbone" in lm_params else (
        backbone_params_from_lm(lm_params))
    init_params = {"backbone": backbone, "head": lm_params["head"] if "head" in lm_params
                   else state_lib.unboxed_init(model, rng_init, dummy, path=("head",))}
    del lm_params, backbone  # (a random head: only it is computed, `unboxed_init`)

  tx, schedule = optim.make_optimizer(config.optimizer, config.num_steps)
  state, shardings, frozen = state_lib.create_train_state(
      lambda r: model.init(r, dummy)["params"], tx, mesh, rng_init, init_params, config=config,
      always_trained=("head",), workdir=workdir)
  del init_params  # the host copy of the weights: on the devices now
  checkpointer, start, state = setup.open_run(config, workdir, state, shardings, mcfg,
                                               tokenizer)

  batch_sharding = parallel.batch_sharding(mesh)
  train_step = state_lib.jit_step(
      make_train_step(model, tx, config.prm.negative_weight, frozen, config.grad_accum_steps),
      shardings, batch_sharding, metrics_sharding=parallel.replicated(mesh), donate=True)
  logits_fn = jax.jit(lambda p, b: step_logits(model, p, b),
                      in_shardings=(frozen.model_shardings(shardings), batch_sharding))

  def evaluate(params, step):
    full = frozen.full(params)
    n = len(eval_arrays["tokens"])
    bs = min(config.batch_size, n)
    extra = (-n) % bs  # fixed shapes: the last batch padded with copies, dropped after
    padded = {k: np.concatenate([eval_arrays[k], eval_arrays[k][:extra]]) for k in
              ("tokens", "segment_ids")}
    logits = []
    for i in range(0, n + extra, bs):
      out = np.asarray(logits_fn(full, parallel.shard_batch(
          pad({k: v[i:i + bs] for k, v in padded.items()}, "eval"), mesh)))
      logits.append(np.pad(out, ((0, 0), (0, d.max_len - out.shape[1]))))  # padding: masked
    return step_metrics(np.concatenate(logits)[:n], eval_arrays)

  static_metrics = {f"data_{k}": v for k, v in {**data_stats, **tok_stats}.items()
                    if isinstance(v, (int, float))}
  return loop.train_loop(
      config, workdir, state=state, start=start,
      train_step=train_step, get_batch=lambda i: pad(train_ds[i]),
      mesh=mesh, checkpointer=checkpointer, schedule=schedule,
      evaluate=evaluate if eval_arrays is not None else None, desc="prm",
      progress_keys=("loss", "step_accuracy", "eval_balanced_accuracy"),
      count_tokens=lambda b: b["segment_ids"].sum(), extra_metrics=static_metrics,
      compute=lambda b: compute_counts(mcfg, b))


def compute_counts(mcfg, batch) -> dict:
  """One step's FLOPs and tokens (`rlhf_jax.flops`): forward + backward over the
  padded [B, T] rows with the scalar head (2 D per position) in place of the
  unembedding (T: this step's padded length under data.pad_to); tokens/trained = the
  real tokens."""
  B, T = batch["tokens"].shape
  update, remat = flops_lib.train_flops(mcfg, B, T, head_flops=2 * mcfg.d_model)
  return {"flops/update": update, "flops/remat": remat,
          "tokens/trained": int((batch["segment_ids"] > 0).sum()), "samples/completions": B}


def validate(config, num_devices: int | None = None) -> None:
  """The checks of a PRM config that need no files: the shared sections
  (`rlhf_jax.config.validate`) and batch_size split over the data-parallel devices
  (num_devices=None: the config alone). ConfigError naming the key."""
  config_lib.validate(config, num_devices)
  config_lib.check_batch_split(config, num_devices)
