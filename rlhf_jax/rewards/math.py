"""Verifiable math reward: extract the final number of a completion, compare with the answer.

    r = correct    if answers_match(extract_final_number(completion), answer)
        incorrect  otherwise (also when no number can be found)
      + format_reward  when the completion contains `format_marker` (default "####")

as in the rule-based rewards of DeepSeek-R1 (Guo et al. 2025) and Tulu 3's RLVR
(Lambert et al. 2024). Numbers are compared exactly as rationals:
"1,000" == "1000.0" == "$1000", "0.75" == "3/4", "-5" != "5".

Extraction (`extract_final_number`), first that applies:
  1. after the last "####" (GSM8K's marker),
  2. inside the last \\boxed{...} (balanced braces),
  3. after the last "answer is" / "answer:" / "answer =" (case-insensitive,
     e.g. "The final answer is $1,234.50."),
  4. else the last number anywhere in the text.
In 1-3 the first number after the marker is taken (in 3, on the marker's
line); when there is none the next rule applies. A number is an optional sign
(a '-' not glued to a preceding word or digit, so "5-3" holds 5 and 3), an
optional '$', digits with optional thousands commas ("1,234"), an optional
decimal part, optionally "/ denominator" (a fraction; LaTeX \\frac{a}{b} too).
Trailing units, '%' and punctuation are ignored ("42 apples.", "50%").
The result is canonical (`normalize_number`): "1,234.50" -> "1234.5", "-$3" -> "-3",
"6/8" -> "3/4".
"""
from __future__ import annotations

import re
from fractions import Fraction
from typing import Sequence

import numpy as np

from rlhf_jax.rewards.base import Metadata, RewardError, batch_size

_NUMBER = re.compile(r"""
    (?<![\w.])                              # not inside a word or after a decimal point
    (?P<sign>[-\u2212]\s?)?                 # a sign only where it cannot be a binary minus
    \$?\s?
    (?P<sign2>[-\u2212])?                   # "$-5"
    (?:(?P<int>\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?P<frac>\.\d+)?  # thousands commas or plain digits
     |(?P<frac_only>\.\d+))                 # ".5"
    (?:\s*/\s*(?P<den>\d+(?:\.\d+)?))?      # a fraction's denominator
    """, re.VERBOSE)
_LATEX_FRAC = re.compile(r"\\[dt]?frac\s*\{\s*([^{}]*?)\s*\}\s*\{\s*([^{}]*?)\s*\}")
_ANSWER_IS = re.compile(r"answer\s*(?:is|:|=)", re.IGNORECASE)


def _clean(text: str) -> str:
  """LaTeX and markup that hide numbers: \\frac{a}{b} -> a/b, 1{,}000 -> 1,000, \\$ -> $."""
  text = _LATEX_FRAC.sub(r"\1/\2", text)
  return text.replace("{,}", ",").replace("\\$", "$").replace("\\!", "").replace("\\,", "")


def _numbers(text: str) -> list[str]:
  """Every number in `text`, in order, as written (sign, digits, '/den'; no '$')."""
  out = []
  for m in _NUMBER.finditer(text):
    sign = "-" if (m.group("sign") or m.group("sign2")) else ""
    s = sign + (m.group("int") or "0") + (m.group("frac") or m.group("frac_only") or "")
    if m.group("den") is not None:
      s += "/" + m.group("den")
    out.append(s)
  return out


def _to_fraction(s: str) -> Fraction | None:
  """Exact value of a number string (commas, '$', spaces allowed; 'a/b'); None if not one."""
  s = s.strip().replace(",", "").replace("$", "").replace(" ", "").replace("\u2212", "-")
  s = s.rstrip("%.")
  if not s:
    return None
  try:
    if "/" in s:
      num, den = s.split("/", 1)
      den_f = Fraction(den)
      return Fraction(num) / den_f if den_f else None
    return Fraction(s)
  except (ValueError, ZeroDivisionError):
    return None


