"""Step-labelled solutions for process reward models (PRMs), from real GSM8K.

A PRM scores every step of a solution, not only the final answer (Uesato et al.
2022, "Solving math word problems with process- and outcome-based feedback";
Lightman et al. 2023, "Let's Verify Step by Step"). Human step labels are
expensive; GSM8K solutions carry calculator annotations that make step labels
verifiable without annotators:

    Natalia sold 48/2 = <<48/2=24>>24 clips in May.

Steps: one per line of the answer, the final "#### N" line excluded. A step is
CORRECT (label 1) when every `<<expr=value>>` annotation in it evaluates to its
value (`check_annotation`: `safe_eval` of expr -- numbers, + - * / and
parentheses only, no `eval` -- equal to value rounded to value's shown decimals).
Steps without annotations are labelled correct (nothing to refute).

Negatives (`corrupt_solution`): one annotated step (chosen by a seeded RNG) gets a
wrong result -- the annotated value AND the number printed right after the
annotation change consistently (`<<48/2=24>>24` -> `<<48/2=26>>26`), so only the
arithmetic betrays it. Label convention: the "first error" one of Lightman et
al. -- the solution is CUT after its first wrong step (PRM800K's raters also
stop at the first wrong step), so every labelled step is either correct with
all earlier steps correct, or the first wrong one. Nothing after the first
error is labelled (those steps would reuse the wrong number consistently and
their own arithmetic could be right or wrong; we make no claim about them).
Real solutions whose own annotations fail the check (GSM8K has a few) are cut
the same way at their first wrong step.

Rows (`write_prm_jsonl`): {"prompt": question, "steps": [str, ...], "labels":
[0/1, ...], "first_error": index or -1, "corrupted": bool}.

Tokenization (`tokenize_prm_example`, shared with `rlhf_jax.rewards.prm`):

    prompt_ids (chat template + generation prompt, LEFT-truncated to max_prompt_len)
    + enc(step_0) + enc("\\n") + enc(step_1) + ... + enc(step_{n-1})

each step encoded separately (so step ends are exact token boundaries); the
label sits at each step's LAST token (`step_mask` 1 there, `step_labels` the
0/1 label). Steps whose last token falls beyond max_len are dropped.
"""
from __future__ import annotations

import ast
import json
import operator
import random
import re
from fractions import Fraction
from typing import Iterable, Sequence

import numpy as np

from rlhf_jax.data.rows import check_messages
from rlhf_jax.data.sft import DataError, encode_prompt, iter_jsonl

ANNOTATION = re.compile(r"<<([^<>]*)>>")
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
        ast.Div: operator.truediv}


class UnsafeExpression(ValueError):
  """An expression outside numbers, + - * / and parentheses."""


