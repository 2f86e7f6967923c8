"""A safe exact calculator, and the `calculator` tool-use environment.

`calculate(expr)` evaluates arithmetic with a recursive-descent parser over a whitelist of
tokens -- nothing is ever passed to eval / exec / compile / ast, so no text can run code:

    expr    := term (("+" | "-") term)*
    term    := factor (("*" | "/") factor)*
    factor  := ("+" | "-")* power                 unary signs: -2**2 = -4 (as in Python)
    power   := postfix ("**" factor)?             right-associative: 2**3**2 = 2**9
    postfix := atom "%"?                          50% = 1/2 (percent, not modulo)
    atom    := NUMBER | "(" expr ")"
    NUMBER  := ASCII digits with an optional decimal part ("12", "0.5", ".5", "5."),
               or thousands groups ("1,000", "12,345.6")

Values are exact `Fraction`s; the result is written like a GSM8K answer
(`rewards.math.normalize_number`): integers without ".0" ("24"), terminating decimals
("0.2"), other rationals as "a/b" ("10/3"). Every input is bounded, so no text can hang the
process or exhaust memory -- `CalcError(reason)` instead:

    MAX_CHARS=200 characters; MAX_DEPTH=32 nested parentheses / powers; an exponent must be
    an integer with |e| <= MAX_EXPONENT=1024, and every intermediate value's numerator and
    denominator stay within MAX_BITS=4096 bits (so 9**9**9**9 is refused after one step);
    division by zero; any other character (names, quotes, '_', '.', unicode digits) or a
    token out of place ("2(3)", "1 2", "**2").

Environment (`CalculatorEnv`, registry name "calculator"): a model turn that calls
`<tool>calculator: EXPR</tool>` (rlhf_jax/envs/tools.py) gets the result as the next
message (role "tool"); an expression the calculator refuses gets "error: <reason>" and is
counted in info["tool_errors"], a malformed call (unclosed tag, unknown tool, ...) gets
"error: <reason>" and info["malformed_tool_calls"]. A turn without a tool tag is the final
answer: reward `correct` if its final number matches row["answer"] (rewards/math.py's
`extract_final_number` + `answers_match`), else `incorrect`; done. More than
`max_tool_calls` calls end the episode with `incorrect` (info["tool_budget_exceeded"]=1).
"""
from __future__ import annotations

import re
from fractions import Fraction

from rlhf_jax.envs.base import EnvError, EnvStep, row_answer
from rlhf_jax.envs.tools import MalformedCall, has_tool_tag, parse_tool_calls
from rlhf_jax.rewards.math import answers_match, extract_final_number, normalize_number

MAX_CHARS = 200
MAX_DEPTH = 32
MAX_EXPONENT = 1024
MAX_BITS = 4096

_TOKEN = re.compile(r"""
    (?P<space>[ \t]+)
  | (?P<number>\d{1,3}(?:,\d{3})+(?:\.\d*)?(?![\d,])|\d+\.?\d*|\.\d+)
  | (?P<op>\*\*|[-+*/%()])
  """, re.VERBOSE | re.ASCII)


class CalcError(ValueError):
  """An expression the calculator refuses; str(e) is the reason."""


def tokenize(expr: str) -> list[str]:
  """The tokens of `expr` (numbers and operators), or CalcError."""
  if not isinstance(expr, str):
    raise CalcError(f"expected text, got {type(expr).__name__}")
  if len(expr) > MAX_CHARS:
    raise CalcError(f"expression too long ({len(expr)} characters, at most {MAX_CHARS})")
  out, i = [], 0
  while i < len(expr):
    m = _TOKEN.match(expr, i)
    if m is None:
      raise CalcError(f"unexpected character {expr[i]!r} at position {i} (numbers, + - * / "
                      f"** % and parentheses only)")
    if m.lastgroup != "space":
      out.append(m.group())
    i = m.end()
  if not out:
    raise CalcError("empty expression")
  return out


def _check_size(x: Fraction) -> Fraction:
  if max(x.numerator.bit_length(), x.denominator.bit_length()) > MAX_BITS:
    raise CalcError(f"number too large (more than {MAX_BITS} bits)")
  return x


