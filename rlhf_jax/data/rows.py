"""Parsing and identifying the rows of the data files: preference pairs, prompt sets and
GSM8K (one place for the formats; the loaders in `preferences` / `prompts` and the TFDS
builders in `tfds_builders` / `tfds_prompts` all read rows through these)."""
from __future__ import annotations

import hashlib
import json
import math
import re

from rlhf_jax.data.sft import DataError, nonempty_text

_ANNOTATION = re.compile(r"<<[^<>]*>>")


def check_messages(where: str, msgs) -> list[dict]:
  if (not isinstance(msgs, list) or not msgs or
      not all(isinstance(m, dict) and isinstance(m.get("role"), str) and
              isinstance(m.get("content"), str) for m in msgs)):
    raise DataError(f"{where}: 'prompt' must be a string or a non-empty list of objects with "
                    f"string 'role' and 'content'")
  return [{"role": m["role"], "content": m["content"]} for m in msgs]


def parse_preference_row(where: str, row: dict) -> dict:
  """{"prompt": [messages], "chosen", "rejected", "margin"} of one JSONL row, or DataError."""
  for key in ("prompt", "chosen", "rejected"):
    if key not in row:
      raise DataError(f"{where}: missing key {key!r}; expected {{'prompt': str | [messages], "
                      f"'chosen': str, 'rejected': str, 'margin'?: number}} "
                      f"(keys present: {sorted(row)})")
  prompt = row["prompt"]
  if isinstance(prompt, str):
    messages = [{"role": "user", "content": prompt}]
  else:
    messages = check_messages(where, prompt)
  for key in ("chosen", "rejected"):
    if not isinstance(row[key], str):
      raise DataError(f"{where}: {key!r} must be a string, got {type(row[key]).__name__}")
  if row["chosen"].strip() == row["rejected"].strip():
    raise DataError(f"{where}: 'chosen' and 'rejected' are identical ({row['chosen'][:60]!r}); "
                    f"a pair must prefer one reply over a different one")
  margin = row.get("margin")
  if margin is None:
    margin = 0.0
  elif (isinstance(margin, bool) or not isinstance(margin, (int, float)) or
        not math.isfinite(margin)):
    raise DataError(f"{where}: 'margin' must be a finite number, got {margin!r}")
  return {"prompt": messages, "chosen": row["chosen"], "rejected": row["rejected"],
          "margin": float(margin)}


def file_digest(path: str) -> str:
  """sha256 hex digest of a file's bytes (identifies the source a dataset was built from)."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def strip_calculator_annotations(text: str) -> str:
  """GSM8K text without its calculator annotations: "48/2 = <<48/2=24>>24" -> "48/2 = 24"."""
  return _ANNOTATION.sub("", text)


def parse_gsm8k_answer(where: str, text: str) -> tuple[str, str]:
  """(answer, solution) of a GSM8K answer field; DataError when it has no '#### <answer>'.

  answer: the text after the last "####", stripped, thousands commas removed.
  solution: the text before it, annotations removed, trailing whitespace stripped.
  """
  if not isinstance(text, str) or "####" not in text:
    raise DataError(f"{where}: 'answer' must be a string ending in '#### <number>' "
                    f"(GSM8K format), got {str(text)[-80:]!r}")
  head, _, tail = text.rpartition("####")
  answer = tail.strip().replace(",", "")
  if not answer:
    raise DataError(f"{where}: nothing after '####' in 'answer'")
  return answer, strip_calculator_annotations(head).rstrip()


def parse_gsm8k_row(where: str, row: dict) -> dict:
  """{"prompt": [messages], "answer", "solution"} of one GSM8K row, or DataError."""
  for key in ("question", "answer"):
    if not isinstance(row.get(key), str):
      raise DataError(f"{where}: {key!r} must be a string (expected {{'question': str, "
                      f"'answer': str}}; keys present: {sorted(row)})")
  answer, solution = parse_gsm8k_answer(where, row["answer"])
  return {"prompt": [{"role": "user", "content": row["question"]}], "answer": answer,
          "solution": solution}


def parse_prompt_row(where: str, row: dict) -> dict:
  """{"prompt": [messages], "answer", "solution"} of one jsonl_prompts row, or DataError."""
  if "prompt" not in row:
    raise DataError(f"{where}: missing key 'prompt'; expected {{'prompt': str | [messages], "
                    f"'answer'?: str, 'solution'?: str}} (keys present: {sorted(row)})")
  prompt = row["prompt"]
  messages = ([{"role": "user", "content": nonempty_text(where, "prompt", prompt)}]
              if isinstance(prompt, str) else check_messages(where, prompt))
  answer = row.get("answer")
  if answer is None:
    answer = ""
  elif isinstance(answer, bool) or not isinstance(answer, (str, int, float)) or (
      isinstance(answer, float) and not math.isfinite(answer)):
    raise DataError(f"{where}: 'answer' must be a string or a finite number, got {answer!r}")
  elif not isinstance(answer, str):
    answer = json.dumps(answer)
  solution = row.get("solution")
  if solution is None:
    solution = ""
  elif not isinstance(solution, str):
    raise DataError(f"{where}: 'solution' must be a string, got {type(solution).__name__}")
  return {"prompt": messages, "answer": answer, "solution": solution}


# ----------------------------------------------------------------------------
# Built datasets: random access without TensorFlow
# ----------------------------------------------------------------------------
