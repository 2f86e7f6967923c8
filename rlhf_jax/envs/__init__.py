"""Environments for multi-turn and tool-use RL, and a registry to build them from config.

Interface (`rlhf_jax.envs.base`): an `Env` has `observation_role` ("tool" or "user"),
`reset(row, seed)` and `step(model_text) -> EnvStep(observation, reward, done, info)`.

Built in (the registry `ENVS`, name -> `EnvEntry`: builder, description, paper; options
are the constructor arguments):

  calculator        CalculatorEnv(max_tool_calls=4, correct=1, incorrect=0, rel_tol=0)
                    `<tool>calculator: EXPR</tool>` -> the exact result (role "tool");
                    a turn without a tool call is the final answer (rewards/math.py check)
  guess_number      GuessNumberEnv(lo=1, hi=8, max_guesses=4, correct=1, turn_cost=0)
                    the model writes a number, the env answers higher / lower (role
                    "user"); reward correct - turn_cost * (turn - 1) on the secret
  retry_on_feedback RetryOnFeedbackEnv(max_attempts=2, retry_discount=1, correct=1,
                    incorrect=0, feedback="That is not correct. Try again.", rel_tol=0)
                    a wrong answer gets `feedback` (role "user") and another attempt

Every built-in env also has `max_turns`, the most model turns an episode can take (a
rollout may use it to bound its loop; an env without it relies on the rollout's own limit).

`make_env_factory(spec)` -> a zero-argument callable returning a fresh Env. spec is a
name, a dict {"name": ..., **options}, or that dict as JSON text (like `reward.spec`):

    "guess_number"
    {"name": "guess_number", "hi": 16}
    '{"name": "calculator", "max_tool_calls": 8}'

An unknown name, an unknown or missing option, or an option value the env refuses raises
`ConfigError` naming `rollout.env` and the registered names. `register_env(name, factory)`
adds an entry; `ENV_NAMES` is the sorted list of registered names (kept up to date).
"""
from __future__ import annotations

import dataclasses
import inspect
import json
from typing import Callable, Mapping

from rlhf_jax import registry
from rlhf_jax.config_error import ConfigError
from rlhf_jax.envs.base import (  # noqa: F401 (re-exported)
    OBSERVATION_ROLES, Env, EnvError, EnvStep, episode_info)
from rlhf_jax.envs.tools import TOOL_CALL_END  # noqa: F401 (re-exported)

SPEC_KEY = "rollout.env"


@dataclasses.dataclass(frozen=True)
class EnvEntry:
  """One environment a spec names (`config.rollout.env`).

  builder: the factory, factory(**options) -> Env, or its "module:attribute" (imported on
  first use). description: what the episode is. paper: where the task comes from ("" if
  nowhere in particular).
  """
  builder: str | Callable[..., Env]
  description: str = ""
  paper: str = ""

  def factory(self) -> Callable[..., Env]:
    return registry.resolve(self.builder)


ENVS: dict[str, EnvEntry] = {
    "calculator": EnvEntry(
        "rlhf_jax.envs.calculator:CalculatorEnv",
        "tool calls `<tool>calculator: EXPR</tool>` answered with the exact result; a turn "
        "without a tool call is the final answer, checked like reward `math`",
        paper="Toolformer (Schick et al. 2023); GSM8K calculator annotations (Cobbe et al. "
              "2021)"),
    "guess_number": EnvEntry(
        "rlhf_jax.envs.guess_number:GuessNumberEnv",
        "guess a secret integer in [lo, hi]; the env answers higher / lower / correct"),
    "retry_on_feedback": EnvEntry(
        "rlhf_jax.envs.retry:RetryOnFeedbackEnv",
        "a wrong final answer gets \"That is not correct. Try again.\" and another attempt",
        paper="self-correction from feedback: Kumar et al. 2024 (SCoRe)"),
}
ENV_NAMES: list[str] = sorted(ENVS)


def register_env(name: str, factory: Callable[..., Env], description: str = "",
                 paper: str = "") -> None:
  """Make `factory(**options)` available to `make_env_factory` as `name` (an `EnvEntry`)."""
  if name in ENVS:
    raise ValueError(f"env {name!r} is already registered")
  ENVS[name] = EnvEntry(factory, description, paper)
  ENV_NAMES[:] = sorted(ENVS)


def _error(msg: str) -> ConfigError:
  return ConfigError(f"config.{SPEC_KEY}: {msg}; registered envs: {ENV_NAMES}")


def parse_env_spec(spec) -> dict:
  """{"name": ..., **options} from a name, a dict, or JSON text of a dict (ConfigError)."""
  spec = registry.plain(spec)
  if isinstance(spec, str):
    text = spec.strip()
    if text.startswith("{"):
      try:
        spec = json.loads(text)
      except json.JSONDecodeError as e:
        raise _error(f"not valid JSON ({e.msg} at column {e.colno}): {spec!r}") from None
    elif text:
      spec = {"name": text}
    else:
      raise _error("empty; expected an env name or {\"name\": ..., **options}")
  if not isinstance(spec, Mapping):
    raise _error(f"{spec!r}: expected an env name or a dict {{\"name\": ..., **options}}")
  spec = {k: registry.plain(v) for k, v in spec.items()}
  if "name" not in spec:
    raise _error(f"{spec!r}: missing 'name'")
  if spec["name"] not in ENVS:
    raise _error(f"unknown env {spec['name']!r}")
  return spec


def make_env_factory(spec) -> Callable[[], Env]:
  """A zero-argument callable returning a fresh `Env` of `spec` (see the module docstring).

  The spec is checked here, once: the options against the factory's signature, then one env
  is built so that an option value the env refuses fails now, as a ConfigError."""
  spec = parse_env_spec(spec)
  name = spec["name"]
  options = {k: v for k, v in spec.items() if k != "name"}
  factory = ENVS[name].factory()
  try:
    sig = inspect.signature(factory)
  except (TypeError, ValueError):
    sig = None
  if sig is not None and not any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()):
    valid = [p for p in sig.parameters if p != "self"]
    unknown = sorted(set(options) - set(valid))
    if unknown:
      raise _error(f"env {name!r}: unknown option(s) {unknown}; valid: {valid}")
    missing = [p.name for p in sig.parameters.values()
               if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
               and p.name not in options]
    if missing:
      raise _error(f"env {name!r}: missing required option(s) {missing}")
  try:
    env = factory(**options)
  except (TypeError, ValueError) as e:
    raise _error(f"env {name!r}: {e}") from None
  role = getattr(env, "observation_role", None)
  if role not in OBSERVATION_ROLES:
    raise _error(f"env {name!r}: observation_role={role!r}; expected one of "
                 f"{list(OBSERVATION_ROLES)}")

  def make() -> Env:
    return factory(**options)
  make.spec = spec
  return make


def check_env_spec(spec) -> None:
  """Raise ConfigError for a spec `make_env_factory` would refuse (builds one env)."""
  make_env_factory(spec)
