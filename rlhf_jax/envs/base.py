"""The environment interface of multi-turn and tool-use RL (issue #21).

An episode is a conversation: the prompt row's messages, then alternating model turns and
environment observations until the environment says done.

    env = factory()                    # one Env per episode (or reset again to reuse it)
    env.reset(row, seed)               # row: a prompt row {"prompt", "answer", ...}
    step = env.step(model_text)        # the decoded text of the model's last turn
    while not step.done:               # step.observation: the next message, in the chat
      ...                              # role env.observation_role ("tool" or "user")
      step = env.step(model_text)
    return_ = sum(step.reward over the episode)

`EnvStep` fields:

    observation  str | None  the text shown to the model next (None when done)
    reward       float       this turn's reward contribution (the episode return is the sum)
    done         bool        the episode is over (no observation follows)
    info         dict        "turn" (every step: the 1-based number of the model turn just
                             taken); per-turn counters (ints, summed over the episode by
                             the rollout: "tool_calls", "tool_errors",
                             "malformed_tool_calls", "invalid_guesses"); per-episode facts
                             on the final step only ("correct": bool, ...)

Environments are pure Python (no jax) and deterministic given (row, seed): the same row,
seed and model turns give the same observations, rewards and infos. A row that an env
cannot use (e.g. no reference answer) raises `EnvError` from `reset`, naming the env and
the key it needs; so does `step` before `reset` or after the episode ended. A tool turn's
model_text ends with the stop string that ended it (`tools.TOOL_CALL_END`). The built-in
envs also have `max_turns`: the most model turns an episode can take (optional for an
env; a rollout bounds its loop with its own limit too).
"""
from __future__ import annotations

import dataclasses
from typing import Protocol, runtime_checkable


@dataclasses.dataclass(frozen=True)
class EnvStep:
  observation: str | None   # text shown to the model next (None when done)
  reward: float             # reward contribution of this turn
  done: bool
  info: dict                # e.g. {"tool_calls": 1, "tool_errors": 0, "correct": True}


@runtime_checkable
class Env(Protocol):
  observation_role: str     # "tool" or "user": the chat role of observations

  def reset(self, row: dict, seed: int) -> None:
    ...

  def step(self, model_text: str) -> EnvStep:
    ...


class EnvError(ValueError):
  """A row or a call an environment cannot handle: the message names the env and why."""


OBSERVATION_ROLES = ("tool", "user")


def row_answer(env_name: str, row: dict, key: str = "answer") -> str:
  """row[key] as a non-empty string (EnvError naming the env and the key otherwise)."""
  value = row.get(key) if isinstance(row, dict) else None
  if value is None or not str(value).strip():
    got = sorted(row) if isinstance(row, dict) else type(row).__name__
    raise EnvError(f"env {env_name!r} needs a reference answer in row[{key!r}]; "
                   f"row has {got}")
  return str(value).strip()


def episode_info(infos) -> dict:
  """One episode's infos (one dict per step, in order) as one dict, by the convention
  above: "turn" -> the number of model turns taken, other int counters summed, everything
  else (bools such as "correct", floats) as the last step that has it says."""
  out: dict = {}
  for info in infos:
    for k, v in info.items():
      if k == "turn":
        out[k] = max(out.get(k, 0), v)
      elif isinstance(v, int) and not isinstance(v, bool):
        out[k] = out.get(k, 0) + v
      else:
        out[k] = v
  return out
