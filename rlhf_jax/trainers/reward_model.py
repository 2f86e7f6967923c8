"""Reward-model trainer: `run(config, workdir)`.

A decoder backbone + scalar head (`rlhf_jax.models.heads.ScalarModel`) scores
a (prompt, reply) sequence at its last non-pad token. Trained on preference
pairs with the Bradley-Terry loss (Bradley & Terry 1952; Ouyang et al. 2022)

    L = -log sigmoid(r(x, y_c) - r(x, y_r) - margin) + center_coef * (r_c + r_r)^2

(`rlhf_jax.losses.reward.bradley_terry_loss`; the centring term is from
Eisenstein et al. 2023). Chosen and rejected go through one forward pass as a
[2B, T] batch. Metrics: loss, accuracy, margin; eval_accuracy on held-out
pairs. The workdir's params {"backbone", "head"} + model_config.json +
tokenizer are what `load_reward_model` reads, for use as a reward function
(a LoRA run's adapters merged in: with config.lora.rank > 0 the backbone gets LoRA
adapters and the scalar head is trained fully).
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import checkpoint as ckpt_lib
from rlhf_jax import config as config_lib
from rlhf_jax import flops as flops_lib
from rlhf_jax import parallel
from rlhf_jax.data import lengths
from rlhf_jax.data import sft as sft_data
from rlhf_jax.losses.reward import bradley_terry_loss
from rlhf_jax.models.heads import ScalarModel, backbone_params_from_lm, last_token_score
from rlhf_jax import workdir as workdir_lib
from rlhf_jax.data import pairs
from rlhf_jax.trainers import loop
from rlhf_jax.trainers import optim
from rlhf_jax.trainers import setup
from rlhf_jax.trainers import state as state_lib
from rlhf_jax.trainers import step as step_lib


def pair_scores(model, params, batch):
  """(r_chosen_B, r_rejected_B): scores at the last real token of each side."""
  tokens = jnp.concatenate([batch["chosen_tokens"], batch["rejected_tokens"]])
  seg = jnp.concatenate([batch["chosen_segment_ids"], batch["rejected_segment_ids"]])
  r_2B = last_token_score(model.apply({"params": params}, tokens, seg), seg)
  return jnp.split(r_2B, 2)


def make_train_step(model, tx, center_coef: float, use_margin: bool, frozen=None,
                    grad_accum_steps: int = 1):
  """train_step(state, batch) -> (state, metrics) (`step_lib.make_step`); with
  grad_accum_steps = A > 1 the pairs are split into A equal micro-batches whose
  gradients and metrics are averaged (the loss is a mean over pairs, so the update is
  the whole-batch one)."""
  def loss_fn(params, batch):
    r_c, r_r = pair_scores(model, params, batch)
    margin = batch["margin"] if use_margin else None
    return bradley_terry_loss(r_c, r_r, margin, center_coef)

  return step_lib.make_step(loss_fn, tx, grad_accum_steps, step_lib.rows_weight, frozen=frozen)


def make_eval_step(model):
  def eval_step(params, batch):
    r_c, r_r = pair_scores(model, params, batch)
    correct = jnp.where(r_c > r_r, 1.0, jnp.where(r_c == r_r, 0.5, 0.0))
    r = jnp.concatenate([r_c, r_r])
    return jnp.sum(correct), jnp.sum(r_c - r_r), jnp.sum(r), jnp.sum(r * r)
  return eval_step


def pair_accuracy(eval_step, params, arrays, batch_size, mesh, pad=None):
  """(accuracy (ties count 1/2), mean margin, score mean, score std) over every pair in
  `arrays` (the score statistics over both replies of every pair); `pad`
  (`data.lengths.Padding`) cuts each batch to its data.pad_to length."""
  pad = pad or (lambda b, what=None: b)
  n = len(arrays["margin"])
  correct = margin = s1 = s2 = 0.0
  for i in range(0, n - n % batch_size, batch_size):
    b = {k: v[i:i + batch_size] for k, v in arrays.items()}
    c, m, a, a2 = eval_step(params, parallel.shard_batch(pad(b, "eval"), mesh))
    correct, margin, s1, s2 = correct + float(c), margin + float(m), s1 + float(a), s2 + float(a2)
  used = max(n - n % batch_size, 1)
  mean = s1 / (2 * used)
  return (correct / used, margin / used, mean,
          float(np.sqrt(max(s2 / (2 * used) - mean * mean, 0.0))))


def load_reward_model(workdir: str):
  """(ModelConfig, params, tokenizer) of a trained reward model's workdir."""
  from rlhf_jax import tokenizer as tok_lib
  if not workdir_lib.is_workdir(workdir):
    raise ckpt_lib.CheckpointError(f"{workdir}: not a reward model's run directory (expected "
                                   f"model_config.json and checkpoints/ from rlhf-jax train)")
  # A LoRA run's adapters merged; checked: a reward model with the shapes of its config.
  mcfg, params = workdir_lib.read_workdir_model(workdir, families=workdir_lib.LM_OR_RM[1:])
  return mcfg, params, tok_lib.load_tokenizer(workdir)