def _canonical(x: Fraction) -> str:
  """Integers as "12", terminating decimals as "1234.5", other rationals as "1/3"."""
  if x.denominator == 1:
    return str(x.numerator)
  d = x.denominator
  twos = fives = 0
  while d % 2 == 0:
    d //= 2
    twos += 1
  while d % 5 == 0:
    d //= 5
    fives += 1
  if d != 1:
    return f"{x.numerator}/{x.denominator}"
  places = max(twos, fives)
  digits = str(abs(x.numerator) * 10 ** places // x.denominator).rjust(places + 1, "0")
  s = f"{digits[:-places]}.{digits[-places:]}".rstrip("0")
  return ("-" if x < 0 else "") + s


def normalize_number(s: str | None) -> str | None:
  """Canonical form of a number string ("1,000" -> "1000", "1000.0" -> "1000",
  "$3.50" -> "3.5", "6/8" -> "3/4"); text that is not one number is searched
  with `extract_final_number`. None when there is no number."""
  if s is None:
    return None
  x = _to_fraction(str(s))
  if x is None:
    return extract_final_number(str(s))
  return _canonical(x)


def _first_number(text: str) -> str | None:
  nums = _numbers(text)
  return nums[0] if nums else None


def _last_boxed(text: str) -> str | None:
  """Content of the last \\boxed{...} (or \\fbox{...}), braces balanced; None if none."""
  start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
  if start < 0:
    return None
  i = text.index("{", start) + 1
  depth = 1
  for j in range(i, len(text)):
    if text[j] == "{":
      depth += 1
    elif text[j] == "}":
      depth -= 1
      if depth == 0:
        return text[i:j]
  return text[i:]  # unclosed: take the rest


def extract_final_number(text: str) -> str | None:
  """The final numeric answer of `text`, canonical (see the module docstring); None if none."""
  if not text:
    return None
  text = _clean(text)
  candidates = []
  if "####" in text:
    candidates.append(text.rpartition("####")[2])
  boxed = _last_boxed(text)
  if boxed is not None:
    candidates.append(boxed)
  marks = list(_ANSWER_IS.finditer(text))
  if marks:
    candidates.append(text[marks[-1].end():].split("\n", 1)[0])
  for c in candidates:
    n = _first_number(c)
    if n is not None:
      x = _to_fraction(n)
      if x is not None:
        return _canonical(x)
  for n in reversed(_numbers(text)):
    x = _to_fraction(n)
    if x is not None:
      return _canonical(x)
  return None


def answers_match(predicted: str | None, reference: str | None, rel_tol: float = 0.0) -> bool:
  """Whether two answers are the same number: exact rational equality (rel_tol=0),
  or |p - r| <= rel_tol * max(|p|, |r|). Either side None / not a number -> False."""
  p, r = normalize_number(predicted), normalize_number(reference)
  if p is None or r is None:
    return False
  fp, fr = _to_fraction(p), _to_fraction(r)
  if fp is None or fr is None:
    return False
  if rel_tol == 0:
    return fp == fr
  return abs(float(fp) - float(fr)) <= rel_tol * max(abs(float(fp)), abs(float(fr)))


class MathReward:
  """Rule-based correctness reward for numeric answers (metadata["answer"]).

  correct / incorrect: the reward for a matching / non-matching (or missing)
  final number; format_reward: added when the completion contains
  `format_marker` (e.g. "####" or "\\boxed"); rel_tol: see `answers_match`.
  Rows must carry a reference answer: an empty one raises RewardError (a
  prompt set without answers cannot be scored for correctness).
  """

  name = "math"

  def __init__(self, correct: float = 1.0, incorrect: float = 0.0, format_reward: float = 0.0,
               format_marker: str = "####", rel_tol: float = 0.0, answer_key: str = "answer"):
    self.correct, self.incorrect = float(correct), float(incorrect)
    self.format_reward, self.format_marker = float(format_reward), str(format_marker)
    self.rel_tol, self.answer_key = float(rel_tol), answer_key

  def __call__(self, prompts: Sequence, completions: Sequence[str],
               metadata: Metadata) -> np.ndarray:
    B = batch_size(self.name, prompts, completions, metadata, (self.answer_key,))
    out = np.empty((B,), np.float32)
    for i, (completion, answer) in enumerate(zip(completions, metadata[self.answer_key])):
      if normalize_number(answer) is None:
        raise RewardError(f"reward 'math': row {i} has no numeric reference answer "
                          f"(metadata[{self.answer_key!r}]={answer!r}); use a prompt set "
                          f"with answers (e.g. gsm8k)")
      ok = answers_match(extract_final_number(completion), answer, self.rel_tol)
      r = self.correct if ok else self.incorrect
      if self.format_reward and self.format_marker in completion:
        r += self.format_reward
      out[i] = r
    return out

  def __repr__(self):
    return (f"MathReward(correct={self.correct}, incorrect={self.incorrect}, "
            f"format_reward={self.format_reward}, format_marker={self.format_marker!r})")


def math_reward(correct: float = 1.0, incorrect: float = 0.0, format_reward: float = 0.0,
                **kwargs) -> MathReward:
  """A `MathReward` (see there)."""
  return MathReward(correct, incorrect, format_reward, **kwargs)
