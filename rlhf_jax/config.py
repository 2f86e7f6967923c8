"""Config defaults, validation and helpers shared by every trainer.

Every knob lives in one `ml_collections.ConfigDict`; `base_config` holds the
defaults (the tiny CPU run) with a comment per knob, `configs/<algo>.py`
presets change what they need. Unknown or mistyped keys fail with one message
that names the key and suggests the closest valid one.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import runpy
from typing import Iterable

from ml_collections import ConfigDict

from rlhf_jax.models.transformer import ModelConfig


class ConfigError(ValueError):
  """A config key or value that cannot work; the message names it."""


def load_config(spec: str) -> ConfigDict:
  """`path/to/file.py[:preset]` -> the ConfigDict of the file's get_config(preset);
  ConfigError naming the file / preset when it cannot be loaded."""
  path, _, preset = spec.partition(":")
  if not os.path.isfile(path):
    raise ConfigError(f"--config: file not found: {path}")
  try:
    module = runpy.run_path(path)
  except Exception as e:  # the config file is user code: name it, not our traceback
    raise ConfigError(f"--config: cannot load {path}: {type(e).__name__}: {e}") from None
  if "get_config" not in module:
    raise ConfigError(f"--config: {path} defines no get_config()")
  try:
    config = module["get_config"](preset) if preset else module["get_config"]()
  except ValueError as e:
    raise ConfigError(f"--config={spec}: {e}") from None
  except Exception as e:
    raise ConfigError(f"--config={spec}: get_config() raised {type(e).__name__}: {e}") from None
  if not isinstance(config, ConfigDict):
    raise ConfigError(f"--config={spec}: get_config() returned {type(config).__name__}, "
                      f"expected an ml_collections ConfigDict")
  return config


def base_config(trainer: str) -> ConfigDict:
  c = ConfigDict()
  c.trainer = trainer          # which rlhf_jax.trainers.<name>.run to call
  c.seed = 0                   # parameter init, data order and sampling all derive from it
  c.init_from = ""             # HF dir / .gguf / `rlhf-jax import` dir; "" = random init

  # Model architecture (ignored when init_from is set, except dtype and remat).
  m = dataclasses.asdict(ModelConfig())
  m.update(vocab_size=0,       # 0 = the tokenizer's vocabulary size
           d_model=96, n_layers=4, n_heads=6, n_kv_heads=2, head_dim=16, d_ff=256,
           max_seq_len=64, rope_scaling=())  # () = no RoPE scaling
  c.model = ConfigDict(m)

  c.tokenizer = ConfigDict(dict(
      path="",                 # .model / tokenizer dir / .gguf; "" = init_from's, else train one
      vocab_size=48,           # when training a SentencePiece model on the training data
      model_type="bpe",        # SentencePiece model type: bpe | unigram | char
      chat_style="",           # plain | chatml | llama3 | "" = the tokenizer's own (else plain)
  ))

  if trainer == "sft":
    c.data = sft_data_config()
  elif trainer in ("grpo", "ppo"):
    c.data = prompt_data_config()
    c.rollout = rollout_config()
    c.reward = ConfigDict(dict(
        spec="math",           # reward functions: a name, or JSON like
                               # '[{"name": "math"}, {"name": "missing_eos", "weight": 0.5}]'
                               # (see rlhf_jax/rewards/__init__.py)
    ))
    c.eval_prompts = 128       # held-out prompts decoded greedily at each eval
    c.data.synthetic_digits = 1
    c.rollout.max_new_tokens = 4
  elif trainer == "prm":
    c.data = prm_data_config()
  else:
    c.data = preference_data_config()

  c.batch_size = 32            # global batch (rows) per optimizer step
  c.grad_accum_steps = 1       # micro-batches per step; batch_size must divide evenly
  c.num_steps = 400            # optimizer steps
  c.max_bad_steps = 3          # stop after this many non-finite (NaN/Inf) updates IN A ROW;
                               # each one is skipped (params and optimizer state kept) and
                               # counted in skipped_updates; 0 = never stop

  c.optimizer = ConfigDict(dict(
      lr=3e-3,                 # peak learning rate (AdamW)
      warmup_steps=40,         # linear warmup from 0
      final_lr_ratio=0.1,      # cosine decay to lr * final_lr_ratio at num_steps
      b1=0.9, b2=0.95, eps=1e-8,
      weight_decay=0.01,       # decoupled; not applied to norms and biases
      grad_clip_norm=1.0,      # global-norm clipping; 0 = off
  ))

  c.mesh = ConfigDict(dict(shape=(-1, 1, 1)))  # (data, fsdp, tensor); -1 = fill
                               # over ALL processes' devices (jax.devices())

  # Multi-host (JAX multi-controller runtime; rlhf_jax/parallel.py:initialize_distributed).
  c.distributed = ConfigDict(dict(
      enabled=False,           # call jax.distributed.initialize before anything touches jax
      coordinator_address="",  # "host:port" of process 0; "" = auto-detect (TPU VM, SLURM,
                               # Open MPI) or $RLHF_JAX_COORDINATOR_ADDRESS
      num_processes=0,         # 0 = auto-detect or $RLHF_JAX_NUM_PROCESSES
      process_id=-1,           # -1 = auto-detect or $RLHF_JAX_PROCESS_ID
      cpu_collectives="",      # CPU only: "gloo" for cross-process collectives ("" = JAX's default)
  ))

  # LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models";
  # rlhf_jax/models/lora.py): W' = W + (alpha / rank) * A @ B on the target projections.
  c.lora = ConfigDict(dict(
      rank=0,                  # 0 = off (full fine-tuning); e.g. 8
      alpha=16.0,              # scale = alpha / rank
      dropout=0.0,             # dropout on the adapter input (training only)
      target_modules=("q", "k", "v", "o"),  # of q k v o gate up down
      trainable=(),            # other top-level params trained fully, e.g. ("head",) for a
                               # reward/value head (a scalar head is always trained)
  ))

  c.log_every = 20             # steps between metrics.jsonl / TensorBoard rows
  c.logging = ConfigDict(dict(   # optional metric sinks besides metrics.jsonl + TensorBoard
      wandb_project="",        # Weights & Biases project ("" = off; pip install 'rlhf_jax[wandb]')
      wandb_entity="",         # W&B entity (team / user); "" = the default one
      wandb_name="",           # run name; "" = the workdir's name
      wandb_mode="online",     # online | offline (files under WORKDIR/wandb) | disabled
  ))
  c.eval_every = 100           # steps between eval loss (and samples); 0 = never
  c.eval_batches = 8           # max eval batches per evaluation

  c.checkpoint = ConfigDict(dict(
      every=100,               # steps between checkpoints (always one at the end)
      keep=3,                  # newest checkpoints kept
      async_save=True,         # write in a background thread
  ))
  if trainer in ("grpo", "ppo"):  # online-RL defaults: the tiny CPU runs
    c.num_steps = 120
    c.optimizer.update(lr=3e-4, warmup_steps=0, final_lr_ratio=1.0, weight_decay=0.0)
    c.log_every = 5
    c.eval_every = 20
    c.checkpoint.every = 20
  if trainer != "reward_model":  # policy evaluation (rlhf_jax/evaluation.py)
    c.eval_kl = True           # also sample eval completions (T=1): eval_kl = KL(pi || initial
                               # policy) per sequence, eval_sampled_reward/<label>
    c.eval_samples = 4         # sampled completions per eval prompt (eval_kl, eval_sampled_*)
    c.eval_seed = 0            # eval sampling key = f(eval_seed) only, NOT the run's seed or
                               # step: all evals share it (common random numbers)
    c.eval_reward_spec = ""    # rewards scoring eval completions, e.g. gold + proxy:
                               # '[{"name": "math", "label": "gold"}, {"name": "reward_model",
                               # "label": "proxy", "workdir": "runs/rm"}]'; "" = reward.spec
                               # (RL) / "math" (SFT, DPO)
    c.capability = ConfigDict(dict(
        path="",               # JSONL {"prompt","completion"} of a skill NOT optimised (the
                               # alignment tax): capability_nll, capability_exact_match
        num_examples=128,      # first rows used
        max_new_tokens=16,     # greedy decoding budget for exact match
    ))
  if trainer in ("sft", "dpo"):
    c.prompt_eval = ConfigDict(dict(
        path="",               # JSONL {"prompt","answer"} held-out prompts decoded at each
                               # eval (eval_reward/*, eval_accuracy, eval_kl); "" = off
        num_prompts=128,
        max_prompt_len=16,     # prompts LEFT-truncated / left-padded to this many tokens
        max_new_tokens=8,
    ))
  if trainer != "reward_model":
    c.sample = ConfigDict(dict(
        every=100,               # steps between samples.jsonl dumps; 0 = never
        num_prompts=4,           # eval prompts sampled each time
        max_new_tokens=16,
        temperature=0.0,         # 0 = greedy
    ))
    if trainer in ("grpo", "ppo"):
      c.sample.num_prompts = 8
  return c


def sft_data_config() -> ConfigDict:
  return ConfigDict(dict(
      train_path="",           # JSONL {"prompt","completion"} or {"messages"}; "" = synthetic
      eval_path="",            # JSONL in the same format; "" = synthetic (or none)
      synthetic_task="reverse",  # reverse | sort | add (see rlhf_jax/data/synthetic.py)
      synthetic_max_len=8,     # reverse/sort: string length 3..max_len; add: max_len/2 digits
      synthetic_train_examples=4000,
      synthetic_eval_examples=256,
      max_seq_len=32,          # tokens per row (prompt + completion + BOS/EOS)
      overlength="error",      # error | truncate | drop: what to do with longer examples
      packing=False,           # pack several examples per row (segment-masked attention)
      loss_on_prompt=False,    # True: loss on every token after BOS (LM pre-training on the
                               # rendered text), not only the completion
  ))


def prompt_data_config() -> ConfigDict:
  """Prompts (with optional reference answers) for online RL."""
  return ConfigDict(dict(
      source="synthetic",      # synthetic | jsonl | gsm8k
      train_path="",           # jsonl: {"prompt", "answer"?}; gsm8k: official {"question","answer"}
      eval_path="",            # held-out prompts of the same kind ("" = none / synthetic)
      data_dir="",             # TFDS data_dir ("" = WORKDIR/tfds)
      synthetic_task="add",    # add | arithmetic | word (rlhf_jax/data/synthetic.py)
      synthetic_digits=2,      # operand digits (difficulty)
      synthetic_train_examples=4000,
      synthetic_eval_examples=256,
      max_prompt_len=16,       # prompts LEFT-truncated, left-padded to this length
      skip_malformed=False,
  ))


def rollout_config() -> ConfigDict:
  return ConfigDict(dict(
      prompts_per_step=16,     # prompts per RL step
      group_size=8,            # completions sampled per prompt (G)
      max_new_tokens=8,        # generation budget per completion
      temperature=1.0,         # sampling temperature (also used for the policy's log-probs)
      top_k=0,                 # 0 = off
      top_p=1.0,               # 1 = off
      generate_micro_batch=128,  # rows per sampler call (divides prompts_per_step*group_size)
      logprob_micro_batch=128,   # rows per old/ref log-prob forward pass
      train_micro_batch=0,       # rows per gradient micro-batch in an update (0 = the whole
                                 # minibatch); gradients are accumulated exactly
  ))


def preference_data_config() -> ConfigDict:
  """Pairwise preference data (reward models, the DPO family)."""
  return ConfigDict(dict(
      source="synthetic",      # synthetic | jsonl | hh_rlhf
      train_path="",           # jsonl: {"prompt","chosen","rejected"[,"margin"]} file;
                               # hh_rlhf: a .jsonl(.gz) file or a dir with <subset>/<split>.jsonl.gz
      eval_path="",            # held-out pairs, same kind as train_path ("" = none / synthetic)
      hh_subset="harmless-base",  # hh_rlhf: which subset directory under train_path
      data_dir="",             # TFDS data_dir for built datasets; "" = WORKDIR/tfds
      synthetic_task="reverse",  # synthetic: chosen = correct answer, rejected = corrupted
      synthetic_corruption="random",  # random: another string of the same length; swap:
                                      # two characters swapped (harder to tell apart)
      synthetic_train_examples=4000,
      synthetic_eval_examples=256,
      max_prompt_len=24,       # prompts are LEFT-truncated to this many tokens
      max_completion_len=12,   # completions are RIGHT-truncated (EOS dropped when cut)
      skip_malformed=False,    # False: a bad row stops with file:line; True: skip and count
  ))


def prm_data_config() -> ConfigDict:
  """Step-labelled solutions for the process reward model (rlhf_jax/data/prm.py)."""
  return ConfigDict(dict(
      source="gsm8k",          # gsm8k: official {"question","answer"} files, steps labelled by
                               # checking the <<expr=value>> annotations, plus corrupted copies;
                               # jsonl: {"prompt","steps","labels"} rows
      train_path="",           # the train file of `source`
      eval_path="",            # held-out file of the same kind ("" = none)
      max_train_examples=0,    # first solutions used (0 = all)
      max_eval_examples=0,
      corrupt=True,            # gsm8k: add a corrupted copy of every solution (the negatives)
      max_prompt_len=32,       # prompts LEFT-truncated to this many tokens
      max_len=128,             # tokens per row (prompt + steps); steps ending beyond are dropped
  ))


# ----------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------

def _all_keys(config: ConfigDict, prefix: str = "") -> list[str]:
  keys = []
  for k, v in config.items():
    path = f"{prefix}{k}"
    keys.append(path)
    if isinstance(v, ConfigDict):
      keys.extend(_all_keys(v, path + "."))
  return keys


def check_key(config: ConfigDict, key: str, flag: str = "config") -> None:
  """Raise ConfigError naming `key` (dotted) and the closest valid key if absent."""
  valid = _all_keys(config)
  if key in valid:
    return
  close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
  if not close:  # try the last component alone: "optimizer.lrr" -> "optimizer.lr"
    parent, _, leaf = key.rpartition(".")
    siblings = [k.rpartition(".")[2] for k in valid if k.rpartition(".")[0] == parent]
    m = difflib.get_close_matches(leaf, siblings, n=1, cutoff=0.5)
    close = [f"{parent}.{m[0]}" if parent else m[0]] if m else []
  hint = f"; did you mean --{flag}.{close[0]}?" if close else ""
  raise ConfigError(f"unknown config key '{flag}.{key}'{hint}")


_OVERRIDE = re.compile(r"^--?(config)\.([A-Za-z0-9_.]+)(=.*)?$")


def check_overrides(argv: Iterable[str], config: ConfigDict) -> None:
  """Validate every `--config.a.b=...` flag in argv against `config`'s keys."""
  for arg in argv:
    m = _OVERRIDE.match(arg)
    if m:
      check_key(config, m.group(2), m.group(1))