def evaluate_reward_model(workdir: str, data_path: str, source: str = "jsonl",
                          batch_size: int = 32, data_dir: str | None = None) -> dict:
  """Pairwise accuracy (ties 1/2) and mean margin of the reward model in `workdir`.

  source: "jsonl" ({"prompt","chosen","rejected"} rows) or "hh_rlhf" (an HH-RLHF
  .jsonl(.gz) file). Prompt/completion lengths are those the model was trained
  with. The data set is built into `data_dir` (default: a temporary directory).
  """
  import tempfile

  from ml_collections import ConfigDict

  from rlhf_jax.data import preferences as prefs
  if data_dir is None:
    with tempfile.TemporaryDirectory(prefix="rlhf_jax_eval_rm_") as tmp:
      return evaluate_reward_model(workdir, data_path, source, batch_size, tmp)
  with open(os.path.join(workdir, "config.json")) as f:
    train_cfg = json.load(f)
  mcfg, params, tokenizer = load_reward_model(workdir)
  if source == "jsonl":
    builder = prefs.build_jsonl_preferences({"eval": data_path}, data_dir,
                                            name=pairs._name(data_path))
  elif source == "hh_rlhf":
    builder = prefs.build_hh_rlhf(data_dir, files={"eval": data_path},
                                  config_name=pairs._name(data_path))
  else:
    raise ValueError(f"--format={source!r}: expected jsonl or hh_rlhf")
  cfg = ConfigDict({"data": {k: train_cfg["data"][k]
                             for k in ("max_prompt_len", "max_completion_len")}})
  arrays, _ = pairs.tokenize(cfg, tokenizer, prefs.load_preferences(builder, "eval"))
  n = len(arrays["margin"])
  batch_size = min(batch_size, n)
  pad = (-n) % batch_size  # fixed shapes: the last batch is padded, padded rows dropped
  padded = {k: np.concatenate([v, v[:pad]]) for k, v in arrays.items()}
  model = ScalarModel(mcfg)
  score = jax.jit(lambda p, b: pair_scores(model, p, b))
  r_c, r_r = zip(*[score(params, {k: v[i:i + batch_size] for k, v in padded.items()})
                   for i in range(0, n + pad, batch_size)])
  r_c, r_r = np.concatenate(r_c)[:n], np.concatenate(r_r)[:n]
  correct = np.where(r_c > r_r, 1.0, np.where(r_c == r_r, 0.5, 0.0))
  return {"accuracy": float(correct.mean()), "mean_margin": float((r_c - r_r).mean()),
          "pairs": n}


