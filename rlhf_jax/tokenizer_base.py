"""The `Tokenizer` interface over a SentencePiece or Hugging Face `tokenizers` backend.

One `Tokenizer` class wraps either a `sentencepiece.SentencePieceProcessor`
(our own small models) or a `tokenizers.Tokenizer` (Hugging Face
tokenizer.json, or the BPE vocabulary of a GGUF file rebuilt with the
`tokenizers` library), behind the same small interface:

    tok.encode(text, add_bos=False) -> list[int]     special tokens in text
                                                      (e.g. <|im_start|>) map to their ids
                                                      (`tokenizers` backends; SentencePiece
                                                      never parses control tokens in text)
    tok.decode(ids) -> str
    tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size
    tok.apply_chat_template(messages, add_generation_prompt=True) -> str
    tok.save(out_dir)                                 tokenizer files load_tokenizer reads

`pad_id` is always distinct from `eos_id`, so "is this token eos?" never
confuses padding with end of sequence. Models that declare no pad token, or
pad == eos (SmolLM2's GGUF declares padding_token_id 2 == eos 2), get a
stand-in: a token named <pad>/<|pad|>/<|finetune_right_pad_id|>, else the unk
token, else <|endoftext|>, else the lowest id that is neither eos nor bos
(SmolLM2: 0, "<|endoftext|>"). Padded positions are always masked, so which
id stands in does not change any result.

The loaders (`rlhf_jax.tokenizer.load_tokenizer`) build it; chat styles live in
`rlhf_jax.chat_format`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Sequence

from rlhf_jax.chat_format import CHAT_STYLES, chatml_default_system, detect_chat_style, render_chat

TOKENIZER_CONFIG = "tokenizer_config.json"
_PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>")


class Tokenizer:
  """Text <-> token ids plus special ids and chat formatting.

  Construct with `load_tokenizer` or `train_sentencepiece`. Attributes:
  bos_id (None when the model has none), eos_id, pad_id (never == eos_id),
  unk_id (or None), vocab_size, chat_style, default_system (chatml only),
  chat_template (the model's original Jinja text, kept for reference), add_bos
  (whether the model expects bos in front of a sequence: the add_bos_token
  metadata; True for our SentencePiece models, False for SmolLM2 whose "bos"
  is <|im_start|>): tokenize with `encode(text, add_bos=tok.add_bos)`.
  """

  def __init__(self, backend, *, bos_id, eos_id, pad_id=None, unk_id=None, chat_style=None,
               default_system=None, chat_template=None, add_bos=None, source=""):
    import sentencepiece as spm
    self._sp = backend if isinstance(backend, spm.SentencePieceProcessor) else None
    self._hf = None if self._sp is not None else backend
    self.source = str(source)
    if eos_id is None:
      raise ValueError(f"{self.source}: tokenizer declares no eos token; expected one")
    self.bos_id, self.eos_id, self.unk_id = bos_id, eos_id, unk_id
    self.add_bos = bool(bos_id is not None if add_bos is None else add_bos)
    if self.add_bos and bos_id is None:
      raise ValueError(f"{self.source}: add_bos_token is set but the tokenizer has no bos token")
    self.pad_id = _choose_pad(pad_id, eos_id, bos_id, unk_id, self.token_to_id, self.vocab_size)
    self.chat_template = chat_template
    if chat_style is None:
      chat_style = detect_chat_style(chat_template) or "plain"
    if chat_style not in CHAT_STYLES:
      raise ValueError(f"chat_style={chat_style!r}: expected one of {list(CHAT_STYLES)}")
    self.chat_style = chat_style
    if default_system is None and chat_style == "chatml":
      default_system = chatml_default_system(chat_template)
    self.default_system = default_system

  def __repr__(self):
    kind = "sentencepiece" if self._sp is not None else "tokenizers"
    return (f"Tokenizer({kind}, vocab_size={self.vocab_size}, bos={self.bos_id}, "
            f"eos={self.eos_id}, pad={self.pad_id}, chat_style={self.chat_style!r}, "
            f"source={self.source!r})")

  @property
  def vocab_size(self) -> int:
    if self._sp is not None:
      return self._sp.get_piece_size()
    return self._hf.get_vocab_size(with_added_tokens=True)

  def token_to_id(self, token: str) -> int | None:
    if self._sp is not None:
      i = self._sp.piece_to_id(token)
      return i if self._sp.id_to_piece(i) == token else None
    return self._hf.token_to_id(token)

  def id_to_token(self, i: int) -> str:
    return self._sp.id_to_piece(int(i)) if self._sp is not None else self._hf.id_to_token(int(i))

  def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    """Token ids of `text`; no special tokens are added unless asked for."""
    if self._sp is not None:
      ids = self._sp.encode(text, out_type=int)
    else:
      ids = self._hf.encode(text, add_special_tokens=False).ids
    if add_bos:
      if self.bos_id is None:
        raise ValueError(f"{self.source}: add_bos=True but this tokenizer has no bos token")
      ids = [self.bos_id] + ids
    return ids + [self.eos_id] if add_eos else ids

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
    """Text of `ids`. SentencePiece control tokens (pad/bos/eos) always decode to ''."""
    ids = [int(i) for i in ids]
    if self._sp is not None:
      return self._sp.decode(ids)
    return self._hf.decode(ids, skip_special_tokens=skip_special_tokens)

  def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True,
                          style: str | None = None) -> str:
    """The conversation as one string in `style` (default: this tokenizer's chat_style).

    messages: [{"role": "system"|"user"|"assistant", "content": str}, ...].
    Special tokens appear as text; `encode` maps them to their ids.
    """
    return render_chat(messages, style or self.chat_style, add_generation_prompt,
                       self.default_system)

  def save(self, out_dir) -> Path:
    """Write tokenizer files into `out_dir` (tokenizer.json or tokenizer.model + config)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Atomic writes (temporary file + rename): a run killed while (re)writing its
    # workdir's tokenizer must find the complete old or new file when it resumes.
    if self._sp is not None:
      _replace_with(out_dir / "tokenizer.model",
                    lambda tmp: tmp.write_bytes(self._sp.serialized_model_proto()))
    else:
      _replace_with(out_dir / "tokenizer.json", lambda tmp: self._hf.save(str(tmp)))
    name = lambda i: None if i is None else self.id_to_token(i)
    cfg = {"bos_token": name(self.bos_id), "eos_token": name(self.eos_id),
           "pad_token": name(self.pad_id), "unk_token": name(self.unk_id),
           "chat_template": self.chat_template, "chat_style": self.chat_style,
           "default_system": self.default_system, "add_bos_token": self.add_bos}
    _replace_with(out_dir / TOKENIZER_CONFIG,
                  lambda tmp: tmp.write_text(json.dumps(cfg, indent=2) + "\n"))
    return out_dir


def _replace_with(path: Path, write) -> None:
  """write(tmp_path) then rename tmp_path -> path (atomic on POSIX)."""
  tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
  write(tmp)
  os.replace(tmp, path)


def _choose_pad(pad, eos, bos, unk, token_to_id, vocab_size):
  """A pad id distinct from eos (see the module docstring for the order tried)."""
  if pad is not None and pad != eos:
    return pad
  cands = [token_to_id(n) for n in _PAD_NAMES] + [unk, token_to_id("<|endoftext|>")]
  for c in cands:
    if c is not None and c not in (eos, bos):
      return c
  return next(i for i in range(vocab_size) if i not in (eos, bos))
