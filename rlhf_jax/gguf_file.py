"""GGUF files (llama.cpp's single-file format): the one reader that the weight loader
(`models.pretrained`, `models.gguf_weights`) and the tokenizer loader (`tokenizer`) share.

Parsing the metadata of a real model (e.g. 49k vocabulary strings) takes seconds, so a
reader is kept while its file is unchanged (same inode, size and mtime).
"""
from __future__ import annotations

import functools
from pathlib import Path


def is_gguf(path) -> bool:
  with open(path, "rb") as f:
    return f.read(4) == b"GGUF"


def reader(path):
  """A GGUFReader (memory-mapped), reused while the file is unchanged."""
  st = Path(path).stat()
  return _cached_reader(str(Path(path).absolute()), st.st_ino, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _cached_reader(path: str, inode: int, size: int, mtime_ns: int):
  import gguf
  try:
    return gguf.GGUFReader(path)
  except Exception as e:  # gguf raises ValueError / struct errors on corrupt files
    raise ValueError(f"{path}: cannot read GGUF file: {e}") from None


def has_tokenizer(path) -> bool:
  return is_gguf(path) and "tokenizer.ggml.tokens" in reader(path).fields


def field(reader, key, default=..., where=""):
  """Value of a GGUF metadata field (python scalar, str or list); `default` if absent."""
  f = reader.fields.get(key)
  if f is None:
    if default is ...:
      raise ValueError(f"{where}: missing GGUF metadata key {key!r}")
    return default
  return f.contents()
