"""GGUF files (llama.cpp's single-file format): the one reader that the weight loader
(`models.pretrained`, `models.gguf_weights`) and the tokenizer loader (`tokenizer`) share.

`gguf.GGUFReader` (the `gguf` package) builds a numpy view per item of every metadata
field: a real vocabulary (Gemma 3: 262k token strings, scores and types) takes it 18 s
on a 2-core CPU, SmolLM2's 49k about 3 s. This module reads the metadata itself, per
the GGUF specification (llama.cpp `docs/gguf.md`, versions 2 and 3, little-endian):

  header   "GGUF", uint32 version, uint64 tensor count, uint64 key/value count
  kv       string key, uint32 value type, value (an array: uint32 element type, uint64
           count, the elements); a string is uint64 length + UTF-8 bytes
  tensors  string name, uint32 n_dims, uint64 dims[n_dims] (innermost first), uint32
           ggml type, uint64 offset from the data section
  data     at the end of the tensor infos rounded up to `general.alignment` (32)

in well under a second (Gemma 3: 0.4 s), and keeps the `gguf` package for what it does
well: the ggml type table (block and byte sizes) and dequantisation
(`gguf.quants.dequantize`). Tensor data are views into one read-only memory map, laid
out as `GGUFReader.tensors[i].data` (tests/test_gguf_file.py checks both readers agree,
on synthetic files of every value type and on the real SmolLM2 / Gemma 3 files).

A reader is kept while its file is unchanged (same inode, size and mtime).
"""
from __future__ import annotations

import functools
import mmap
import struct
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

# GGUF metadata value types: id -> (struct format, numpy dtype); 8 string, 9 array.
_SCALARS = {0: ("<B", np.uint8), 1: ("<b", np.int8), 2: ("<H", np.uint16), 3: ("<h", np.int16),
            4: ("<I", np.uint32), 5: ("<i", np.int32), 6: ("<f", np.float32),
            7: ("<?", np.bool_), 10: ("<Q", np.uint64), 11: ("<q", np.int64),
            12: ("<d", np.float64)}
_STRING, _ARRAY = 8, 9
# ggml types stored as plain numpy arrays (the rest are quantised blocks, read as bytes).
_PLAIN = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "I8": np.int8,
          "I16": np.int16, "I32": np.int32, "I64": np.int64}


class Tensor(NamedTuple):
  """One tensor: `shape` as stored (innermost dimension first, GGUF's order); `data` a
  read-only view, numpy-ordered (reversed shape), of bytes for quantised types."""
  name: str
  tensor_type: Any  # gguf.GGMLQuantizationType
  shape: tuple
  n_elements: int
  n_bytes: int
  data_offset: int
  data: np.ndarray


class Reader(NamedTuple):
  """A parsed GGUF file: `fields` key -> Python value (int, float, bool, str or list),
  `tensors` in file order, `version`, `alignment`, `data_offset`."""
  path: str
  version: int
  fields: dict
  tensors: list
  alignment: int
  data_offset: int


def is_gguf(path) -> bool:
  with open(path, "rb") as f:
    return f.read(4) == b"GGUF"


