"""SFT transcripts for multi-turn tasks: scripted model turns played through the real env,
so that the tool results / feedback in the SFT data are exactly what RL will show.

`play(env, row, seed, turns)` runs scripted model turns through an env and returns the chat
transcript: the row's prompt messages, then each model turn (role "assistant", "weight": 1,
the multi-turn SFT row format of rlhf_jax/data/sft.py) and each observation (role
`env.observation_role`).

GSM8K with the calculator (`gsm8k_tool_row`): a GSM8K answer's calculator annotations
become tool calls; the text after a call continues in the next turn --

    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\\n... #### 72"
    assistant  "Natalia sold 48/2 = <tool>calculator: 48/2</tool>"
    tool       "24"
    assistant  "24 clips in May.\\n... #### 72"        (the final turn: the answer)

A row is kept only when every annotation holds (`data.prm.check_annotation`, GSM8K's own
rounding), the calculator accepts every expression, and the final answer is correct;
`write_gsm8k_tool_sft` counts the others by reason. `config.data.source="gsm8k_tools"` of
the SFT trainer converts data.train_path / eval_path this way.

Synthetic SFT tasks (`TASKS`; the SFT trainer's data.synthetic_task, difficulty
data.synthetic_digits), on the prompts of the RL prompt sets (`data.synthetic`):

    guess_number  guesses drawn uniformly from the range still possible after the
                  feedback so far (a valid, unoptimised player: RL can improve it towards
                  binary search), until correct or max guesses (4)
    calc_chain    "<tool>calculator: EXPR</tool>", then the result as the answer
"""
from __future__ import annotations

import collections
import re
from typing import Iterable

import numpy as np

from rlhf_jax.data.prm import ANNOTATION, check_annotation
from rlhf_jax.data.rows import parse_gsm8k_row
from rlhf_jax.data.sft import DataError, iter_jsonl, write_jsonl_rows
from rlhf_jax.data.synthetic import ENV_TASKS, guess_number_hi, make_verifiable_example
from rlhf_jax.envs.calculator import TOOL_NAME, CalcError, CalculatorEnv, evaluate
from rlhf_jax.envs.guess_number import GuessNumberEnv
from rlhf_jax.envs.tools import format_tool_call

TASKS = ENV_TASKS  # the SFT transcripts of the RL prompt tasks for the envs


def play(env, row: dict, seed: int, turns: Iterable[str]):
  """(messages, return, infos): the transcript of scripted `turns` played through `env`
  (reset with row, seed). Stops when the env is done; ValueError if turns run out first."""
  env.reset(row, seed)
  prompt = row["prompt"]
  messages = ([{"role": "user", "content": prompt}] if isinstance(prompt, str)
              else [dict(m) for m in prompt])
  total, infos = 0.0, []
  for text in turns:
    step = env.step(text)
    messages.append({"role": "assistant", "content": text, "weight": 1})
    total += step.reward
    infos.append(step.info)
    if step.done:
      return messages, total, infos
    messages.append({"role": env.observation_role, "content": step.observation})
  raise ValueError("the scripted turns ended before the episode")


# ----------------------------------------------------------------------------
# GSM8K calculator annotations -> tool-call transcripts
# ----------------------------------------------------------------------------

def gsm8k_tool_turns(answer: str) -> list[str] | None:
  """The model turns of a GSM8K answer: each annotation `<<expr=value>>` ends a turn with
  `<tool>calculator: expr</tool>`; None when an annotation has no '=' or no expression."""
  turns, pos = [], 0
  for m in ANNOTATION.finditer(answer):
    expr, eq, _ = m.group(1).rpartition("=")
    if not eq or not expr.strip():
      return None
    turns.append(answer[pos:m.start()] + format_tool_call(TOOL_NAME, expr.strip()))
    pos = m.end()
  turns.append(answer[pos:])
  return turns


