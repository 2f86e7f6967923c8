"""Config validation and helpers shared by every trainer (loading: rlhf_jax/config_keys.py).

Every knob lives in one `ml_collections.ConfigDict`; `base_config`
(rlhf_jax/config_defaults.py, re-exported here) holds the defaults (the tiny CPU run)
with a comment per knob, `configs/<algo>.py` presets change what they need. Unknown or
mistyped override keys fail with one message that names the key and suggests the closest
valid one (rlhf_jax/config_keys.py). `validate` checks the sections every trainer shares;
each trainer's `validate` (rlhf_jax/trainers/<name>.py) adds its own sections, with the
same `Checks`.
"""
from __future__ import annotations

import json
import math

from ml_collections import ConfigDict

# re-exported: configs/*.py and many callers use config.base_config
from rlhf_jax.config_defaults import base_config  # noqa: F401 (re-exported)
from rlhf_jax.hardware import HARDWARE
from rlhf_jax.config_error import ConfigError  # noqa: F401 (re-exported)
from rlhf_jax.models.transformer import ModelConfig


# ----------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------

def _get(config: ConfigDict, key: str):
  node = config
  for part in key.split("."):
    node = node[part]
  return node


def is_num(x) -> bool:
  """A finite int or float (not a bool)."""
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


class Checks:
  """The value checks of one config, shared by `validate` and each trainer's section
  validator (`rlhf_jax.trainers.<name>.validate`): a failed check raises ConfigError
  "config.KEY: ..." naming the (dotted) key."""

  def __init__(self, config: ConfigDict):
    self.config = config

  def need(self, ok, key: str, msg: str) -> None:
    """ConfigError "config.KEY: MSG" unless `ok`."""
    if not ok:
      raise ConfigError(f"config.{key}: {msg}")

  def num(self, key: str, lo=None, hi=None, lo_open=False, hi_open=False, integer=False):
    """The value of `key`: an integer (`integer`) or a finite number in the range given by
    lo / hi (closed unless lo_open / hi_open)."""
    need, v = self.need, _get(self.config, key)
    kind = "an integer" if integer else "a finite number"
    ok = (isinstance(v, int) and not isinstance(v, bool)) if integer else is_num(v)
    need(ok, key, f"expected {kind}, got {v!r}")
    if lo is not None:
      need(v > lo if lo_open else v >= lo, key, f"must be {'>' if lo_open else '>='} {lo}, got {v}")
    if hi is not None:
      need(v < hi if hi_open else v <= hi, key, f"must be {'<' if hi_open else '<='} {hi}, got {v}")
    return v

  def choice(self, key: str, options):
    """The value of `key`, one of `options`."""
    v = _get(self.config, key)
    if v not in options:
      raise ConfigError(f"config.{key}={v!r}: expected one of {'|'.join(map(str, options))}")
    return v

  def has(self, key: str) -> bool:
    """Whether the config has `key` (top-level or section.key): a key that only some
    trainers' configs have."""
    head, _, rest = key.partition(".")
    return head in self.config and (not rest or rest in self.config[head])