def reader(path) -> Reader:
  """The file's metadata and tensor views (memory-mapped), reused while it is unchanged."""
  st = Path(path).stat()
  return _cached_reader(str(Path(path).absolute()), st.st_ino, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _cached_reader(path: str, inode: int, size: int, mtime_ns: int) -> Reader:
  try:
    return read(path)
  except (ValueError, struct.error, IndexError, UnicodeDecodeError, OverflowError) as e:
    raise ValueError(f"{path}: cannot read GGUF file: {e}") from None


def read(path: str) -> Reader:
  """Parse `path` (not cached; `reader` is)."""
  from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
  from gguf.quants import quant_shape_to_byte_shape
  with open(path, "rb") as f:
    if Path(path).stat().st_size == 0:
      raise ValueError("empty file")
    buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
  if buf[:4] != b"GGUF":
    raise ValueError(f"not a GGUF file (magic {bytes(buf[:4])!r}, expected b'GGUF')")
  version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
  if version & 0xFFFF == 0:
    raise ValueError("a big-endian GGUF file; only little-endian files are supported")
  if version not in (2, 3):
    raise ValueError(f"GGUF version {version}; versions 2 and 3 are supported")
  off = 24

  def string(off):
    (n,) = struct.unpack_from("<Q", buf, off)
    end = off + 8 + n
    if end > len(buf):
      raise ValueError(f"a string of {n} bytes at offset {off} runs past the end of the file")
    return buf[off + 8:end].decode("utf-8"), end

  def value(kind, off):
    if kind == _STRING:
      return string(off)
    if kind in _SCALARS:
      fmt, _ = _SCALARS[kind]
      return struct.unpack_from(fmt, buf, off)[0], off + struct.calcsize(fmt)
    if kind != _ARRAY:
      raise ValueError(f"unknown GGUF value type {kind} at offset {off}")
    sub, count = struct.unpack_from("<IQ", buf, off)
    off += 12
    if sub in _SCALARS:  # one numpy read for the whole array
      dtype = np.dtype(_SCALARS[sub][1])
      if off + count * dtype.itemsize > len(buf):
        raise ValueError(f"an array of {count} values at offset {off} runs past the end")
      return np.frombuffer(buf, dtype.newbyteorder("<"), count, off).tolist(), \
          off + count * dtype.itemsize
    items = []
    for _ in range(count):
      v, off = value(sub, off)
      items.append(v)
    return items, off

  fields = {}
  for _ in range(n_kv):
    key, off = string(off)
    (kind,) = struct.unpack_from("<I", buf, off)
    fields[key], off = value(kind, off + 4)

  infos = []
  for _ in range(n_tensors):
    name, off = string(off)
    (n_dims,) = struct.unpack_from("<I", buf, off)
    dims = struct.unpack_from(f"<{n_dims}Q", buf, off + 4)
    off += 4 + 8 * n_dims
    raw_type, t_off = struct.unpack_from("<IQ", buf, off)
    off += 12
    infos.append((name, tuple(int(d) for d in dims), raw_type, t_off))

  alignment = fields.get("general.alignment", 32)
  if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
    raise ValueError(f"general.alignment={alignment!r}: expected a power of two")
  data_offset = off + (-off) % alignment
  array = np.frombuffer(buf, np.uint8)
  tensors, seen = [], set()
  for name, dims, raw_type, t_off in infos:
    if name in seen:
      raise ValueError(f"tensor {name!r} appears twice")
    seen.add(name)
    try:
      qtype = GGMLQuantizationType(raw_type)
    except ValueError:
      raise ValueError(f"tensor {name!r}: unknown ggml type {raw_type}") from None
    n_elements = int(np.prod(dims, dtype=np.int64)) if dims else 1
    block, type_size = GGML_QUANT_SIZES[qtype]
    n_bytes = n_elements * type_size // block
    start = data_offset + t_off
    if start + n_bytes > len(buf):
      raise ValueError(f"tensor {name!r} ({n_bytes} bytes at offset {start}) runs past the "
                       f"end of the file ({len(buf)} bytes): truncated?")
    shape = tuple(reversed(dims))
    raw = array[start:start + n_bytes]
    if qtype.name in _PLAIN:
      data = raw.view(np.dtype(_PLAIN[qtype.name]).newbyteorder("<")).reshape(shape)
    else:
      data = raw.reshape(quant_shape_to_byte_shape(shape, qtype))
    tensors.append(Tensor(name, qtype, dims, n_elements, n_bytes, start, data))
  return Reader(path, version, fields, tensors, alignment, data_offset)


def has_tokenizer(path) -> bool:
  return is_gguf(path) and "tokenizer.ggml.tokens" in reader(path).fields


def field(reader, key, default=..., where=""):
  """Value of a GGUF metadata field (python scalar, str or list); `default` if absent."""
  if key not in reader.fields:
    if default is ...:
      raise ValueError(f"{where}: missing GGUF metadata key {key!r}")
    return default
  return reader.fields[key]