def gsm8k_tool_row(row: dict, stats: collections.Counter | None = None) -> dict | None:
  """{"messages": [...]} of one official GSM8K row ({"question", "answer"}), or None (the
  reason counted in `stats`): see the module docstring."""
  stats = stats if stats is not None else collections.Counter()
  parsed = parse_gsm8k_row("gsm8k", row)  # DataError for a malformed row
  turns = gsm8k_tool_turns(row["answer"])
  if turns is None:
    stats["skipped_bad_annotation"] += 1
    return None
  annotations = [m.group(1) for m in ANNOTATION.finditer(row["answer"])]
  if not all(check_annotation(a) for a in annotations):
    stats["skipped_wrong_annotation"] += 1
    return None
  try:
    for a in annotations:
      evaluate(a.rpartition("=")[0])
  except CalcError:
    stats["skipped_calculator_refused"] += 1
    return None
  env = CalculatorEnv(max_tool_calls=len(annotations))
  messages, ret, _ = play(env, parsed, 0, turns)
  if ret != env.correct:
    stats["skipped_final_answer"] += 1
    return None
  stats["rows"] += 1
  stats["tool_calls"] += len(annotations)
  return {"messages": messages}


def write_gsm8k_tool_sft(src: str, out: str) -> dict:
  """Convert an official GSM8K JSONL file into multi-turn SFT rows at `out` (atomic).
  Returns the counts: rows, tool_calls, skipped_<reason>. DataError for a malformed row."""
  stats, rows = collections.Counter(), []
  for where, row in iter_jsonl(src):
    if isinstance(row, DataError):
      raise row
    try:
      r = gsm8k_tool_row(row, stats)
    except DataError as e:
      raise DataError(str(e).replace("gsm8k:", f"{where}:", 1)) from None
    if r is not None:
      rows.append(r)
  if not rows:
    raise DataError(f"{src}: no GSM8K row could be converted ({dict(stats)})")
  write_jsonl_rows(out, rows)
  return dict(stats)


# ----------------------------------------------------------------------------
# Synthetic transcripts
# ----------------------------------------------------------------------------

_GUESS_RANGE = re.compile(r"guess (\d+)-(\d+)")


def _guess_turns(row: dict, rng: np.random.Generator, max_guesses: int) -> list[str]:
  lo, hi = (int(x) for x in _GUESS_RANGE.match(row["prompt"]).groups())
  secret, turns = int(row["answer"]), []
  for _ in range(max_guesses):
    g = int(rng.integers(lo, hi + 1))
    turns.append(str(g))
    if g == secret:
      break
    lo, hi = (g + 1, hi) if secret > g else (lo, g - 1)
  return turns


def make_transcript(task: str, rng: np.random.Generator, digits: int = 1) -> dict:
  """One multi-turn SFT row {"messages": [...], "answer"} of `task` (see the module
  docstring); "answer" is the row's reference (the secret, the result), not read by SFT."""
  if task not in TASKS:
    raise ValueError(f"unknown multi-turn task {task!r}; expected one of {TASKS}")
  row = make_verifiable_example(task, rng, digits)
  if task == "guess_number":
    env = GuessNumberEnv(hi=guess_number_hi(digits), max_guesses=4)
    turns = _guess_turns(row, rng, env.max_guesses)
  else:
    env = CalculatorEnv(max_tool_calls=1)
    expr = row["prompt"].partition(":")[2].strip()
    turns = [format_tool_call(TOOL_NAME, expr), row["answer"]]
  messages, _, _ = play(env, row, 0, turns)
  return {"messages": messages, "answer": row["answer"]}


def write_task(path: str, task: str, num_examples: int, seed: int, digits: int = 1) -> str:
  """Write `num_examples` transcripts of `task` as JSONL to `path` (atomic)."""
  rng = np.random.default_rng(seed)
  return write_jsonl_rows(path, [make_transcript(task, rng, digits)
                                 for _ in range(num_examples)])
