"""Config checks shared by the online-RL trainers (PPO, GRPO): the rollout section and how
its batch of prompts_per_step * group_size rows splits into minibatches. Each trainer's
`validate` calls them after `rlhf_jax.config.validate`; ConfigError names the key."""
from __future__ import annotations

from rlhf_jax import config as config_lib


def trainer_devices(config, num_devices: int | None) -> int | None:
  """The devices that train: all but rollout.devices (the sampler's, `rollout_pipeline`);
  None when num_devices is None. ConfigError for a rollout.devices that leaves none."""
  if "rollout" not in config or "devices" not in config.rollout:
    return num_devices
  config_lib.Checks(config).num("rollout.devices", 0, integer=True)
  n = config.rollout.devices
  if num_devices is None or not n:
    return num_devices
  if n >= num_devices:
    raise config_lib.ConfigError(
        f"config.rollout.devices={n}: the sampler's devices must leave at least one of the "
        f"{num_devices} device(s) to the trainer (0 = sampler and trainer share them all)")
  return num_devices - n


def validate_rollout(config, num_devices: int | None = None) -> None:
  """config.rollout: sizes and sampling knobs, micro-batches that divide the rollout batch,
  prompt + completion within the model's max_seq_len, and the asynchronous pipeline's knobs
  (max_staleness, devices: `rlhf_jax.rollout_pipeline`)."""
  check = config_lib.Checks(config)
  need, num = check.need, check.num
  r = config.rollout
  for key in ("prompts_per_step", "group_size", "max_new_tokens", "generate_micro_batch",
              "logprob_micro_batch"):
    num(f"rollout.{key}", 1, integer=True)
  num("rollout.train_micro_batch", 0, integer=True)
  need(config.grad_accum_steps == 1, "grad_accum_steps",
       f"PPO / GRPO accumulate gradients with rollout.train_micro_batch (rows per "
       f"micro-batch, exact: `step.make_step`), not grad_accum_steps; got "
       f"{config.grad_accum_steps}, set rollout.train_micro_batch instead")
  if "stop_at_eos" in r:
    need(isinstance(r.stop_at_eos, bool), "rollout.stop_at_eos",
         f"expected True or False, got {r.stop_at_eos!r}")
  num("rollout.temperature", 0.0)
  if "is_correction" in r:  # sampler-mismatch correction (`losses.is_correction`)
    from rlhf_jax.losses.is_correction import LEVELS, MODES
    check.choice("rollout.is_correction", MODES)
    check.choice("rollout.is_level", LEVELS)
    num("rollout.is_cap", 1.0, lo_open=True)
  if "max_staleness" in r:  # asynchronous rollouts (`rlhf_jax.rollout_pipeline`)
    num("rollout.max_staleness", 0, integer=True)
  trainer_devices(config, num_devices)
  num("rollout.top_k", 0, integer=True)
  num("rollout.top_p", 0.0, 1.0, lo_open=True)
  if "sampler" in r:
    check.choice("rollout.sampler", ("static", "continuous"))
  if "decode_slots" in r:
    num("rollout.decode_slots", 0, integer=True)
  validate_episodes(config)
  B = r.prompts_per_step * r.group_size
  for key in ("generate_micro_batch", "logprob_micro_batch"):
    micro = r[key]
    need(micro >= B or B % micro == 0, f"rollout.{key}={micro}",
         f"must divide prompts_per_step * group_size = {B} (or be >= it)")
  if not config.init_from:  # with init_from the model's length comes from there
    max_len = config.model.max_seq_len
    need(config.data.max_prompt_len + r.max_new_tokens <= max_len,
         "rollout.max_new_tokens",
         f"data.max_prompt_len + rollout.max_new_tokens = "
         f"{config.data.max_prompt_len + r.max_new_tokens} exceeds model.max_seq_len="
         f"{max_len}")


def check_minibatches(config, algo: str, num_devices: int | None) -> None:
  """config.<algo>.minibatches divides the rollout batch, rollout.train_micro_batch the
  minibatch, and the data-parallel devices split the minibatch evenly."""
  need = config_lib.Checks(config).need
  B = config.rollout.prompts_per_step * config.rollout.group_size
  dp_rows = config_lib.data_parallel_rows(config, trainer_devices(config, num_devices))
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


def validate_episodes(config) -> None:
  """The multi-turn knobs (rollout.env and friends, `rlhf_jax.rollout_multiturn`): the env
  spec (built once), turn and token limits, and the features multi-turn rollouts do not
  combine with (continuous sampler, asynchronous rollouts, stop_at_eos=False). Without
  rollout.env, reward.spec must name a reward."""
  check = config_lib.Checks(config)
  need, num = check.need, check.num
  r = config.rollout
  env = r.get("env", "")
  spec = config.reward.spec if check.has("reward.spec") else "math"
  if not env:
    need(spec, "reward.spec", "empty: name a reward function (an empty spec is allowed only "
         "with rollout.env, whose environment gives the rewards)")
    return
  from rlhf_jax import envs
  envs.check_env_spec(env)  # ConfigError naming rollout.env
  num("rollout.max_turns", 1, integer=True)
  num("rollout.max_tokens_per_turn", 0, integer=True)
  need(r.max_tokens_per_turn <= r.max_new_tokens, "rollout.max_tokens_per_turn",
       f"{r.max_tokens_per_turn} exceeds rollout.max_new_tokens={r.max_new_tokens}, the "
       f"whole episode's budget")
  num("rollout.env_tokens_per_call", 1, integer=True)
  check.choice("rollout.turn_rewards", ("sum", "per_turn"))
  what = "multi-turn rollouts (rollout.env)"
  need(r.get("sampler", "static") == "static", "rollout.sampler",
       f"{what} run their own turn-by-turn sampler; set rollout.sampler=static")
  need(not r.get("max_staleness", 0), "rollout.max_staleness",
       f"{what} are synchronous; set rollout.max_staleness=0")
  need(not r.get("devices", 0), "rollout.devices",
       f"{what} sample on the training devices; set rollout.devices=0")
  need(r.get("stop_at_eos", True), "rollout.stop_at_eos",
       f"{what} end a model turn at EOS; set rollout.stop_at_eos=True")
