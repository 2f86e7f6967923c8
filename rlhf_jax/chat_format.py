"""Chat formatting: a conversation (messages) as one prompt string in a named style.

Chat templates are explicit styles, not Jinja (`CHAT_STYLES`):

    chatml  <|im_start|>{role}\\n{content}<|im_end|>\\n ... <|im_start|>assistant\\n
            (SmolLM2, Qwen); a model's default system prompt, when its template
            adds one, is kept in `default_system` and prepended likewise
    llama3  <|begin_of_text|><|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>
            ... <|start_header_id|>assistant<|end_header_id|>\\n\\n
    gemma   <start_of_turn>{user|model}\\n{content}<end_of_turn>\\n ... <start_of_turn>model\\n
            (Gemma 2 / 3; a system message goes in front of the first user turn,
            followed by a blank line, as Gemma 3's template does; <bos> comes from add_bos)
    plain   {Role}: {content}\\n ... Assistant:      (our SentencePiece models)

Tool results (role "tool", the observations of tool-use environments, rlhf_jax/envs):
chatml and plain render the role as written ("<|im_start|>tool\\n...", "Tool: ..."); llama3
uses the "ipython" header, the role Llama 3.1+ templates give tool output; gemma has no
tool role (user / model only), so a tool message is a user turn whose content starts with
"Tool result: " (`TOOL_PREFIX_GEMMA`).

The style is detected from a model's template text (contains <|im_start|> ->
chatml, <|start_header_id|> -> llama3, <start_of_turn> -> gemma) or given explicitly; without either it
is "plain". For every style the prompt with add_generation_prompt=True is a
prefix of the conversation that includes the assistant's reply.
"""

from __future__ import annotations

import re
from typing import Sequence

CHAT_STYLES = ("chatml", "llama3", "gemma", "plain")
TOOL_PREFIX_GEMMA = "Tool result: "


def detect_chat_style(template: str | None) -> str | None:
  """'chatml' / 'llama3' / 'gemma' from a model's Jinja chat template text, else None."""
  if not template:
    return None
  if "<|im_start|>" in template:
    return "chatml"
  if "<|start_header_id|>" in template:
    return "llama3"
  if "<start_of_turn>" in template:
    return "gemma"
  return None


def chatml_default_system(template: str | None) -> str | None:
  """The system prompt a chatml Jinja template inserts when none is given, if any.

  Finds a literal '<|im_start|>system\\n...<|im_end|>' string in the template
  (SmolLM2: "You are a helpful AI assistant named SmolLM, trained by Hugging
  Face"; Qwen2.5: "You are Qwen, ...").
  """
  if not template:
    return None
  for m in re.finditer(r"<\|im_start\|>system(?:\n|\\n)(.*?)<\|im_end\|>", template, re.S):
    text = m.group(1)
    if not any(ch in text for ch in "'\"{}+"):  # a literal, not template code
      return text.replace("\\n", "\n")
  return None


def render_chat(messages: Sequence[dict], style: str, add_generation_prompt: bool = True,
                default_system: str | None = None) -> str:
  """Render messages in one of CHAT_STYLES (see the module docstring)."""
  if style not in CHAT_STYLES:
    raise ValueError(f"chat style {style!r}: expected one of {list(CHAT_STYLES)}")
  msgs = []
  for i, m in enumerate(messages):
    if not isinstance(m, dict) or "role" not in m or "content" not in m:
      raise ValueError(f"messages[{i}]={m!r}: expected a dict with 'role' and 'content'")
    msgs.append((str(m["role"]), str(m["content"])))
  if style == "chatml":
    if default_system and msgs and msgs[0][0] != "system":
      msgs.insert(0, ("system", default_system))
    out = "".join(f"<|im_start|>{r}\n{c}<|im_end|>\n" for r, c in msgs)
    return out + ("<|im_start|>assistant\n" if add_generation_prompt else "")
  if style == "llama3":
    msgs = [("ipython" if r == "tool" else r, c) for r, c in msgs]
    out = "<|begin_of_text|>" + "".join(
        f"<|start_header_id|>{r}<|end_header_id|>\n\n{c.strip()}<|eot_id|>" for r, c in msgs)
    return out + ("<|start_header_id|>assistant<|end_header_id|>\n\n"
                  if add_generation_prompt else "")
  if style == "gemma":
    msgs = [("user", TOOL_PREFIX_GEMMA + c) if r == "tool" else (r, c) for r, c in msgs]
    if msgs and msgs[0][0] == "system":
      system = msgs.pop(0)[1]
      if msgs and msgs[0][0] == "user":
        msgs[0] = ("user", f"{system}\n\n{msgs[0][1]}")
      else:
        msgs.insert(0, ("user", system))
    out = "".join(f"<start_of_turn>{'model' if r == 'assistant' else r}\n{c}<end_of_turn>\n"
                  for r, c in msgs)
    return out + ("<start_of_turn>model\n" if add_generation_prompt else "")
  out = "".join(f"{r.capitalize()}: {c}\n" for r, c in msgs)
  return out + ("Assistant:" if add_generation_prompt else "")