def run(config, workdir: str) -> dict:
  validate(config, jax.device_count())
  os.makedirs(workdir, exist_ok=True)
  mesh = parallel.make_mesh(config.mesh.shape)

  # Data and tokenizer.
  train_src, eval_src, data_stats = pairs.load_pairs(config, workdir)
  tokenizer = setup.build_tokenizer(config, workdir, lambda: pairs.corpus(train_src))
  train_arrays, tok_stats = pairs.tokenize(config, tokenizer, train_src)
  train_ds = sft_data.batched(train_arrays, config.batch_size, config.seed)
  eval_arrays = pairs.tokenize(config, tokenizer, eval_src)[0] if eval_src is not None else None
  eval_batch = min(config.batch_size, len(eval_arrays["margin"])) if eval_arrays else 0
  # data.pad_to: each batch cut to its length (`data.lengths`).
  pad = lengths.from_config(config.data, lengths.row_lengths(train_arrays), config.batch_size,
                            train_arrays["chosen_tokens"].shape[1], verbose=parallel.is_primary())

  # Model: backbone from init_from (an LM, an SFT run, or a reward model), fresh head.
  rng_init = jax.random.PRNGKey(config.seed)
  init_params = None
  mcfg, lm_params = setup.policy_init(config, tokenizer, workdir_lib.LM_OR_RM)
  model = ScalarModel(mcfg)
  dummy = jnp.zeros((1, 2), jnp.int32)
  if lm_params is not None:
    backbone = lm_params["backbone"] if "backbone" in lm_params else (
        backbone_params_from_lm(lm_params))
    init_params = {"backbone": backbone, "head": lm_params["head"] if "head" in lm_params
                   else state_lib.unboxed_init(model, rng_init, dummy, path=("head",))}
    del lm_params, backbone  # (a random head: only it is computed, `unboxed_init`)

  # With config.lora.rank > 0: LoRA adapters on the backbone, the scalar head trained fully.
  tx, schedule = optim.make_optimizer(config.optimizer, config.num_steps)
  state, shardings, frozen = state_lib.create_train_state(
      lambda r: model.init(r, dummy)["params"], tx, mesh, rng_init, init_params, config=config,
      always_trained=("head",), workdir=workdir)
  del init_params  # the host copy of the weights: on the devices now
  checkpointer, start, state = setup.open_run(config, workdir, state, shardings, mcfg,
                                               tokenizer)

  batch_sharding = parallel.batch_sharding(mesh)
  train_step = state_lib.jit_step(
      make_train_step(model, tx, config.rm.center_coef, config.rm.use_margin, frozen,
                      config.grad_accum_steps),
      shardings, batch_sharding, metrics_sharding=parallel.replicated(mesh), donate=True)
  eval_step = jax.jit(make_eval_step(model),
                      in_shardings=(frozen.model_shardings(shardings), batch_sharding))

  def evaluate(params, step):
    acc, margin, mean, std = pair_accuracy(eval_step, frozen.full(params), eval_arrays,
                                           eval_batch, mesh, pad)
    return {"eval_accuracy": acc, "eval_margin": margin, "eval_score_mean": mean,
            "eval_score_std": std}

  static_metrics = {f"data_{k}": v for k, v in {**data_stats, **tok_stats}.items()}

  def get_batch(i):
    return pad(train_ds[i])

  result = loop.train_loop(
      config, workdir, state=state, start=start,
      train_step=train_step, get_batch=get_batch,
      mesh=mesh, checkpointer=checkpointer, schedule=schedule,
      evaluate=evaluate if eval_arrays is not None else None, desc="reward_model",
      progress_keys=("loss", "accuracy", "eval_accuracy"),
      count_tokens=lambda b: b["chosen_segment_ids"].sum() + b["rejected_segment_ids"].sum(),
      extra_metrics=static_metrics, compute=lambda b: compute_counts(mcfg, b))
  return result


def compute_counts(mcfg, batch) -> dict:
  """One step's FLOPs and tokens (`rlhf_jax.flops`): forward + backward over the
  padded [2B, T] chosen + rejected rows with the scalar head (2 D per position) in place
  of the unembedding (T: this step's padded length under data.pad_to); tokens/trained =
  their real tokens."""
  B, T = batch["chosen_tokens"].shape
  update, remat = flops_lib.train_flops(mcfg, 2 * B, T, head_flops=2 * mcfg.d_model)
  seg = (batch["chosen_segment_ids"] > 0).sum() + (batch["rejected_segment_ids"] > 0).sum()
  return {"flops/update": update, "flops/remat": remat, "tokens/trained": int(seg),
          "samples/completions": 2 * B}


def validate(config, num_devices: int | None = None) -> None:
  """The checks of a reward-model config that need no files: the shared sections
  (`rlhf_jax.config.validate`), the rm section, and batch_size split over the data-parallel
  devices (num_devices=None: the config alone). ConfigError naming the key."""
  config_lib.validate(config, num_devices)
  if "rm" in config:
    config_lib.Checks(config).num("rm.center_coef", 0.0)
  config_lib.check_batch_split(config, num_devices)
