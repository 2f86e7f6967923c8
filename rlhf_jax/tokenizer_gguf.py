"""GGUF (llama.cpp) tokenizers rebuilt as a Hugging Face `tokenizers.Tokenizer`.

* tokenizer.ggml.model "gpt2": byte-level BPE (pre-tokenizer split patterns of
  llama.cpp's BPE pre-types);
* tokenizer.ggml.model "llama": a SentencePiece BPE vocabulary with scores (Gemma,
  Llama 2): merges ranked by the merged piece's score (as Hugging Face's
  SentencePiece converter does), spaces as "▁", byte fallback to <0xXX> tokens.
  With Gemma's turn tokens the chat style is "gemma" and eos is <end_of_turn> (what a
  chat reply ends with; Gemma's generation config stops there too).

Reached through `rlhf_jax.tokenizer.load_tokenizer`.
"""

from __future__ import annotations

from pathlib import Path

from rlhf_jax import gguf_file
from rlhf_jax.tokenizer_base import Tokenizer


# Pre-tokenizer split patterns of llama.cpp's BPE pre-types.
_GPT2_PRE = ("gpt2", "default", "olmo", "jina-es", "jina-de", "jina-v2-es", "jina-v2-de")
_STARCODER_PRE = ("smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva")
_LLAMA3_PRE = ("llama-bpe", "llama3", "smaug-bpe", "dbrx")
_LLAMA3_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
              r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
             r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _gguf_pre_tokenizer(pre: str, where: str):
  from tokenizers import Regex, pre_tokenizers as pt
  if pre in _GPT2_PRE:
    return pt.ByteLevel(add_prefix_space=False, use_regex=True), False
  if pre in _STARCODER_PRE:  # each digit alone, then the GPT-2 split
    return pt.Sequence([pt.Digits(individual_digits=True),
                        pt.ByteLevel(add_prefix_space=False, use_regex=True)]), False
  if pre in _LLAMA3_PRE or pre == "qwen2":
    rx = _QWEN2_RE if pre == "qwen2" else _LLAMA3_RE
    return pt.Sequence([pt.Split(Regex(rx), behavior="isolated", invert=False),
                        pt.ByteLevel(add_prefix_space=False, use_regex=False)]), pre != "qwen2"
  raise ValueError(f"{where}: tokenizer.ggml.pre={pre!r} is not supported; expected one of "
                   f"{sorted(_GPT2_PRE + _STARCODER_PRE + _LLAMA3_PRE + ('qwen2',))}")


def _load_gguf(path: Path, chat_style) -> Tokenizer:
  """Rebuild a GGUF's gpt2-style byte-level BPE vocabulary as a `tokenizers.Tokenizer`."""
  import tokenizers
  from tokenizers import AddedToken, decoders, models
  where = str(path)
  reader = gguf_file.reader(path)
  field = lambda key, default=...: gguf_file.field(reader, key, default, where)
  kind = field("tokenizer.ggml.model", None)
  if kind is None:
    raise ValueError(f"{where}: GGUF file carries no tokenizer (no tokenizer.ggml.model)")
  if kind == "llama":
    return _load_gguf_spm(reader, path, field, chat_style)
  if kind != "gpt2":
    raise ValueError(f"{where}: tokenizer.ggml.model={kind!r} is not supported; expected 'gpt2' "
                     f"(byte-level BPE) or 'llama' (SentencePiece BPE)")
  tokens = field("tokenizer.ggml.tokens")
  merges = field("tokenizer.ggml.merges")
  types = field("tokenizer.ggml.token_type", [1] * len(tokens))
  pre_tok, ignore_merges = _gguf_pre_tokenizer(field("tokenizer.ggml.pre", "default"), where)
  vocab = {t: i for i, t in enumerate(tokens)}
  pairs = []
  for m in merges:
    a, sep, b = m.partition(" ")
    if not sep:
      raise ValueError(f"{where}: tokenizer.ggml.merges entry {m!r}: expected 'left right'")
    pairs.append((a, b))
  tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False,
                                        ignore_merges=ignore_merges))
  tok.pre_tokenizer = pre_tok
  tok.decoder = decoders.ByteLevel()
  # llama.cpp token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                          for t, ty in zip(tokens, types) if ty == 3])
  tok.add_tokens([AddedToken(t, special=False, normalized=False)
                  for t, ty in zip(tokens, types) if ty == 4])
  opt = lambda key: None if (v := field(key, None)) is None else int(v)
  return Tokenizer(tok, bos_id=opt("tokenizer.ggml.bos_token_id"),
                   eos_id=opt("tokenizer.ggml.eos_token_id"),
                   pad_id=opt("tokenizer.ggml.padding_token_id"),
                   unk_id=opt("tokenizer.ggml.unknown_token_id"), chat_style=chat_style,
                   chat_template=field("tokenizer.chat_template", None),
                   add_bos=bool(field("tokenizer.ggml.add_bos_token", False)), source=path)


def _load_gguf_spm(reader, path: Path, field, chat_style) -> Tokenizer:
  """SentencePiece-BPE vocabulary (tokens, scores, types) as a `tokenizers` BPE model."""
  import tokenizers
  from tokenizers import AddedToken, decoders, models, normalizers
  tokens = field("tokenizer.ggml.tokens")
  scores = field("tokenizer.ggml.scores")
  types = field("tokenizer.ggml.token_type", [1] * len(tokens))
  vocab = {t: i for i, t in enumerate(tokens)}
  merges = []  # (left, right, score of left+right): every split of a normal piece
  for piece, score, ty in zip(tokens, scores, types):
    if ty != 1:
      continue
    local = [(piece[:k], piece[k:]) for k in range(1, len(piece))
             if piece[:k] in vocab and piece[k:] in vocab]
    local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
    merges += [(a, b, score) for a, b in local]
  merges.sort(key=lambda m: -m[2])  # stable: ties keep the order above
  unk = None if (u := field("tokenizer.ggml.unknown_token_id", None)) is None else int(u)
  tok = tokenizers.Tokenizer(models.BPE(
      vocab=vocab, merges=[(a, b) for a, b, _ in merges], fuse_unk=True, byte_fallback=True,
      unk_token=None if unk is None else tokens[unk]))
  prefix = bool(field("tokenizer.ggml.add_space_prefix", True))
  tok.normalizer = normalizers.Sequence(
      ([normalizers.Prepend("▁")] if prefix else []) + [normalizers.Replace(" ", "▁")])
  tok.decoder = decoders.Sequence(
      [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
      + ([decoders.Strip(" ", 1, 0)] if prefix else []))
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                          for t, ty in zip(tokens, types) if ty == 3])
  tok.add_tokens([AddedToken(t, special=False, normalized=False)
                  for t, ty in zip(tokens, types) if ty == 4])
  opt = lambda key: None if (v := field(key, None)) is None else int(v)
  eos = opt("tokenizer.ggml.eos_token_id")
  template = field("tokenizer.chat_template", None)
  gemma = "<start_of_turn>" in vocab and "<end_of_turn>" in vocab
  if gemma and (chat_style or "gemma") == "gemma":
    chat_style, eos = "gemma", vocab["<end_of_turn>"]
  return Tokenizer(tok, bos_id=opt("tokenizer.ggml.bos_token_id"), eos_id=eos,
                   pad_id=opt("tokenizer.ggml.padding_token_id"), unk_id=unk,
                   chat_style=chat_style, chat_template=template,
                   add_bos=bool(field("tokenizer.ggml.add_bos_token", True)), source=path)
