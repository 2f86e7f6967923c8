"""Anthropic HH-RLHF: split `{"chosen", "rejected"}` dialogue pairs into prompt + replies.

Each HH row holds two whole dialogues in the form

    "\\n\\nHuman: hi\\n\\nAssistant: hello\\n\\nHuman: bye\\n\\nAssistant: <reply>"

that share everything but the last assistant reply. `split_pair` returns the
shared prompt as chat messages ([{"role": "user"|"assistant", "content"}, ...])
and the two final replies; `reconstruct_dialogue(prompt_messages, reply)`
renders them back, and for well-formed rows gives the original text exactly:

    reconstruct_dialogue(prompt, chosen_reply)   == row["chosen"]
    reconstruct_dialogue(prompt, rejected_reply) == row["rejected"]

Parsing rule (the inverse of the rendering): a turn starts at "\\n\\nHuman:" or
"\\n\\nAssistant:" (or at "Human:"/"Assistant:" at the very start of the text);
the one space after the colon belongs to the marker, everything else up to the
next marker is the content, verbatim (extra spaces, trailing whitespace, inner
newlines and inline "Human:" text without a preceding blank line all stay).

Quirks of the real data (harmless-base test, 2,312 rows), all split exactly:
- 5 rows where one reply itself continues the dialogue ("...\\n\\nAssistant: x
  \\n\\nHuman: y\\n\\nAssistant: z"; the model's sample ran on). Splitting both
  dialogues at their own last "\\n\\nAssistant:" would give two different
  prompts; the shared prompt is instead the longest common prefix that ends at
  an "\\n\\nAssistant:" marker, and such a reply keeps the later turns verbatim
  (stats key `split_at_common_prefix`).
- 4 empty chosen replies ("...\\n\\nAssistant: " with nothing after the space).
- 4 rows whose prompt has two consecutive turns of the same role (kept as is),
  4 with a prompt turn that starts with two spaces (one stays in the content),
  48 with "Human:" inside a turn or reply without the blank line before it
  (content, not a turn).
Rows that cannot be rendered back exactly (a marker without the space after
its colon, a dialogue that starts with "Human:" without the blank line) are
still parsed, and counted as `inexact`; text before the first marker, or a
pair without a shared prompt, is a malformed row (HHFormatError).
"""
from __future__ import annotations

import re

HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
ROLE_OF = {"Human": "user", "Assistant": "assistant"}
SPEAKER_OF = {"user": "Human", "assistant": "Assistant"}
_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant): ?")


class HHFormatError(ValueError):
  """A dialogue pair that cannot be split into a shared prompt and two replies."""


def parse_dialogue(text: str) -> list[dict]:
  """Messages of a `\\n\\nHuman: ...\\n\\nAssistant: ...` dialogue (see the module doc)."""
  parts = _TURN.split(text)
  if parts[0]:
    raise HHFormatError(f"text before the first 'Human:'/'Assistant:' turn: {parts[0][:60]!r}")
  return [{"role": ROLE_OF[parts[i]], "content": parts[i + 1]} for i in range(1, len(parts), 2)]


def render_dialogue(messages) -> str:
  """Inverse of `parse_dialogue`: "\\n\\nHuman: {content}" / "\\n\\nAssistant: {content}" turns."""
  out = []
  for i, m in enumerate(messages):
    speaker = SPEAKER_OF.get(m["role"])
    if speaker is None:
      raise ValueError(f"messages[{i}]: role {m['role']!r} has no HH-RLHF speaker; expected "
                       f"'user' or 'assistant'")
    out.append(f"\n\n{speaker}: {m['content']}")
  return "".join(out)


def reconstruct_dialogue(prompt_messages, reply: str) -> str:
  """The HH dialogue text of a prompt (messages) followed by one assistant reply."""
  return render_dialogue(prompt_messages) + f"{ASSISTANT} {reply}"


def _common_prefix_len(a: str, b: str) -> int:
  n = min(len(a), len(b))
  i = 0
  while i < n and a[i] == b[i]:
    i += 1
  return i


def split_pair(chosen: str, rejected: str) -> tuple[list[dict], str, str, dict]:
  """(prompt messages, chosen reply, rejected reply, flags) of one HH row.

  flags: {"split_at_common_prefix", "inexact", "reply_has_turns",
  "consecutive_same_role"} booleans describing the row (for statistics).
  Raises HHFormatError for a pair without a shared prompt that ends at an
  assistant turn.
  """
  if not isinstance(chosen, str) or not isinstance(rejected, str):
    raise HHFormatError("'chosen' and 'rejected' must be strings")
  i, j = chosen.rfind(ASSISTANT), rejected.rfind(ASSISTANT)
  if i < 0 or j < 0:
    raise HHFormatError(f"no '\\n\\nAssistant:' turn in {'chosen' if i < 0 else 'rejected'}")
  at_prefix = chosen[:i] != rejected[:j]
  if at_prefix:
    n = _common_prefix_len(chosen, rejected)
    i = chosen.rfind(ASSISTANT, 0, n)
    if i < 0:
      raise HHFormatError("chosen and rejected share no prompt that ends at an "
                          "'\\n\\nAssistant:' turn")
  prompt = parse_dialogue(chosen[:i])
  if not prompt:
    raise HHFormatError("empty prompt: the dialogue starts with the assistant's reply")
  replies = []
  for text in (chosen, rejected):
    reply = text[i + len(ASSISTANT):]
    replies.append(reply[1:] if reply.startswith(" ") else reply)
  exact = (reconstruct_dialogue(prompt, replies[0]) == chosen and
           reconstruct_dialogue(prompt, replies[1]) == rejected)
  flags = {
      "split_at_common_prefix": at_prefix,
      "inexact": not exact,
      "reply_has_turns": any(HUMAN in r or ASSISTANT in r for r in replies),
      "consecutive_same_role": any(a["role"] == b["role"] for a, b in zip(prompt, prompt[1:])),
  }
  return prompt, replies[0], replies[1], flags