class _Parser:
  """Recursive descent over the token list (grammar in the module docstring)."""

  def __init__(self, tokens: list[str]):
    self.tokens, self.i, self.depth = tokens, 0, 0

  def peek(self) -> str | None:
    return self.tokens[self.i] if self.i < len(self.tokens) else None

  def take(self) -> str:
    t = self.peek()
    if t is None:
      raise CalcError("unexpected end of expression")
    self.i += 1
    return t

  def enter(self):
    self.depth += 1
    if self.depth > MAX_DEPTH:
      raise CalcError(f"nested too deeply (more than {MAX_DEPTH} levels)")

  def expr(self) -> Fraction:
    x = self.term()
    while self.peek() in ("+", "-"):
      x = _check_size(x + self.term() if self.take() == "+" else x - self.term())
    return x

  def term(self) -> Fraction:
    x = self.factor()
    while self.peek() in ("*", "/"):
      op = self.take()
      y = self.factor()
      if op == "/" and y == 0:
        raise CalcError("division by zero")
      x = _check_size(x * y if op == "*" else x / y)
    return x

  def factor(self) -> Fraction:
    sign = 1
    while self.peek() in ("+", "-"):
      sign = -sign if self.take() == "-" else sign
    return sign * self.power()

  def power(self) -> Fraction:
    base = self.postfix()
    if self.peek() != "**":
      return base
    self.take()
    self.enter()
    e = self.factor()
    self.depth -= 1
    if e.denominator != 1:
      raise CalcError(f"non-integer exponent {normalize_number(str(e))} (the result would "
                      f"not be exact)")
    if abs(e) > MAX_EXPONENT:
      raise CalcError(f"exponent {e} too large (|exponent| <= {MAX_EXPONENT})")
    if base == 0 and e < 0:
      raise CalcError("division by zero (0 to a negative power)")
    bits = max(base.numerator.bit_length(), base.denominator.bit_length())
    if bits > 1 and (bits - 1) * abs(int(e)) > MAX_BITS:
      raise CalcError(f"number too large (more than {MAX_BITS} bits)")
    return _check_size(base ** int(e))

  def postfix(self) -> Fraction:
    x = self.atom()
    if self.peek() == "%":
      self.take()
      x = x / 100
    return x

  def atom(self) -> Fraction:
    t = self.take()
    if t == "(":
      self.enter()
      x = self.expr()
      if self.take() != ")":
        raise CalcError("expected ')'")
      self.depth -= 1
      return x
    if t[0].isdigit() or t[0] == ".":
      return _check_size(Fraction(t.replace(",", "")))
    raise CalcError(f"unexpected {t!r}")


def evaluate(expr: str) -> Fraction:
  """The exact value of `expr` (grammar and limits in the module docstring), or CalcError."""
  p = _Parser(tokenize(expr))
  x = p.expr()
  if p.peek() is not None:
    raise CalcError(f"unexpected {p.peek()!r} after a complete expression")
  return x


def format_number(x: Fraction) -> str:
  """A value as a GSM8K answer is written: "24", "0.2", "-3.5", "10/3"."""
  return normalize_number(f"{x.numerator}/{x.denominator}")


def calculate(expr: str) -> str:
  """`format_number(evaluate(expr))`: calculate("48/2") -> "24"; CalcError if refused."""
  return format_number(evaluate(expr))


# ----------------------------------------------------------------------------
# The environment
# ----------------------------------------------------------------------------

TOOL_NAME = "calculator"


class CalculatorEnv:
  """Tool use: calculator calls answered with exact results, then a checked final answer.

  max_tool_calls: calls allowed per episode (tool calls and malformed calls count; a call
  beyond it ends the episode with `incorrect`). correct / incorrect: the final reward.
  rel_tol: see `rewards.math.answers_match`. max_turns = max_tool_calls + 1.
  """

  observation_role = "tool"

  def __init__(self, max_tool_calls: int = 4, correct: float = 1.0, incorrect: float = 0.0,
               rel_tol: float = 0.0):
    if isinstance(max_tool_calls, bool) or not isinstance(max_tool_calls, int) or \
        max_tool_calls < 0:
      raise ValueError(f"max_tool_calls={max_tool_calls!r}: expected an integer >= 0")
    self.max_tool_calls, self.max_turns = max_tool_calls, max_tool_calls + 1
    self.correct, self.incorrect, self.rel_tol = float(correct), float(incorrect), float(rel_tol)
    self._answer, self._turn, self._calls, self._done = None, 0, 0, False

  def reset(self, row: dict, seed: int) -> None:
    del seed  # nothing random
    self._answer = row_answer("calculator", row)
    self._turn, self._calls, self._done = 0, 0, False

  def step(self, model_text: str) -> EnvStep:
    if self._done:
      raise EnvError("env 'calculator': step() after the episode ended (reset() first)")
    out = self._step(model_text)
    self._done = out.done
    return out

  def _step(self, model_text: str) -> EnvStep:
    if self._answer is None:
      raise EnvError("env 'calculator': step() before reset()")
    self._turn += 1
    info = {"turn": self._turn, "tool_calls": 0, "tool_errors": 0, "malformed_tool_calls": 0}
    if not has_tool_tag(model_text):
      ok = answers_match(extract_final_number(model_text), self._answer, self.rel_tol)
      return EnvStep(None, self.correct if ok else self.incorrect, True,
                     {**info, "correct": ok})
    call = parse_tool_calls(model_text, known=(TOOL_NAME,))[0]
    self._calls += 1
    if self._calls > self.max_tool_calls:
      return EnvStep(None, self.incorrect, True,
                     {**info, "correct": False, "tool_budget_exceeded": 1})
    if isinstance(call, MalformedCall):
      info["malformed_tool_calls"] = 1
      return EnvStep(f"error: {call.reason}", 0.0, False, info)
    info["tool_calls"] = 1
    try:
      result = calculate(call.args)
    except CalcError as e:
      info["tool_errors"] = 1
      result = f"error: {e}"
    return EnvStep(result, 0.0, False, info)
