"""Multi-turn conversations as tokens: which tokens are the assistant's (trained), which
are context (prompt, tool results, user feedback: never trained).

A conversation [user, assistant, tool, assistant, ...] is rendered with the tokenizer's
chat template (`rlhf_jax.chat_format`) and cut at the assistant contents:

    ids  = encode_prompt(messages[:a_0])           context: BOS + template up to the 1st reply
         + encode(content_0)                      assistant turn 0
         + encode(between_1)                      context: the template's end of turn 0, the
                                                  tool / user messages, the next generation prompt
         + encode(content_1) + ...
         + encode(content_last) + [EOS]           the last message (an assistant turn)

    between_k = render(messages[:a_k], generation prompt)[end of content_{k-1}:]

Whitespace the template puts between the generation prompt and a reply (plain: "Assistant:"
then " {content}") belongs to neither piece, as in single-turn SFT. Each piece is encoded
on its own (token boundaries at the cuts are exact), the way a
multi-turn rollout builds its context: the sampled ids of a turn, then the encoded
`between_text` of the observation. A conversation with one assistant message at the end
gives exactly the single-turn SFT example (`rlhf_jax.data.sft`: encode_prompt(prompt) +
encode(completion) + [EOS]).

Loss mask: 1 on the content (and the final EOS) of every trained assistant message, 0
elsewhere. A middle assistant turn is closed by the template's end-of-turn text in the
next context piece (not trained: a tool turn ends at the rollout's stop string, e.g.
`</tool>`, which is part of the content); only the last message ends with the EOS token.
"""
from __future__ import annotations

from typing import Sequence


def encode_prompt(tokenizer, messages) -> list[int]:
  """Token ids of the chat-rendered prompt, ending where the assistant reply starts.

  BOS is prepended when the tokenizer's model expects one (`add_bos`) and the
  template did not already put it there (llama3's <|begin_of_text|>).
  """
  ids = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
  if getattr(tokenizer, "add_bos", True) and tokenizer.bos_id is not None and (
      not ids or ids[0] != tokenizer.bos_id):
    ids = [tokenizer.bos_id] + ids
  return ids


def _render(tokenizer, messages, generation_prompt: bool) -> str:
  return tokenizer.apply_chat_template(list(messages), add_generation_prompt=generation_prompt)


def content_span(tokenizer, messages: Sequence[dict]) -> tuple[int, int]:
  """(start, end): where the last message (an assistant turn) 's content lies in
  render(messages) -- ValueError when the template does not keep it as one piece after
  the generation prompt (a template that rewrites replies cannot be cut into turns)."""
  prefix = _render(tokenizer, messages[:-1], True)
  full = _render(tokenizer, messages, False)
  content = messages[-1]["content"]
  if not full.startswith(prefix):
    raise ValueError("the chat template's generation prompt is not a prefix of the rendered "
                     "reply; cannot cut the conversation into turns")
  rest = full[len(prefix):]
  for skip in dict.fromkeys((0, len(rest) - len(rest.lstrip()))):  # plain: "Assistant: {c}"
    for shown in (content, content.strip(), content.lstrip(), content.rstrip()):
      if rest[skip:].startswith(shown):
        return len(prefix) + skip, len(prefix) + skip + len(shown)
  raise ValueError(f"the chat template rewrites the assistant reply {content[:40]!r}; cannot "
                   f"cut the conversation into turns")


def between_text(tokenizer, messages: Sequence[dict], following: Sequence[dict]) -> str:
  """The text after the content of the last message of `messages` (an assistant turn) up
  to the next assistant turn's generation prompt, with the `following` messages (tool
  results, user feedback) in between: what a multi-turn rollout appends after a turn."""
  _, end = content_span(tokenizer, messages)
  text = _render(tokenizer, list(messages) + list(following), True)
  if not text.startswith(_render(tokenizer, messages, False)[:end]):
    raise ValueError("the chat template renders earlier turns differently once more "
                     "messages follow; cannot cut the conversation into turns")
  return text[end:]


def tokenize_conversation(tokenizer, messages: Sequence[dict], trained: Sequence[bool]):
  """(ids list[int], loss_mask list[int]) of a conversation whose last message is an
  assistant turn (see the module docstring). trained[i]: put the loss on assistant
  message i (ignored for other roles)."""
  if not messages or messages[-1]["role"] != "assistant":
    raise ValueError("the last message must have role 'assistant'")
  if len(trained) != len(messages):
    raise ValueError(f"{len(trained)} trained flags for {len(messages)} messages")
  turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
  ids = list(encode_prompt(tokenizer, messages[:turns[0]]))
  mask = [0] * len(ids)
  for k, i in enumerate(turns):
    if k:
      prev = turns[k - 1]
      ctx = tokenizer.encode(between_text(tokenizer, messages[:prev + 1], messages[prev + 1:i]))
      ids += ctx
      mask += [0] * len(ctx)
    start, end = content_span(tokenizer, messages[:i + 1])
    text = _render(tokenizer, messages[:i + 1], False)[start:end]
    piece = tokenizer.encode(text) + ([tokenizer.eos_id] if i == len(messages) - 1 else [])
    ids += piece
    mask += [int(bool(trained[i]))] * len(piece)
  return ids, mask