def validate(config: ConfigDict, num_devices: int | None = None) -> None:
  """Every check of the sections all trainers share that needs only the config (and the
  device count): run length, optimizer, logging, eval, checkpoints, tokenizer, model,
  attention, LoRA, data and mesh. Raises ConfigError naming the key.

  Each trainer's `validate` (rlhf_jax/trainers/<name>.py; `rlhf_jax.trainers.validate`
  for a config of any trainer) calls it, then checks the trainer's own sections. Trainers
  call theirs first, before anything is read or written, with `num_devices` =
  jax.device_count(): mesh.shape must fit them and every batch split evenly over its
  data-parallel devices. num_devices=None checks the config alone: no device checks, and
  data paths a run needs may still be unset (e.g. a size preset for other hardware, before
  --config.data.train_path is given).
  """
  check = Checks(config)
  need, num, choice, has = check.need, check.num, check.choice, check.has

  # Run length, batch, optimizer.
  num("seed", 0, integer=True)
  need(config.num_steps > 0, "num_steps", f"must be > 0, got {config.num_steps}")
  need(config.batch_size > 0, "batch_size", f"must be > 0, got {config.batch_size}")
  need(config.grad_accum_steps >= 1, "grad_accum_steps", "must be >= 1")
  need(config.batch_size % config.grad_accum_steps == 0, "grad_accum_steps",
       f"batch_size={config.batch_size} is not divisible by grad_accum_steps="
       f"{config.grad_accum_steps}")
  lr = config.optimizer.lr
  need(is_num(lr) and lr > 0, "optimizer.lr", f"must be > 0 and finite, got {lr}")
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
  for key in ("eval_at_start", "eval_at_end"):
    if key in config:
      need(isinstance(config[key], bool), key, f"expected True or False, got {config[key]!r}")
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
  need(config.tokenizer.chat_style in ("", "plain", "chatml", "llama3", "gemma"),
       "tokenizer.chat_style",
       f"expected plain|chatml|llama3|gemma or '' (auto), got {config.tokenizer.chat_style!r}")
  if not config.tokenizer.path and not config.init_from:
    choice("tokenizer.model_type", ("bpe", "unigram", "char", "word"))
    num("tokenizer.vocab_size", 8, integer=True)

  # Model (its architecture counts only without init_from) and LoRA.
  model = _validate_model(config, check)
  _validate_attention(config, check, platform_known=num_devices is not None)
  if config.get("lora") is not None and config.lora.rank:
    from rlhf_jax.models.lora import LoraConfig
    try:
      LoraConfig.from_config(config.lora)
    except (TypeError, ValueError) as e:
      raise ConfigError(str(e) if str(e).startswith("config.") else f"config.lora: {e}") from None

  # Data, mesh.
  _validate_data(config, model, check, for_run=num_devices is not None)
  _validate_mesh(config, num_devices, check)


def attention_mask_kinds(config: ConfigDict) -> set[str]:
  """The attention mask kinds a run uses (`rlhf_jax.models.attention.MASK_KINDS`):
  causal always, cached decoding (every trainer can write samples; GRPO/PPO sample),
  the shared prefix where dpo.share_prompt / grpo.share_prompt packs rows."""
  kinds = {"causal", "cached"}
  for key in ("dpo", "grpo"):
    if key in config and config[key].get("share_prompt", False):
      kinds.add("shared_prefix")
  return kinds


def _validate_attention(config, check: Checks, platform_known: bool):
  """model.attention: a backend that expresses every mask kind the run uses, and (when
  the devices are known) runs on them."""
  from rlhf_jax.models import attention
  need = check.need
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


