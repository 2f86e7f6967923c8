"""The tool-call syntax of model turns, and its parser.

A model calls a tool by writing, anywhere in its turn,

    <tool>NAME: ARGS</tool>

NAME: the tool's name (letters, digits, '_', not starting with a digit), ARGS: the tool's
input text (leading / trailing whitespace stripped; may be empty; may not contain "<tool>"
or "</tool>"). Example: `Half of 48 is <tool>calculator: 48/2</tool>`.

A model turn ends at the first `</tool>` (`TOOL_CALL_END`, the rollout's extra stop
string; the text the env receives includes it), so a turn holds at most one complete
call; the env answers it with an observation message (role "tool") and the model
continues in a new turn. A turn without `<tool>` is a final answer.

`parse_tool_calls(text, known)` never raises: every `<tool>` (and every stray `</tool>`)
yields a `ToolCall`, or a `MalformedCall` with the reason --

    unclosed       "<tool>" without a later "</tool>" (or a second "<tool>" comes first)
    stray close    "</tool>" with no "<tool>" before it
    no colon       "<tool>calculator 1+2</tool>"
    empty name     "<tool>: 1+2</tool>"
    bad name       a name with other characters ("<tool>my tool: x</tool>")
    unknown tool   a well-formed call to a name not in `known` (when known is given)
"""
from __future__ import annotations

import dataclasses
import re
from typing import Collection

TOOL_CALL_START = "<tool>"
TOOL_CALL_END = "</tool>"
_NAME = re.compile(r"[A-Za-z_]\w*\Z", re.ASCII)
_TAG = re.compile(r"<tool>|</tool>")


@dataclasses.dataclass(frozen=True)
class ToolCall:
  name: str
  args: str
  start: int   # span of the whole "<tool>...</tool>" in the text
  end: int


@dataclasses.dataclass(frozen=True)
class MalformedCall:
  text: str    # the offending text, tags included
  reason: str
  start: int
  end: int


def format_tool_call(name: str, args: str) -> str:
  """The text of a call: ("calculator", "48/2") -> "<tool>calculator: 48/2</tool>"."""
  if not _NAME.match(name):
    raise ValueError(f"tool name {name!r}: expected letters, digits and '_' (not starting "
                     f"with a digit)")
  if TOOL_CALL_START in args or TOOL_CALL_END in args:
    raise ValueError(f"tool args {args!r} contain a tool tag")
  return f"{TOOL_CALL_START}{name}: {args}{TOOL_CALL_END}"


def _call(text: str, start: int, end: int, known: Collection[str] | None):
  body = text[start + len(TOOL_CALL_START):end - len(TOOL_CALL_END)]
  whole = text[start:end]
  if ":" not in body:
    return MalformedCall(whole, "no colon: expected <tool>NAME: ARGS</tool>", start, end)
  name, _, args = body.partition(":")
  name = name.strip()
  if not name:
    return MalformedCall(whole, "empty tool name", start, end)
  if not _NAME.match(name):
    return MalformedCall(whole, f"bad tool name {name!r} (letters, digits, '_')", start, end)
  if known is not None and name not in known:
    return MalformedCall(whole, f"unknown tool {name!r}; tools: {sorted(known)}", start, end)
  return ToolCall(name, args.strip(), start, end)


def parse_tool_calls(text: str, known: Collection[str] | None = None
                     ) -> list[ToolCall | MalformedCall]:
  """Every tool call of `text`, in order (see the module docstring); never raises."""
  out: list[ToolCall | MalformedCall] = []
  open_at = None
  for m in _TAG.finditer(text or ""):
    if m.group() == TOOL_CALL_START:
      if open_at is not None:
        out.append(MalformedCall(text[open_at:m.start()], "unclosed <tool> tag", open_at,
                                 m.start()))
      open_at = m.start()
    elif open_at is None:
      out.append(MalformedCall(m.group(), "stray </tool> without <tool>", m.start(), m.end()))
    else:
      out.append(_call(text, open_at, m.end(), known))
      open_at = None
  if open_at is not None:
    out.append(MalformedCall(text[open_at:], "unclosed <tool> tag", open_at, len(text)))
  return out


def has_tool_tag(text: str) -> bool:
  """Whether a turn tries to call a tool at all (a "<tool>" or "</tool>" in it)."""
  return bool(text) and (TOOL_CALL_START in text or TOOL_CALL_END in text)
