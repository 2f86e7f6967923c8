"""A conversation as token ids turn by turn: how multi-turn rollouts write episodes.

A multi-turn rollout (`rlhf_jax.rollout_multiturn`) never re-tokenizes the conversation:
it appends each model turn's sampled tokens, then the tokens of the text between that
turn and the next assistant reply (`chat_format.turn_texts`), tokenized on its own.
`Renderer.tokens` is that text's tokens; `episode_tokens` writes a whole conversation
({"messages"} with several assistant turns) the same way, for SFT on episodes
(`data.assistant_turns="all"`), so the SFT policy sees exactly the token layout RL
rollouts give it:

    encode_prompt(messages before the 1st assistant turn)
    encode(reply 1) + [EOS]                   (no EOS after a reply ending with a stop
                                               string such as "</tool>")
    Renderer.tokens(role, observation)        (the turn's closing text, the EOS part left
                                               out after an EOS, + the observation message
                                               + the next generation prompt)
    encode(reply 2) + [EOS] ...
"""
from __future__ import annotations

from typing import Sequence

from rlhf_jax.chat_format import turn_texts


class Renderer:
  """Observation text -> tokens between a model turn and the next (`chat_format.turn_texts`;
  the closing text's EOS part is left out when the turn ended with EOS)."""

  def __init__(self, tokenizer):
    self.tokenizer = tokenizer
    self.render = lambda m, gen: tokenizer.apply_chat_template(m, add_generation_prompt=gen)
    self.eos_text = tokenizer.decode([tokenizer.eos_id])

  def tokens(self, role: str, content: str, after_eos: bool) -> list[int]:
    close, nxt = turn_texts(self.render, role, content)
    if after_eos and self.eos_text and close.startswith(self.eos_text):
      close = close[len(self.eos_text):]
    return self.tokenizer.encode(close + nxt)


def episode_tokens(tokenizer, messages: Sequence[dict], prompt_ids: list[int],
                   stop_strings=()) -> tuple[list[int], list[int]]:
  """(ids, loss_mask) of a conversation written turn by turn (module docstring): the
  prompt ids (the messages before the first assistant turn, as `data.sft.encode_prompt`
  writes them) with mask 0, every assistant reply (+ EOS unless it ends with one of
  `stop_strings`) with mask 1, every other message's tokens between them with mask 0.
  `messages` start at the first assistant turn."""
  render = Renderer(tokenizer)
  ids, mask = list(prompt_ids), [0] * len(prompt_ids)
  after_eos = True
  for m in messages:
    if m["role"] == "assistant":
      t = tokenizer.encode(m["content"])
      after_eos = not any(m["content"].endswith(s) for s in stop_strings)
      if after_eos:
        t = t + [tokenizer.eos_id]
      ids, mask = ids + t, mask + [1] * len(t)
    else:
      t = render.tokens(m["role"], m["content"], after_eos)
      ids, mask = ids + t, mask + [0] * len(t)
  return ids, mask