def _validate_model(config, check: Checks):
  """ModelConfig of config.model (None with init_from: the architecture comes from there)."""
  need, num, m = check.need, check.num, config.model
  need(not m.rope_scaling or (isinstance(m.rope_scaling, (tuple, list))
                              and len(m.rope_scaling) == 4
                              and all(is_num(x) for x in m.rope_scaling)),
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


def _validate_data(config, model, check: Checks, for_run: bool):
  need, num, choice, d = check.need, check.num, check.choice, config.data
  max_len = model.max_seq_len if model is not None else None
  from rlhf_jax.data import lengths  # data.pad_to / buckets / pad_multiple (offline trainers)
  lengths.validate(d, lengths.configured_len(d), check)
  if config.trainer == "sft":
    need(d.max_seq_len >= 4, "data.max_seq_len", "must be >= 4")
    need(d.overlength in ("error", "truncate", "drop"), "data.overlength",
         f"expected error|truncate|drop, got {d.overlength!r}")
    if max_len is not None:
      need(d.max_seq_len <= max_len, f"data.max_seq_len={d.max_seq_len}",
           f"exceeds model.max_seq_len={max_len}")
    choice("data.source", ("jsonl", "gsm8k_tools"))
    if d.source == "gsm8k_tools" and for_run:
      need(d.train_path, "data.train_path", "required when data.source='gsm8k_tools' (the "
           "official GSM8K train JSONL)")
    if not d.train_path:
      from rlhf_jax.data.synthetic import TASKS
      from rlhf_jax.envs.transcripts import TASKS as MULTI_TURN_TASKS
      choice("data.synthetic_task", TASKS + MULTI_TURN_TASKS)
      num("data.synthetic_max_len", 1, integer=True)
      num("data.synthetic_digits", 1, integer=True)
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
    from rlhf_jax.data.synthetic import ENV_TASKS, VERIFIABLE_TASKS
    choice("data.synthetic_task", VERIFIABLE_TASKS + ENV_TASKS)
    num("data.synthetic_digits", 1, integer=True)


def _validate_mesh(config, num_devices, check: Checks) -> None:
  shape = config.mesh.shape
  check.need(isinstance(shape, (tuple, list)) and len(shape) == 3
             and all(isinstance(s, int) and not isinstance(s, bool) for s in shape),
             "mesh.shape", f"expected 3 integers (data, fsdp, tensor), -1 = fill; got {shape!r}")
  check.need(list(shape).count(-1) <= 1 and all(s == -1 or s > 0 for s in shape), "mesh.shape",
             f"entries must be positive, with at most one -1 (= fill); got {tuple(shape)}")
  if "hardware" in config:
    check.choice("hardware", ("auto", *HARDWARE))
  planned = config.mesh.get("planned_for", "")
  check.need(planned in ("", *HARDWARE), "mesh.planned_for",
             f"expected '' or one of {'|'.join(HARDWARE)}, got {planned!r}")
  if num_devices is not None:
    resolve_mesh(config, num_devices)
  data_parallel_rows(config, num_devices)  # mesh.shape fits the devices


def resolve_mesh(config: ConfigDict, num_devices: int) -> tuple[int, int, int]:
  """The mesh of a run on `num_devices` devices, written to config.mesh.shape: the one
  place it is chosen (`validate` calls it with the device count, before the mesh and
  batch checks; the trainers then build `parallel.make_mesh(config.mesh.shape)`).

  config.hardware="auto": mesh.shape as it is, unless it is a size preset's mesh planned
  for other hardware (mesh.planned_for) that does not fit the devices present: then pure
  data parallelism over them, [num_devices, 1, 1], and one printed line says so (planned
  vs used). A named hardware (rlhf_jax/hardware.py HARDWARE): the preset's mesh planned
  again for it (`hardware.replan`), and ConfigError unless the devices are that
  hardware's. Calling it again changes nothing; the result is not checked against the
  devices here (`data_parallel_rows` does)."""
  from rlhf_jax import hardware as hardware_lib
  shape = tuple(config.mesh.shape)
  name = config.get("hardware", "auto")
  planned = config.mesh.get("planned_for", "")
  if name != "auto":
    hw = HARDWARE[name]
    if planned and planned != name and math.prod(shape) != hw.devices:
      shape = hardware_lib.replan(shape, planned, name)
    if num_devices != hw.devices:
      raise ConfigError(
          f"config.hardware={name!r} needs its {hw.devices} devices, but {num_devices} "
          f"device(s) are available; run on {name}, or set --config.hardware=auto to use "
          f"data parallelism over the devices present")
  elif planned and math.prod(shape) == HARDWARE[planned].devices \
      and math.prod(shape) != num_devices:
    used = (num_devices, 1, 1)
    import jax
    if jax.process_index() == 0:
      print(f"mesh: {list(shape)} is planned for {planned} ({HARDWARE[planned].devices} "
            f"devices), {num_devices} device(s) here: using data parallelism {list(used)} "
            f"(config.hardware=auto; --config.hardware={planned} requires the planned "
            f"hardware)", flush=True)
    shape = used
  if shape != tuple(config.mesh.shape):
    config.mesh.shape = type(config.mesh.shape)(shape)
  return shape


def data_parallel_rows(config: ConfigDict, num_devices: int | None) -> int:
  """Rows of the batch every step splits over (data * fsdp of the resolved mesh); 1 when
  num_devices is None. ConfigError when mesh.shape does not fit the devices."""
  if num_devices is None:
    return 1
  from rlhf_jax import parallel
  try:
    data, fsdp, _ = parallel.mesh_shape(config.mesh.shape, num_devices)
  except ValueError as e:
    raise ConfigError(f"config.{e}") from None
  return data * fsdp


def check_batch_split(config: ConfigDict, num_devices: int | None) -> None:
  """batch_size splits evenly over the data-parallel devices: the check of the trainers
  whose step takes batch_size rows (sft, reward_model, prm, dpo)."""
  rows = data_parallel_rows(config, num_devices)
  Checks(config).need(
      config.batch_size % rows == 0, "batch_size",
      f"{config.batch_size} is not divisible by the data-parallel size {rows} "
      f"(mesh.shape data * fsdp); every device needs the same number of rows")


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
