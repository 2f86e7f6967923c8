"""`guess_number`: find a secret integer in [lo, hi] from "higher" / "lower" feedback.

The smallest multi-turn task with a known optimum (binary search needs
ceil(log2(hi - lo + 2)) guesses), in a text format a tiny model can learn in minutes:

    user       guess 1-8           (the prompt row; `rlhf_jax.data.synthetic`)
    assistant  4
    user       higher
    assistant  6
    user       lower
    assistant  5                   -> reward 1, done

The secret is int(row["answer"]) (an integer in [lo, hi]); a row without an answer gets one
drawn from `seed` (random.Random(seed).randint(lo, hi)). A turn's guess is its first
integer ("I guess 5." -> 5); a turn without one (or with more than 18 digits) gets
"invalid" (counted in info["invalid_guesses"]) and uses up a guess like any other. The
episode ends on the secret (reward `correct - turn_cost * (turn - 1)`, info["correct"]=True)
or after `max_guesses` turns (reward 0, info["correct"]=False); the whole return sits on
the last step. Observations: "higher" (the secret is above the guess), "lower", in the role "user".
"""
from __future__ import annotations

import random
import re

from rlhf_jax.envs.base import EnvError, EnvStep

_INT = re.compile(r"-?\d+", re.ASCII)


def _int_knob(name: str, value, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ValueError(f"{name}={value!r}: expected an integer >= {minimum}")
  return value


class GuessNumberEnv:
  """See the module docstring. max_turns = max_guesses."""

  observation_role = "user"

  def __init__(self, lo: int = 1, hi: int = 8, max_guesses: int = 4, correct: float = 1.0,
               turn_cost: float = 0.0):
    self.lo = _int_knob("lo", lo, -10**9)
    self.hi = _int_knob("hi", hi, self.lo)
    self.max_guesses = self.max_turns = _int_knob("max_guesses", max_guesses, 1)
    self.correct, self.turn_cost = float(correct), float(turn_cost)
    self._secret, self._turn, self._done = None, 0, False

  def reset(self, row: dict, seed: int) -> None:
    answer = str(row.get("answer") or "").strip() if isinstance(row, dict) else ""
    self._secret, self._turn, self._done = None, 0, False
    if not answer:
      self._secret = random.Random(seed).randint(self.lo, self.hi)
      return
    try:
      secret = int(answer)
    except ValueError:
      raise EnvError(f"env 'guess_number': row['answer']={answer!r} is not an integer"
                     ) from None
    if not self.lo <= secret <= self.hi:
      raise EnvError(f"env 'guess_number': row['answer']={answer!r} outside "
                     f"[lo, hi]=[{self.lo}, {self.hi}]")
    self._secret = secret

  @property
  def secret(self) -> int | None:
    return self._secret

  def step(self, model_text: str) -> EnvStep:
    if self._done:
      raise EnvError("env 'guess_number': step() after the episode ended (reset() first)")
    out = self._step(model_text)
    self._done = out.done
    return out

  def _step(self, model_text: str) -> EnvStep:
    if self._secret is None:
      raise EnvError("env 'guess_number': step() before reset()")
    self._turn += 1
    m = _INT.search(model_text or "")
    guess = int(m.group()) if m and len(m.group()) <= 19 else None  # 10**18: no guess
    info = {"turn": self._turn, "invalid_guesses": int(guess is None)}
    if guess == self._secret:
      return EnvStep(None, self.correct - self.turn_cost * (self._turn - 1), True,
                     {**info, "correct": True})
    if self._turn >= self.max_guesses:
      return EnvStep(None, 0.0, True, {**info, "correct": False})
    if guess is None:
      return EnvStep("invalid", 0.0, False, info)
    return EnvStep("higher" if self._secret > guess else "lower", 0.0, False, info)
