"""Constitution files (Bai et al. 2022, "Constitutional AI"): the principles that the
critique-revision loop (`ai_feedback_constitution`) and the LM judge's rubric (`judges`) read.

A file is a JSON list or JSONL (one principle a line) of objects with a unique "name", a
"critique" request and a "revision" request, and optionally a "preference" question.
Errors name file:line.
"""
from __future__ import annotations

import json
import os


PRINCIPLE_KEYS = ("name", "critique", "revision")
OPTIONAL_PRINCIPLE_KEYS = ("preference",)


class ConstitutionError(ValueError):
  """A malformed constitution file; the message names file:line."""


def _json_list_items(path: str, text: str) -> list[tuple[int, object]]:
  """(line, element) of a top-level JSON list, with the line each element starts on."""
  dec = json.JSONDecoder()

  def fail(msg, pos):
    line = text.count("\n", 0, pos) + 1
    raise ConstitutionError(f"{path}:{line}: {msg}")

  def skip(i):
    while i < len(text) and text[i] in " \t\r\n":
      i += 1
    return i

  i = skip(0)
  if i >= len(text) or text[i] != "[":
    fail("expected a JSON list of principles [{\"name\", \"critique\", \"revision\"}, ...]", i)
  i = skip(i + 1)
  items = []
  if i < len(text) and text[i] == "]":
    return items
  while True:
    try:
      obj, end = dec.raw_decode(text, i)
    except json.JSONDecodeError as e:
      raise ConstitutionError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column "
                              f"{e.colno})") from None
    items.append((text.count("\n", 0, i) + 1, obj))
    i = skip(end)
    if i < len(text) and text[i] == ",":
      i = skip(i + 1)
      continue
    if i < len(text) and text[i] == "]":
      break
    fail("expected ',' or ']' after a principle", i)
  if skip(i + 1) < len(text):
    fail("unexpected text after the list of principles", skip(i + 1))
  return items


def check_principle(where: str, obj) -> dict:
  """One principle {"name", "critique", "revision"[, "preference"]}, or ConstitutionError."""
  if not isinstance(obj, dict):
    raise ConstitutionError(f"{where}: expected a principle object {{\"name\", \"critique\", "
                            f"\"revision\"}}, got {type(obj).__name__}")
  unknown = sorted(set(obj) - set(PRINCIPLE_KEYS) - set(OPTIONAL_PRINCIPLE_KEYS))
  if unknown:
    raise ConstitutionError(f"{where}: unknown key {unknown[0]!r}; a principle has "
                            f"{list(PRINCIPLE_KEYS)} and optionally "
                            f"{list(OPTIONAL_PRINCIPLE_KEYS)}")
  for key in PRINCIPLE_KEYS:
    if key not in obj:
      raise ConstitutionError(f"{where}: principle is missing {key!r} (keys present: "
                              f"{sorted(obj)})")
  for key in PRINCIPLE_KEYS + OPTIONAL_PRINCIPLE_KEYS:
    if key in obj and (not isinstance(obj[key], str) or not obj[key].strip()):
      raise ConstitutionError(f"{where}: {key!r} must be a non-empty string, got "
                              f"{obj[key]!r}")
  return {k: obj[k] for k in PRINCIPLE_KEYS + OPTIONAL_PRINCIPLE_KEYS if k in obj}


def load_constitution(path: str) -> list[dict]:
  """The principles of a constitution file: a JSON list, or JSONL (`.jsonl`, one
  principle a line). Names must be unique; errors name file:line."""
  if not os.path.isfile(path):
    raise ConstitutionError(f"constitution file not found: {path}")
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
  except UnicodeDecodeError as e:
    raise ConstitutionError(f"{path}: not valid UTF-8 ({e.reason})") from None
  if path.endswith(".jsonl"):
    items = []
    for lineno, line in enumerate(text.splitlines(), start=1):
      if line.strip():
        try:
          items.append((lineno, json.loads(line)))
        except json.JSONDecodeError as e:
          raise ConstitutionError(f"{path}:{lineno}: not valid JSON ({e.msg} at column "
                                  f"{e.colno})") from None
  else:
    items = _json_list_items(path, text)
  if not items:
    raise ConstitutionError(f"{path}: no principles (an empty constitution)")
  principles, seen = [], {}
  for lineno, obj in items:
    p = check_principle(f"{path}:{lineno}", obj)
    if p["name"] in seen:
      raise ConstitutionError(f"{path}:{lineno}: duplicate principle name {p['name']!r} "
                              f"(first at line {seen[p['name']]})")
    seen[p["name"]] = lineno
    principles.append(p)
  return principles
