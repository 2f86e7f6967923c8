"""GGUF (llama.cpp) tokenizers: the gpt2-style byte-level BPE vocabulary of a .gguf file
rebuilt as a Hugging Face `tokenizers.Tokenizer` (pre-tokenizer split patterns of
llama.cpp's BPE pre-types). Reached through `rlhf_jax.tokenizer.load_tokenizer`.
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
  if kind != "gpt2":
    raise ValueError(f"{where}: tokenizer.ggml.model={kind!r} is not supported; expected 'gpt2' "
                     f"(byte-level BPE)")
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
