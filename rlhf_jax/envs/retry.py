"""`retry_on_feedback`: a verifiable answer, with another attempt after "not correct".

    user       <question>                       (the prompt row)
    assistant  ... #### 41                      attempt 1: wrong
    user       That is not correct. Try again.  (`feedback`)
    assistant  ... #### 42                      attempt 2: right -> reward correct * retry_discount

Each model turn is an attempt, checked like reward `math` (rlhf_jax/rewards/math.py:
`extract_final_number` of the turn vs row["answer"], `answers_match`). A right attempt k
ends the episode with reward `correct * retry_discount ** (k - 1)`; a wrong one gets
`feedback` (role "user") while attempts remain, else ends it with `incorrect`. The reward
is for the final attempt only; retry_discount < 1 makes a first-try answer worth more.
info on the last step: "correct" (the final attempt), "first_correct" (attempt 1),
"attempts"; the gap correct - first_correct over a batch is the self-correction rate
(SCoRe, Kumar et al. 2024: Delta(t1, t2)).
"""
from __future__ import annotations

from rlhf_jax.envs.base import EnvError, EnvStep, row_answer
from rlhf_jax.rewards.math import answers_match, extract_final_number

FEEDBACK = "That is not correct. Try again."


class RetryOnFeedbackEnv:
  """See the module docstring. max_turns = max_attempts."""

  observation_role = "user"

  def __init__(self, max_attempts: int = 2, retry_discount: float = 1.0, correct: float = 1.0,
               incorrect: float = 0.0, feedback: str = FEEDBACK, rel_tol: float = 0.0):
    if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
      raise ValueError(f"max_attempts={max_attempts!r}: expected an integer >= 1")
    if not 0.0 <= float(retry_discount) <= 1.0:
      raise ValueError(f"retry_discount={retry_discount!r}: expected a number in [0, 1]")
    if not isinstance(feedback, str) or not feedback.strip():
      raise ValueError(f"feedback={feedback!r}: expected non-empty text")
    self.max_attempts = self.max_turns = max_attempts
    self.retry_discount, self.correct = float(retry_discount), float(correct)
    self.incorrect, self.feedback, self.rel_tol = float(incorrect), feedback, float(rel_tol)
    self._answer, self._turn, self._first_ok, self._done = None, 0, False, False

  def reset(self, row: dict, seed: int) -> None:
    del seed  # nothing random
    self._answer = row_answer("retry_on_feedback", row)
    self._turn, self._first_ok, self._done = 0, False, False

  def step(self, model_text: str) -> EnvStep:
    if self._done:
      raise EnvError("env 'retry_on_feedback': step() after the episode ended (reset() first)")
    out = self._step(model_text)
    self._done = out.done
    return out

  def _step(self, model_text: str) -> EnvStep:
    if self._answer is None:
      raise EnvError("env 'retry_on_feedback': step() before reset()")
    self._turn += 1
    ok = answers_match(extract_final_number(model_text or ""), self._answer, self.rel_tol)
    if self._turn == 1:
      self._first_ok = ok
    info = {"turn": self._turn}
    final = {"correct": ok, "first_correct": self._first_ok, "attempts": self._turn}
    if ok:
      return EnvStep(None, self.correct * self.retry_discount ** (self._turn - 1), True,
                     {**info, **final})
    if self._turn >= self.max_attempts:
      return EnvStep(None, self.incorrect, True, {**info, **final})
    return EnvStep(self.feedback, 0.0, False, info)