_FLAG_ERROR = re.compile(r"^flag --config\.([A-Za-z0-9_.]+)=(.*?): (.*)$", re.S)


def explain_flag_error(message: str, config: ConfigDict) -> str:
  """One line for an absl flag-parsing error: a `--config.KEY=VALUE` whose value is not of
  the key's type names the key, the expected type and the default."""
  m = _FLAG_ERROR.match(message)
  if not m:
    return message.splitlines()[0]
  key, value, detail = m.groups()
  node = config
  try:
    for part in key.split("."):
      node = node[part]
  except (KeyError, AttributeError, TypeError):
    return message.splitlines()[0]
  kind = ("section" if isinstance(node, ConfigDict) else
          {bool: "bool", int: "int", float: "float", str: "str"}.get(type(node),
                                                                     type(node).__name__))
  default = "a ConfigDict section" if kind == "section" else repr(node)
  hint = " (true/false)" if kind == "bool" else ""
  return (f"config.{key}: expected {kind}{hint} (default {default}), got {value!r} "
          f"({detail.splitlines()[0]})")


def _get(config: ConfigDict, key: str):
  node = config
  for part in key.split("."):
    node = node[part]
  return node


def _is_num(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def validate(config: ConfigDict, num_devices: int | None = None) -> None:
  """Every check that needs only the config (and the device count): value ranges,
  choices and combinations of keys, for all trainers. Raises ConfigError naming the key.

  Trainers call it first, before anything is read or written, with `num_devices` =
  jax.device_count(): mesh.shape must fit them and every batch split evenly over its
  data-parallel devices. num_devices=None checks the config alone: no device checks, and
  data paths a run needs may still be unset (e.g. a size preset for other hardware, before
  --config.data.train_path is given).
  """
  def need(ok, key, msg):
    if not ok:
      raise ConfigError(f"config.{key}: {msg}")

  def num(key, lo=None, hi=None, lo_open=False, hi_open=False, integer=False):
    v = _get(config, key)
    kind = "an integer" if integer else "a finite number"
    ok = (isinstance(v, int) and not isinstance(v, bool)) if integer else _is_num(v)
    need(ok, key, f"expected {kind}, got {v!r}")
    if lo is not None:
      need(v > lo if lo_open else v >= lo, key, f"must be {'>' if lo_open else '>='} {lo}, got {v}")
    if hi is not None:
      need(v < hi if hi_open else v <= hi, key, f"must be {'<' if hi_open else '<='} {hi}, got {v}")
    return v

  def choice(key, options):
    v = _get(config, key)
    if v not in options:
      raise ConfigError(f"config.{key}={v!r}: expected one of {'|'.join(map(str, options))}")
    return v

  def has(key):  # a key that only some trainers' configs have
    head, _, rest = key.partition(".")
    return head in config and (not rest or rest in config[head])

  # Run length, batch, optimizer.
  num("seed", 0, integer=True)
  need(config.num_steps > 0, "num_steps", f"must be > 0, got {config.num_steps}")
  need(config.batch_size > 0, "batch_size", f"must be > 0, got {config.batch_size}")
  need(config.grad_accum_steps >= 1, "grad_accum_steps", "must be >= 1")
  need(config.batch_size % config.grad_accum_steps == 0, "grad_accum_steps",
       f"batch_size={config.batch_size} is not divisible by grad_accum_steps="
       f"{config.grad_accum_steps}")
  lr = config.optimizer.lr
  need(_is_num(lr) and lr > 0, "optimizer.lr", f"must be > 0 and finite, got {lr}")
  need(0 <= config.optimizer.warmup_steps <= config.num_steps, "optimizer.warmup_steps",
       f"must be in [0, num_steps={config.num_steps}], got {config.optimizer.warmup_steps}")
  num("optimizer.final_lr_ratio", 0.0)
  num("optimizer.b1", 0.0, 1.0, hi_open=True)
  num("optimizer.b2", 0.0, 1.0, hi_open=True)
  num("optimizer.eps", 0.0)
  num("optimizer.weight_decay", 0.0)
  num("optimizer.grad_clip_norm", 0.0)
  num("max_bad_steps", 0, integer=True)

  # Logging, evaluation, checkpoints, samples.
  need(config.log_every > 0, "log_every", "must be > 0")
  if "logging" in config:
    choice("logging.wandb_mode", ("online", "offline", "disabled"))
    for key in ("wandb_project", "wandb_entity", "wandb_name"):
      need(isinstance(config.logging[key], str), f"logging.{key}",
           f"expected a string, got {config.logging[key]!r}")
  num("eval_every", 0, integer=True)
  num("eval_batches", 1, integer=True)
  num("checkpoint.every", 0, integer=True)
  need(config.checkpoint.keep >= 1, "checkpoint.keep", "must be >= 1")
  if "sample" in config:
    num("sample.every", 0, integer=True)
    num("sample.num_prompts", 0, integer=True)
    num("sample.max_new_tokens", 1, integer=True)
    num("sample.temperature", 0.0)
  if "eval_samples" in config:
    num("eval_samples", 1, integer=True)
  if "eval_prompts" in config:
    num("eval_prompts", 0, integer=True)
  if has("capability.path") and config.capability.path:
    num("capability.num_examples", 1, integer=True)
    num("capability.max_new_tokens", 1, integer=True)
  if "prompt_eval" in config:
    num("prompt_eval.num_prompts", 1, integer=True)
    num("prompt_eval.max_prompt_len", 1, integer=True)
    num("prompt_eval.max_new_tokens", 1, integer=True)
  for key in ("reward.spec", "eval_reward_spec"):
    if has(key) and _get(config, key):
      from rlhf_jax.rewards import check_reward_spec
      try:
        check_reward_spec(_get(config, key))
      except ValueError as e:
        raise ConfigError(f"config.{key}: {e}") from None

  # Tokenizer (the knobs of a trained one matter only when none is given).
  need(config.tokenizer.chat_style in ("", "plain", "chatml", "llama3"),
       "tokenizer.chat_style",
       f"expected plain|chatml|llama3 or '' (auto), got {config.tokenizer.chat_style!r}")
  if not config.tokenizer.path and not config.init_from:
    choice("tokenizer.model_type", ("bpe", "unigram", "char", "word"))
    num("tokenizer.vocab_size", 8, integer=True)

  # Model (its architecture counts only without init_from) and LoRA.
  model = _validate_model(config, need, num)
  _validate_attention(config, need, platform_known=num_devices is not None)
  if config.get("lora") is not None and config.lora.rank:
    from rlhf_jax.models.lora import LoraConfig
    try:
      LoraConfig.from_config(config.lora)
    except (TypeError, ValueError) as e:
      raise ConfigError(str(e) if str(e).startswith("config.") else f"config.lora: {e}") from None

  # Data.
  _validate_data(config, model, need, num, choice, for_run=num_devices is not None)

  # Algorithms.
  rows = _validate_mesh(config, num_devices, need)  # 1 when num_devices is None
  if "dpo" in config:
    _validate_dpo(config, need, num, choice)
  if "rm" in config:
    num("rm.center_coef", 0.0)
  if "rollout" in config:
    _validate_online_rl(config, model, rows, need, num, choice)
  if config.trainer in ("sft", "reward_model", "dpo", "prm"):
    need(config.batch_size % rows == 0, "batch_size",
         f"{config.batch_size} is not divisible by the data-parallel size {rows} "
         f"(mesh.shape data * fsdp); every device needs the same number of rows")


def attention_mask_kinds(config: ConfigDict) -> set[str]:
  """The attention mask kinds a run uses (`rlhf_jax.models.attention.MASK_KINDS`):
  causal always, cached decoding (every trainer can write samples; GRPO/PPO sample),
  the shared prefix where dpo.share_prompt / grpo.share_prompt packs rows."""
  kinds = {"causal", "cached"}
  for key in ("dpo", "grpo"):
    if key in config and config[key].get("share_prompt", False):
      kinds.add("shared_prefix")
  return kinds


def _validate_attention(config, need, platform_known: bool):
  """model.attention: a backend that expresses every mask kind the run uses, and (when
  the devices are known) runs on them."""
  from rlhf_jax.models import attention
  backend = config.model.get("attention", "auto")
  need(backend in attention.BACKENDS, "model.attention",
       f"expected one of {'|'.join(attention.BACKENDS)}, got {backend!r}")
  chunk = config.model.get("logits_chunk", 0)
  need(isinstance(chunk, int) and not isinstance(chunk, bool) and chunk >= 0,
       "model.logits_chunk", f"expected an int >= 0 (tokens per chunk; 0 = off), got {chunk!r}")
  for kind in sorted(attention_mask_kinds(config)):
    if not attention.supports(backend, kind):
      share = "dpo" if "dpo" in config else "grpo"
      raise ConfigError(
          f"config.model.attention={backend!r} cannot express the {kind} attention mask "
          f"that {share}.share_prompt=True uses; set --config.{share}.share_prompt=False "
          f"or --config.model.attention=auto (splash for the causal passes, another backend "
          f"for the shared prefix)")
  need(backend != "cudnn" or config.model.dtype in ("bfloat16", "float16"), "model.attention",
       f"'cudnn' needs bfloat16 or float16 compute (cuDNN has no float32 flash attention), "
       f"got model.dtype={config.model.dtype!r}; use 'auto' or 'chunked'")
  if platform_known and backend != "auto":
    import jax
    need(attention.available(backend), "model.attention",
         f"{backend!r} does not run on this {jax.default_backend()!r} backend (cudnn: GPU, "
         f"splash: TPU); use 'auto', 'chunked' or 'dense'")


def _validate_model(config, need, num):
  """ModelConfig of config.model (None with init_from: the architecture comes from there)."""
  m = config.model
  need(not m.rope_scaling or (isinstance(m.rope_scaling, (tuple, list))
                              and len(m.rope_scaling) == 4
                              and all(_is_num(x) for x in m.rope_scaling)),
       "model.rope_scaling",
       f"expected () or (factor, low_freq_factor, high_freq_factor, original_max_len), "
       f"got {m.rope_scaling!r}")
  num("model.vocab_size", 0, integer=True)
  if config.init_from:
    try:  # the run-time fields still matter
      ModelConfig(dtype=m.dtype, remat_policy=m.remat_policy, attention=m.attention,
                  logits_chunk=m.logits_chunk)
    except ValueError as e:
      raise ConfigError(f"config.{e}") from None
    return None
  for key in ("d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff",
              "max_seq_len"):
    num(f"model.{key}", 1, integer=True)
  num("model.rope_theta", 0.0, lo_open=True)
  num("model.norm_eps", 0.0, lo_open=True)
  try:
    return model_config(config, vocab_size=max(m.vocab_size, 1))
  except ConfigError as e:
    msg = str(e)
    raise ConfigError(msg.replace("config.model: model.", "config.model.")) from None


def _validate_data(config, model, need, num, choice, for_run: bool):
  d = config.data
  max_len = model.max_seq_len if model is not None else None
  if config.trainer == "sft":
    need(d.max_seq_len >= 4, "data.max_seq_len", "must be >= 4")
    need(d.overlength in ("error", "truncate", "drop"), "data.overlength",
         f"expected error|truncate|drop, got {d.overlength!r}")
    if max_len is not None:
      need(d.max_seq_len <= max_len, f"data.max_seq_len={d.max_seq_len}",
           f"exceeds model.max_seq_len={max_len}")
    if not d.train_path:
      from rlhf_jax.data.synthetic import TASKS
      choice("data.synthetic_task", TASKS)
      num("data.synthetic_max_len", 1, integer=True)
      num("data.synthetic_train_examples", 1, integer=True)
    return
  sources = {"reward_model": ("synthetic", "jsonl", "hh_rlhf"),
             "dpo": ("synthetic", "jsonl", "hh_rlhf"),
             "grpo": ("synthetic", "jsonl", "gsm8k"), "ppo": ("synthetic", "jsonl", "gsm8k"),
             "prm": ("gsm8k", "jsonl")}.get(config.trainer)
  if sources is None or "source" not in d:
    return
  choice("data.source", sources)
  if d.source != "synthetic" and for_run:
    need(d.train_path, "data.train_path", f"required when data.source={d.source!r}")
  if config.trainer == "prm":
    num("data.max_prompt_len", 1, integer=True)
    num("data.max_len", 2, integer=True)
    if max_len is not None:
      need(d.max_len <= max_len, f"data.max_len={d.max_len}",
           f"exceeds model.max_seq_len={max_len}")
    return
  num("data.max_prompt_len", 1, integer=True)
  if "max_completion_len" in d:  # preference pairs
    num("data.max_completion_len", 1, integer=True)
    if d.source == "synthetic":
      from rlhf_jax.data.preferences import CORRUPTIONS
      from rlhf_jax.data.synthetic import TASKS
      choice("data.synthetic_task", TASKS)
      choice("data.synthetic_corruption", CORRUPTIONS)
    if max_len is not None:
      need(d.max_prompt_len + d.max_completion_len <= max_len, "data.max_completion_len",
           f"data.max_prompt_len + data.max_completion_len = "
           f"{d.max_prompt_len + d.max_completion_len} exceeds model.max_seq_len={max_len}")
  elif d.source == "synthetic":  # RL prompts
    from rlhf_jax.data.synthetic import VERIFIABLE_TASKS
    choice("data.synthetic_task", VERIFIABLE_TASKS)
    num("data.synthetic_digits", 1, integer=True)


def _validate_mesh(config, num_devices, need) -> int:
  """Rows of the batch every step splits over (data * fsdp of the resolved mesh)."""
  from rlhf_jax import parallel
  shape = config.mesh.shape
  need(isinstance(shape, (tuple, list)) and len(shape) == 3
       and all(isinstance(s, int) and not isinstance(s, bool) for s in shape), "mesh.shape",
       f"expected 3 integers (data, fsdp, tensor), -1 = fill; got {shape!r}")
  need(list(shape).count(-1) <= 1 and all(s == -1 or s > 0 for s in shape), "mesh.shape",
       f"entries must be positive, with at most one -1 (= fill); got {tuple(shape)}")
  if num_devices is None:
    return 1
  try:
    data, fsdp, _ = parallel.mesh_shape(shape, num_devices)
  except ValueError as e:
    raise ConfigError(f"config.{e}") from None
  return data * fsdp


def _validate_dpo(config, need, num, choice):
  from rlhf_jax.losses.dpo import LOSSES, label_smoothing_error, variant
  p = config.dpo
  choice("dpo.loss_type", tuple(LOSSES))
  v = variant(p.loss_type)
  if "beta" in v.knobs:
    num("dpo.beta", 0.0, lo_open=True)
  ls = num("dpo.label_smoothing", 0.0)
  why = label_smoothing_error(p.loss_type, ls)
  need(why is None, "dpo.label_smoothing", why)
  num("dpo.orpo_lambda", 0.0)
  num("dpo.kto_desirable_weight", 0.0)
  num("dpo.kto_undesirable_weight", 0.0)
  num("dpo.simpo_gamma")
  need(not v.whole_batch or config.get("grad_accum_steps", 1) == 1, "grad_accum_steps",
       f"must be 1 with dpo.loss_type {p.loss_type!r} (its loss uses a statistic of the "
       f"whole batch, which micro-batches would change), got {config.get('grad_accum_steps')}")
  need(isinstance(p.get("share_prompt", True), bool), "dpo.share_prompt",
       f"expected True or False, got {p.get('share_prompt')!r}")


def _validate_online_rl(config, model, dp_rows, need, num, choice):
  from rlhf_jax.losses.kl import KL_ESTIMATORS
  from rlhf_jax.losses.ppo import AGGREGATION_MODES
  AGGREGATIONS, KL_KINDS = tuple(AGGREGATION_MODES), tuple(KL_ESTIMATORS)  # the registries' names
  r = config.rollout
  for key in ("prompts_per_step", "group_size", "max_new_tokens", "generate_micro_batch",
              "logprob_micro_batch"):
    num(f"rollout.{key}", 1, integer=True)
  num("rollout.train_micro_batch", 0, integer=True)
  num("rollout.temperature", 0.0)
  num("rollout.top_k", 0, integer=True)
  num("rollout.top_p", 0.0, 1.0, lo_open=True)
  B = r.prompts_per_step * r.group_size
  for key in ("generate_micro_batch", "logprob_micro_batch"):
    micro = r[key]
    need(micro >= B or B % micro == 0, f"rollout.{key}={micro}",
         f"must divide prompts_per_step * group_size = {B} (or be >= it)")
  if model is not None:
    need(config.data.max_prompt_len + r.max_new_tokens <= model.max_seq_len,
         "rollout.max_new_tokens",
         f"data.max_prompt_len + rollout.max_new_tokens = "
         f"{config.data.max_prompt_len + r.max_new_tokens} exceeds model.max_seq_len="
         f"{model.max_seq_len}")
  if "grpo" in config:
    from rlhf_jax.losses.advantages import ESTIMATORS
    from rlhf_jax.losses.grpo import IMPORTANCE_LEVELS, KL_MODES
    from rlhf_jax.losses.grpo import resolve
    g = config.grpo
    try:
      algo = resolve(g)  # the variant's values for knobs left at auto
    except ValueError as e:
      raise ConfigError(str(e)) from None
    for key, options in (("advantage", tuple(ESTIMATORS)),
                         ("aggregation", AGGREGATIONS), ("importance", IMPORTANCE_LEVELS),
                         ("kl_mode", KL_MODES), ("kl_estimator", KL_KINDS)):
      if algo[key] not in options:
        raise ConfigError(f"config.grpo.{key}={algo[key]!r}: expected one of "
                          f"{'|'.join(options)}")
    for key, lo, hi in (("clip_eps_low", 0.0, 1.0), ("clip_eps_high", 0.0, None),
                        ("kl_coef", 0.0, None)):
      need(_is_num(algo[key]) and algo[key] >= lo and (hi is None or algo[key] < hi),
           f"grpo.{key}", f"must be >= {lo}" + (f" and < {hi}" if hi else "")
           + f" (or -1 = the variant's value), got {algo[key]}")
    need(algo["dynamic_sampling"] in (0, 1), "grpo.dynamic_sampling",
         f"expected 0 or 1 (or -1 = the variant's value), got {algo['dynamic_sampling']}")
    need(g.get("old_logps", "auto") in ("auto", "recompute"), "grpo.old_logps",
         f"expected auto or recompute, got {g.get('old_logps')!r}")
    need(isinstance(g.get("share_prompt", True), bool), "grpo.share_prompt",
         f"expected True or False, got {g.get('share_prompt')!r}")
    num("grpo.epochs", 1, integer=True)
    num("grpo.minibatches", 1, integer=True)
    num("grpo.std_eps", 0.0)
    num("grpo.max_refill_rounds", 0, integer=True)
    num("grpo.overlong_cache", 0, integer=True)
    need(g.overlong_cache <= r.max_new_tokens, f"grpo.overlong_cache={g.overlong_cache}",
         f"the overlong window must fit in rollout.max_new_tokens={r.max_new_tokens}")
    adv = algo["advantage"]
    if ESTIMATORS[adv].needs_groups:
      if r.group_size < 2:
        raise ConfigError(
            f"config.rollout.group_size={r.group_size}: grpo.advantage={adv!r} (variant "
            f"{g.variant!r}) compares the completions of a prompt with each other and needs "
            f"group_size >= 2")
      if r.temperature <= 0:
        raise ConfigError(
            f"config.rollout.temperature={r.temperature}: greedy decoding gives every "
            f"completion of a prompt the same text, so grpo.advantage={adv!r} would be 0; "
            f"sample with temperature > 0")
    _check_minibatches(config, "grpo", B, dp_rows, need)
  if "ppo" in config:
    p = config.ppo
    choice("ppo.critic", ("separate", "shared"))
    need(not (p.critic_init and p.critic == "shared"), "ppo.critic_init",
         "a reward model to initialise the critic needs ppo.critic='separate' (a shared "
         "critic is a head on the policy)")
    num("ppo.gamma", 0.0, 1.0)
    num("ppo.lam", 0.0, 1.0)
    num("ppo.clip_eps", 0.0, 1.0, lo_open=True, hi_open=True)
    need(p.clip_eps_high == -1 or (_is_num(p.clip_eps_high) and p.clip_eps_high >= 0),
         "ppo.clip_eps_high", f"must be >= 0 (or -1 = clip_eps), got {p.clip_eps_high}")
    need(p.dual_clip == -1 or (_is_num(p.dual_clip) and p.dual_clip > 1), "ppo.dual_clip",
         f"must be > 1 (or -1 = off), got {p.dual_clip}")
    need(p.value_clip_eps == -1 or (_is_num(p.value_clip_eps) and p.value_clip_eps > 0),
         "ppo.value_clip_eps", f"must be > 0 (or -1 = off), got {p.value_clip_eps}")
    num("ppo.vf_coef", 0.0)
    num("ppo.entropy_coef", 0.0)
    num("ppo.kl_coef", 0.0)
    choice("ppo.aggregation", AGGREGATIONS)
    choice("ppo.kl_estimator", KL_KINDS)
    if p.adaptive_kl:
      num("ppo.kl_target", 0.0, lo_open=True)
      num("ppo.kl_horizon", 0, lo_open=True)
    num("ppo.epochs", 1, integer=True)
    num("ppo.minibatches", 1, integer=True)
    _check_minibatches(config, "ppo", B, dp_rows, need)


def _check_minibatches(config, algo: str, B: int, dp_rows: int, need):
  mb = config[algo].minibatches
  need(B % mb == 0, f"{algo}.minibatches={mb}",
       f"must divide prompts_per_step * group_size = {B}")
  rows = B // mb
  micro = config.rollout.train_micro_batch
  need(micro <= 0 or micro >= rows or rows % micro == 0, f"rollout.train_micro_batch={micro}",
       f"must divide the minibatch of {rows} rows (prompts_per_step * group_size / "
       f"{algo}.minibatches)")
  need(rows % dp_rows == 0, f"{algo}.minibatches",
       f"a minibatch of {rows} rows (prompts_per_step * group_size / {algo}.minibatches) is "
       f"not divisible by the data-parallel size {dp_rows} (mesh.shape data * fsdp)")


def model_config(config: ConfigDict, vocab_size: int | None = None, **overrides) -> ModelConfig:
  """ModelConfig from config.model (vocab_size 0 -> the tokenizer's)."""
  m = config.model.to_dict()
  if not m.get("rope_scaling"):
    m["rope_scaling"] = None
  if m.get("vocab_size", 0) <= 0:
    if vocab_size is None:
      raise ConfigError("config.model.vocab_size is 0 and no tokenizer size is known")
    m["vocab_size"] = vocab_size
  m.update(overrides)
  try:
    return ModelConfig.from_dict(m)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"config.model: {e}") from None


def to_json(config: ConfigDict) -> str:
  return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=list)
