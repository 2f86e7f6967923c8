"""Tokenizers: train SentencePiece; load SentencePiece / Hugging Face / GGUF tokenizers.

`load_tokenizer(path)` reads a SentencePiece .model file, a Hugging Face directory
(`tokenizer_files`) or a .gguf file (`tokenizer_gguf`) into one `Tokenizer` class
(`tokenizer_base`: encode / decode, special ids, chat formatting, save);
`train_sentencepiece` trains our own small SentencePiece models. Chat styles:
`rlhf_jax.chat_format`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

# re-exported for rlhf_jax.trainers / config (trainers/setup.py: tok_lib.render_chat)
from rlhf_jax.chat_format import render_chat  # noqa: F401 (re-exported)
from rlhf_jax.tokenizer_base import Tokenizer
from rlhf_jax.tokenizer_files import _load_dir, _load_sp
from rlhf_jax.tokenizer_gguf import _load_gguf

# Our SentencePiece models: special ids fixed and distinct.
SP_PAD_ID, SP_UNK_ID, SP_BOS_ID, SP_EOS_ID = 0, 1, 2, 3


# ----------------------------------------------------------------------------
# SentencePiece training
# ----------------------------------------------------------------------------

def train_sentencepiece(text_files: str | Path | Sequence[str | Path], model_prefix: str | Path,
                        vocab_size: int, model_type: str = "bpe", *,
                        character_coverage: float = 1.0, byte_fallback: bool = False,
                        user_defined_symbols: Sequence[str] = (),
                        input_sentence_size: int = 0, num_threads: int = 1,
                        chat_style: str = "plain") -> Tokenizer:
  """Train a SentencePiece model on text files; writes {model_prefix}.model/.vocab.

  Ids: pad 0 <pad>, unk 1 <unk>, bos 2 <s>, eos 3 </s>. Text is taken as is
  (identity normalisation, no dummy prefix, whitespace kept), so decode(encode(t))
  == t for text whose characters were seen in training, and "\\n" is a piece
  of its own (SentencePiece reads one sentence per line and would never see it).
  Characters not seen decode as " ⁇ " unless `byte_fallback` (needs
  vocab_size > 260). Single-threaded by default so the model is the same bit
  for bit on every run. model_type: 'bpe', 'unigram', 'char' or 'word'.
  """
  import sentencepiece as spm
  files = [text_files] if isinstance(text_files, (str, Path)) else list(text_files)
  if not files:
    raise ValueError("train_sentencepiece: no text files given")
  for f in files:
    if not Path(f).is_file():
      raise FileNotFoundError(f"{f}: training text file does not exist")
  if model_type not in ("bpe", "unigram", "char", "word"):
    raise ValueError(f"model_type={model_type!r}: expected 'bpe', 'unigram', 'char' or 'word'")
  model_prefix = Path(model_prefix)
  model_prefix.parent.mkdir(parents=True, exist_ok=True)
  symbols = ["\n"] + [s for s in user_defined_symbols if s != "\n"]
  try:
    spm.SentencePieceTrainer.train(
        input=[str(f) for f in files], model_prefix=str(model_prefix), vocab_size=vocab_size,
        model_type=model_type, character_coverage=character_coverage,
        byte_fallback=byte_fallback, user_defined_symbols=symbols,
        pad_id=SP_PAD_ID, unk_id=SP_UNK_ID, bos_id=SP_BOS_ID, eos_id=SP_EOS_ID,
        pad_piece="<pad>", unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=False, allow_whitespace_only_pieces=True, split_digits=True,
        input_sentence_size=input_sentence_size, shuffle_input_sentence=False,
        hard_vocab_limit=model_type != "char", num_threads=num_threads, minloglevel=2)
  except RuntimeError as e:
    raise ValueError(f"train_sentencepiece({files}, vocab_size={vocab_size}, "
                     f"model_type={model_type!r}): {e}") from None
  return load_tokenizer(f"{model_prefix}.model", chat_style=chat_style)


# ----------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------

def load_tokenizer(path, chat_style: str | None = None) -> Tokenizer:
  """Tokenizer from a SentencePiece .model file, a directory or a .gguf file.

  A directory holds tokenizer.json (Hugging Face `tokenizers`) or
  tokenizer.model (SentencePiece), with special tokens and chat template from
  tokenizer_config.json / config.json / generation_config.json when present
  (directories written by `Tokenizer.save` and `import_checkpoint` qualify).
  A GGUF file must carry a gpt2-style BPE vocabulary (tokenizer.ggml.model
  'gpt2'). `chat_style` forces a chat style over the detected one.
  """
  path = Path(path)
  if not path.exists():
    raise FileNotFoundError(f"{path}: no such tokenizer file or directory; expected a "
                            f"SentencePiece .model file, a directory with tokenizer.json or "
                            f"tokenizer.model, or a .gguf file")
  if path.is_dir():
    return _load_dir(path, chat_style)
  with open(path, "rb") as f:
    magic = f.read(4)
  if magic == b"GGUF":
    return _load_gguf(path, chat_style)
  if path.suffix == ".json":
    return _load_dir(path.parent, chat_style, tokenizer_json=path)
  return _load_sp(path, chat_style, {})
