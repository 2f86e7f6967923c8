"""Bundled synthetic tasks: small, learnable, generated deterministically from a seed.

They let the whole pipeline run end to end on a laptop CPU in minutes, with a
known-learnable target (so a falling eval loss means the plumbing works).
"""
from __future__ import annotations

import json
import os
import string

import numpy as np

TASKS = ("reverse", "sort", "add")


def make_example(task: str, rng: np.random.Generator, min_len: int = 3, max_len: int = 8) -> dict:
  """One {"prompt", "completion"} pair.

  reverse: "reverse: qwxe" -> "exwq";  sort: "sort: qwxe" -> "eqwx";
  add: "add: 47+158" -> "205".
  """
  if task in ("reverse", "sort"):
    n = int(rng.integers(min_len, max_len + 1))
    s = "".join(rng.choice(list(string.ascii_lowercase[:12]), size=n))
    out = s[::-1] if task == "reverse" else "".join(sorted(s))
    return {"prompt": f"{task}: {s}", "completion": out}
  if task == "add":
    a, b = (int(x) for x in rng.integers(0, 10 ** (max_len // 2), size=2))
    return {"prompt": f"add: {a}+{b}", "completion": str(a + b)}
  raise ValueError(f"unknown synthetic task {task!r}; expected one of {TASKS}")


def write_task(path: str, task: str, num_examples: int, seed: int, **kwargs) -> str:
  """Write `num_examples` rows of `task` as JSONL to `path` (atomic)."""
  rng = np.random.default_rng(seed)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    for _ in range(num_examples):
      f.write(json.dumps(make_example(task, rng, **kwargs)) + "\n")
  os.replace(tmp, path)
  return path


# ----------------------------------------------------------------------------
# Verifiable prompt tasks (online RL): a prompt and a reference final answer
# ----------------------------------------------------------------------------

VERIFIABLE_TASKS = ("add", "arithmetic", "word")
ENV_TASKS = ("guess_number", "calc_chain")  # prompts for the multi-turn envs (rlhf_jax/envs)
_NAMES = ("Ann", "Ben", "Cara", "Dev", "Eli", "Fay", "Gus", "Hana")
_ITEMS = ("apples", "books", "coins", "pens", "shells", "stamps")


def make_verifiable_example(task: str, rng: np.random.Generator, digits: int = 2) -> dict:
  """One {"prompt", "answer", "solution"} example with a checkable numeric answer.

  digits (>= 1) sets the difficulty: operands are drawn uniformly from
  [0, 10**digits) (word problems: [1, 10**digits)).

    add         "add: 47+15" -> "62"; the same format as `make_example("add")`
                (it draws the operands), so an SFT model of that task transfers.
    arithmetic  "compute: 47*15" -> "705"; op uniform over + - * (results may be negative).
    word        "Ann has 47 pens. Ann buys 15 more. How many pens does Ann have now?"
                -> "62"; also gives away (-) and boxes of k (*); the solution is
                GSM8K-style: "47 + 15 = 62\\n#### 62".

  Multi-turn tasks (`ENV_TASKS`, for the environments in rlhf_jax/envs; answer = what the
  env checks against):

    guess_number  "guess 1-8" -> "5": the secret of env `guess_number`, uniform in
                  [1, 2**(digits+2)] (digits=1: 1-8, 2: 1-16); set the env's hi to match.
    calc_chain    "calc: 47*15+382" -> "1087": two operations (+ - *, usual precedence) on
                  operands in [0, 10**digits), for env `calculator`: too long to do in one's
                  head at 3+ digits, a copy job with the tool.

  solution: the reference completion (add / arithmetic / multi-turn: the answer itself).
  """
  if digits < 1:
    raise ValueError(f"digits={digits}: must be >= 1")
  if task == "add":
    ex = make_example("add", rng, max_len=2 * digits)
    return {"prompt": ex["prompt"], "answer": ex["completion"], "solution": ex["completion"]}
  if task == "arithmetic":
    a, b = (int(x) for x in rng.integers(0, 10 ** digits, size=2))
    op = "+-*"[int(rng.integers(3))]
    value = a + b if op == "+" else a - b if op == "-" else a * b
    return {"prompt": f"compute: {a}{op}{b}", "answer": str(value), "solution": str(value)}
  if task == "word":
    a, b = (int(x) for x in rng.integers(1, 10 ** digits, size=2))
    name = _NAMES[int(rng.integers(len(_NAMES)))]
    item = _ITEMS[int(rng.integers(len(_ITEMS)))]
    kind = int(rng.integers(3))
    if kind == 0:
      text = f"{name} has {a} {item}. {name} buys {b} more. How many {item} does {name} have now?"
      expr, value = f"{a} + {b}", a + b
    elif kind == 1:
      a, b = max(a, b), min(a, b)
      text = (f"{name} has {a} {item}. {name} gives away {b} of them. "
              f"How many {item} does {name} have left?")
      expr, value = f"{a} - {b}", a - b
    else:
      text = f"{name} buys {a} boxes with {b} {item} in each box. How many {item} is that?"
      expr, value = f"{a} * {b}", a * b
    return {"prompt": text, "answer": str(value), "solution": f"{expr} = {value}\n#### {value}"}
  if task == "guess_number":
    hi = guess_number_hi(digits)
    secret = str(int(rng.integers(1, hi + 1)))
    return {"prompt": f"guess 1-{hi}", "answer": secret, "solution": secret}
  if task == "calc_chain":
    a, b, c = (int(x) for x in rng.integers(0, 10 ** digits, size=3))
    op1, op2 = ("+-*"[int(i)] for i in rng.integers(3, size=2))
    if op2 == "*" and op1 != "*":
      value = _apply(a, op1, b * c)
    else:
      value = _apply(_apply(a, op1, b), op2, c)
    return {"prompt": f"calc: {a}{op1}{b}{op2}{c}", "answer": str(value), "solution": str(value)}
  raise ValueError(f"unknown verifiable task {task!r}; expected one of "
                   f"{VERIFIABLE_TASKS + ENV_TASKS}")


def guess_number_hi(digits: int) -> int:
  """The top of the guess_number range for a difficulty: 2**(digits + 2)."""
  return 2 ** (digits + 2)


def _apply(x: int, op: str, y: int) -> int:
  return x + y if op == "+" else x - y if op == "-" else x * y
