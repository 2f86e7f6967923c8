"""Tokenizer files on disk: a SentencePiece .model, or a Hugging Face directory.

A directory holds tokenizer.json (Hugging Face `tokenizers`) or tokenizer.model
(SentencePiece); special tokens and the chat template come from tokenizer_config.json /
config.json / generation_config.json when present. Reached through
`rlhf_jax.tokenizer.load_tokenizer`.
"""

from __future__ import annotations

import json
from pathlib import Path

from rlhf_jax.chat_format import detect_chat_style
from rlhf_jax.tokenizer_base import TOKENIZER_CONFIG, Tokenizer


def _load_sp(path: Path, chat_style, cfg: dict) -> Tokenizer:
  import sentencepiece as spm
  sp = spm.SentencePieceProcessor()
  try:
    sp.load(str(path))
  except (OSError, RuntimeError) as e:
    raise ValueError(f"{path}: not a SentencePiece model file: {e}") from None
  opt = lambda i: None if i < 0 else i
  ids = {"bos": opt(sp.bos_id()), "eos": opt(sp.eos_id()), "pad": opt(sp.pad_id()),
         "unk": opt(sp.unk_id())}
  for k in ids:  # tokenizer_config.json names win over the proto's ids
    name = _token_name(cfg.get(f"{k}_token"))
    if name is not None and sp.id_to_piece(sp.piece_to_id(name)) == name:
      ids[k] = sp.piece_to_id(name)
  return Tokenizer(sp, bos_id=ids["bos"], eos_id=ids["eos"], pad_id=ids["pad"],
                   unk_id=ids["unk"], chat_style=chat_style or cfg.get("chat_style"),
                   default_system=cfg.get("default_system"), add_bos=cfg.get("add_bos_token"),
                   chat_template=_template_text(cfg.get("chat_template")), source=path)


def _read_json(path: Path) -> dict:
  if not path.is_file():
    return {}
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON: {e}") from None


def _token_name(tok) -> str | None:
  """Special-token entry of tokenizer_config.json: a string or {"content": ...}."""
  if isinstance(tok, dict):
    return tok.get("content")
  return tok if isinstance(tok, str) else None


def _template_text(t) -> str | None:
  """chat_template may be a string or a list of {"name", "template"}."""
  if isinstance(t, list):
    named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
    return named.get("default") or next(iter(named.values()), None)
  return t if isinstance(t, str) else None


def _first_id(x) -> int | None:
  if isinstance(x, list):
    return int(x[0]) if x else None
  return None if x is None else int(x)


def _load_dir(path: Path, chat_style, tokenizer_json: Path | None = None) -> Tokenizer:
  cfg = _read_json(path / TOKENIZER_CONFIG)
  model_cfg = _read_json(path / "config.json")
  gen_cfg = _read_json(path / "generation_config.json")
  tj = tokenizer_json or path / "tokenizer.json"
  if not tj.is_file():
    if (path / "tokenizer.model").is_file():
      return _load_sp(path / "tokenizer.model", chat_style, cfg)
    raise FileNotFoundError(f"{path}: no tokenizer.json or tokenizer.model in this directory")
  import tokenizers
  try:
    tok = tokenizers.Tokenizer.from_file(str(tj))
  except Exception as e:  # tokenizers raises its own Exception type
    raise ValueError(f"{tj}: cannot read tokenizer.json: {e}") from None
  ids = {}
  for k in ("bos", "eos", "pad", "unk"):
    name = _token_name(cfg.get(f"{k}_token"))
    i = tok.token_to_id(name) if name is not None else None
    if name is not None and i is None:
      raise ValueError(f"{path / TOKENIZER_CONFIG}: {k}_token {name!r} is not in {tj.name}")
    if i is None:
      i = _first_id(model_cfg.get(f"{k}_token_id", gen_cfg.get(f"{k}_token_id")))
    ids[k] = i
  template = _template_text(cfg.get("chat_template"))
  if ((chat_style or cfg.get("chat_style") or detect_chat_style(template)) == "gemma"
      and tok.token_to_id("<end_of_turn>") is not None):
    ids["eos"] = tok.token_to_id("<end_of_turn>")  # a Gemma chat reply ends there
  add_bos = cfg.get("add_bos_token", False)  # Llama-3 templates write <|begin_of_text|>
  return Tokenizer(tok, bos_id=ids["bos"], eos_id=ids["eos"], pad_id=ids["pad"],
                   unk_id=ids["unk"], chat_style=chat_style or cfg.get("chat_style"),
                   default_system=cfg.get("default_system"),
                   add_bos=add_bos and ids["bos"] is not None,
                   chat_template=template, source=path)