def safe_eval(expr: str) -> Fraction:
  """Exact value of an arithmetic expression: decimal numbers, unary +/-, binary
  + - * / and parentheses. Anything else (names, calls, **, attributes, strings)
  raises UnsafeExpression; division by zero raises ZeroDivisionError. Parsed with
  `ast` and evaluated by walking the tree -- never `eval`."""
  expr = expr.replace(",", "").strip()
  if len(expr) > 200:
    raise UnsafeExpression(f"expression too long ({len(expr)} chars)")
  try:
    tree = ast.parse(expr, mode="eval")
  except SyntaxError as e:
    raise UnsafeExpression(f"cannot parse {expr!r}: {e.msg}") from None

  def walk(node):
    if isinstance(node, ast.Expression):
      return walk(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
      return Fraction(str(node.value))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
      v = walk(node.operand)
      return v if isinstance(node.op, ast.UAdd) else -v
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
      return _OPS[type(node.op)](walk(node.left), walk(node.right))
    raise UnsafeExpression(f"{expr!r}: {type(node).__name__} not allowed (numbers, + - * / "
                           f"and parentheses only)")

  return walk(tree)


def _decimals(s: str) -> int:
  return len(s.split(".")[1]) if "." in s else 0


def check_annotation(annotation: str) -> bool | None:
  """True/False: does `expr=value` hold (value = expr rounded to value's decimals);
  None: not checkable (no '=', unsafe or unparsable expression, division by zero)."""
  if "=" not in annotation:
    return None
  expr, _, value = annotation.rpartition("=")
  value = value.replace(",", "").strip()
  try:
    got = safe_eval(expr)
    want = Fraction(value)
  except (UnsafeExpression, ZeroDivisionError, ValueError):
    return None
  tol = Fraction(1, 2 * 10 ** _decimals(value)) if _decimals(value) else Fraction(0)
  return abs(got - want) <= tol


def split_steps(answer: str) -> list[str]:
  """The solution's steps: its non-empty lines, the final '#### N' line excluded."""
  return [s for s in (line.strip() for line in answer.split("\n"))
          if s and not s.startswith("####")]


def step_correct(step: str) -> bool | None:
  """1 step: True if every annotation checks (or there is none), False if one fails,
  None if one cannot be checked."""
  results = [check_annotation(m.group(1)) for m in ANNOTATION.finditer(step)]
  if any(r is None for r in results):
    return None
  return all(results)


def _fmt(x: Fraction, like: str) -> str:
  d = _decimals(like)
  if d == 0:
    return str(int(x))
  return f"{float(x):.{d}f}"


def _wrong_value(value: str, rng: random.Random) -> str:
  """A different number of the same form (integer stays integer, same decimals)."""
  v = Fraction(value)
  d = _decimals(value)
  unit = Fraction(1, 10 ** d)
  for _ in range(20):
    kind = rng.random()
    if kind < 0.5:
      new = v + unit * rng.choice([-3, -2, -1, 1, 2, 3, 10, -10])
    elif kind < 0.8:
      new = v * 2
    else:
      new = v + unit * rng.randint(4, 9) * rng.choice([-1, 1])
    if v >= 0 and new < 0:
      new = -new
    s = _fmt(new, value)
    if Fraction(s) != v:
      return s
  return _fmt(v + unit, value)


def corrupt_step(step: str, rng: random.Random) -> str | None:
  """The step with one annotation's result changed consistently (annotated value and
  the number printed right after it), or None if no annotation of the step has its
  value printed right after it."""
  cands = []
  for m in ANNOTATION.finditer(step):
    expr, _, value = m.group(1).rpartition("=")
    value_s = value.strip()
    if not expr or not value_s:
      continue
    try:
      Fraction(value_s.replace(",", ""))
    except ValueError:
      continue
    if step[m.end():].startswith(value_s):
      cands.append((m, expr, value_s))
  if not cands:
    return None
  m, expr, value_s = rng.choice(cands)
  new = _wrong_value(value_s.replace(",", ""), rng)
  return step[:m.start()] + f"<<{expr}={new}>>{new}" + step[m.end() + len(value_s):]


def label_solution(steps: Sequence[str]) -> tuple[list[str], list[int], int] | None:
  """(steps cut after the first wrong one, 0/1 labels, first_error or -1); None if a
  step cannot be checked."""
  labels = []
  for s in steps:
    ok = step_correct(s)
    if ok is None:
      return None
    labels.append(int(ok))
    if not ok:
      n = len(labels)
      return list(steps[:n]), labels, n - 1
  return list(steps), labels, -1


def corrupt_solution(steps: Sequence[str], rng: random.Random) -> tuple[list[str], int] | None:
  """(steps with one step corrupted, its index); None if no step can be corrupted."""
  idx = [i for i, s in enumerate(steps) if corrupt_step(s, random.Random(0)) is not None]
  if not idx:
    return None
  i = rng.choice(idx)
  out = list(steps)
  out[i] = corrupt_step(steps[i], rng)
  return out, i


def read_gsm8k(path: str) -> Iterable[tuple[int, str, str]]:
  """(line number, question, answer) of every row; DataError with file:line otherwise."""
  with open(path) as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
      if not isinstance(row, dict) or not isinstance(row.get("question"), str) or not (
          isinstance(row.get("answer"), str)):
        raise DataError(f"{path}:{lineno}: expected {{\"question\": str, \"answer\": str}}, "
                        f"got {str(row)[:80]!r}")
      if "####" not in row["answer"]:
        raise DataError(f"{path}:{lineno}: answer has no final '#### N' line")
      yield lineno, row["question"], row["answer"]


def gsm8k_prm_rows(path: str, max_examples: int = 0, seed: int = 0, corrupt: bool = True,
                   stats: dict | None = None) -> list[dict]:
  """PRM rows from a GSM8K file: per solution its clean version (cut at a real error,
  if any) and, with corrupt=True, a corrupted copy (deterministic in seed and the line).
  max_examples: first solutions used (0 = all)."""
  stats = stats if stats is not None else {}
  for k in ("solutions", "unverifiable", "real_errors", "uncorruptible"):
    stats.setdefault(k, 0)
  rows = []
  for lineno, question, answer in read_gsm8k(path):
    if max_examples and stats["solutions"] >= max_examples:
      break
    stats["solutions"] += 1
    steps = split_steps(answer)
    labelled = label_solution(steps)
    if labelled is None or not steps:
      stats["unverifiable"] += 1
      continue
    s, labels, first = labelled
    stats["real_errors"] += first >= 0
    rows.append({"prompt": question, "steps": s, "labels": labels, "first_error": first,
                 "corrupted": False})
    if corrupt and first < 0:
      bad = corrupt_solution(steps, random.Random(seed * 1_000_003 + lineno))
      if bad is None:
        stats["uncorruptible"] += 1
        continue
      cut, i = bad[0][:bad[1] + 1], bad[1]
      rows.append({"prompt": question, "steps": cut, "labels": [1] * i + [0],
                   "first_error": i, "corrupted": True})
  return rows


def write_prm_jsonl(path: str, rows: Sequence[dict]) -> None:
  with open(path, "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")


def read_prm_jsonl(path: str) -> list[dict]:
  """Rows of a PRM JSONL file, checked: DataError with file:line for a malformed row."""
  rows = []
  for where, r in iter_jsonl(path):
    if isinstance(r, DataError):
      raise r
    if not isinstance(r.get("prompt"), (str, list)):
      raise DataError(f"{where}: expected an object with 'prompt' (str or messages); keys "
                      f"present: {sorted(r)}")
    if isinstance(r["prompt"], list):
      check_messages(where, r["prompt"])
    steps, labels = r.get("steps"), r.get("labels")
    if not isinstance(steps, list) or not steps or not all(isinstance(s, str) for s in steps):
      raise DataError(f"{where}: 'steps' must be a non-empty list of strings")
    if not isinstance(labels, list) or len(labels) != len(steps) or not all(
        x in (0, 1) and not isinstance(x, float) for x in labels):
      raise DataError(f"{where}: 'labels' must be a list of 0/1, one per step "
                      f"({len(steps)} steps)")
    rows.append(r)
  if not rows:
    raise DataError(f"{path}: no examples (empty file)")
  return rows


def messages(prompt) -> list[dict]:
  return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def _truncate_left(ids: list[int], n: int, bos_id) -> list[int]:
  if len(ids) <= n:
    return ids
  if bos_id is not None and ids and ids[0] == bos_id:
    return [bos_id] + ids[len(ids) - n + 1:]
  return ids[len(ids) - n:]


def tokenize_steps(prompt, steps: Sequence[str], tokenizer, max_prompt_len: int,
                   max_len: int, step_sep: str = "\n"):
  """(tokens int32 [T], segment_ids [T], step_ends list[int]): the PRM's layout (module
  docstring); step_ends[i] = position of step i's last token, for the steps that fit
  (a step that encodes to no tokens, or ends beyond T, ends the list)."""
  ids = _truncate_left(encode_prompt(tokenizer, messages(prompt)), max_prompt_len,
                       tokenizer.bos_id)
  sep = tokenizer.encode(step_sep) if step_sep else []
  ends = []
  for i, s in enumerate(steps):
    piece = (sep if i else []) + tokenizer.encode(s)
    if not tokenizer.encode(s) or len(ids) + len(piece) > max_len:
      break
    ids = ids + piece
    ends.append(len(ids) - 1)
  T = max_len
  tokens = np.full((T,), tokenizer.pad_id, np.int32)
  seg = np.zeros((T,), np.int32)
  n = min(len(ids), T)
  tokens[:n] = ids[:n]
  seg[:n] = 1
  return tokens, seg, ends


def tokenize_prm_rows(rows: Sequence[dict], tokenizer, max_prompt_len: int, max_len: int,
                      stats: dict | None = None) -> dict[str, np.ndarray]:
  """Arrays [N, T]: tokens, segment_ids, step_mask (1 at labelled step ends),
  step_labels (0/1 there); [N]: first_error (-1 none; -2 = the first error was cut
  off by max_len), corrupted."""
  stats = stats if stats is not None else {}
  N, T = len(rows), max_len
  out = {"tokens": np.zeros((N, T), np.int32), "segment_ids": np.zeros((N, T), np.int32),
         "step_mask": np.zeros((N, T), np.int32), "step_labels": np.zeros((N, T), np.int32),
         "first_error": np.full((N,), -1, np.int32), "corrupted": np.zeros((N,), np.int32)}
  kept = dropped = 0
  for i, r in enumerate(rows):
    tokens, seg, ends = tokenize_steps(r["prompt"], r["steps"], tokenizer, max_prompt_len, T)
    out["tokens"][i], out["segment_ids"][i] = tokens, seg
    for j, t in enumerate(ends):
      out["step_mask"][i, t] = 1
      out["step_labels"][i, t] = r["labels"][j]
    first = int(r.get("first_error", next((j for j, x in enumerate(r["labels"]) if x == 0), -1)))
    out["first_error"][i] = first if first < len(ends) else -2
    out["corrupted"][i] = int(bool(r.get("corrupted", False)))
    kept += len(ends)
    dropped += len(r["steps"]) - len(ends)
  stats.update(rows=N, steps=kept, steps_truncated=dropped,
               positive_frac=float(out["step_labels"].sum() / max(kept, 1)))
  return out


def first_error_prediction(probs_correct: Sequence[float], threshold: float = 0.5) -> int:
  """Index of the first step predicted wrong (p(correct) < threshold), -1 if none."""
  return next((i for i, p in enumerate(probs_correct) if p < threshold), -1)
