"""rlhf_jax.gguf_file (our GGUF metadata parser) against the `gguf` package's GGUFReader:
every field's value and every tensor's type, shape, offset and bytes, on synthetic files
(every metadata value type, plain and quantised tensors, a non-default alignment) and on
the real SmolLM2 / Gemma 3 files; malformed files give one error naming the file."""
import os

import gguf
import numpy as np
import pytest

from rlhf_jax import gguf_file

# GGUFReader's pseudo-fields for the header, not metadata keys of the file
HEADER = {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"}


def assert_same_as_gguf_package(path, ref=None):
  """`ref`: the package's GGUFReader of `path` when the caller has one (it is slow)."""
  ours, ref = gguf_file.read(str(path)), ref or gguf.GGUFReader(str(path))
  ref_fields = {k: f.contents() for k, f in ref.fields.items() if k not in HEADER}
  assert list(ours.fields) == list(ref_fields)  # same keys, same order
  for key, value in ref_fields.items():
    got = ours.fields[key]
    assert type(got) is type(value) and got == value, key
    if isinstance(value, list) and value:
      assert type(got[0]) is type(value[0]), key
  assert ours.data_offset == ref.data_offset and ours.alignment == ref.alignment
  assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
  for a, b in zip(ours.tensors, ref.tensors):
    assert a.tensor_type == b.tensor_type, a.name
    assert list(a.shape) == b.shape.tolist(), a.name
    assert (a.n_elements, a.n_bytes, a.data_offset) == (b.n_elements, b.n_bytes,
                                                         b.data_offset), a.name
    assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape, a.name
    assert a.data.tobytes() == np.asarray(b.data).tobytes(), a.name
  return ours


def write_every_kind(path, alignment=None):
  rng = np.random.default_rng(0)
  w = gguf.GGUFWriter(str(path), "llama")
  if alignment:
    w.add_custom_alignment(alignment)
  w.add_uint8("t.u8", 200)
  w.add_int8("t.i8", -100)
  w.add_uint16("t.u16", 60000)
  w.add_int16("t.i16", -30000)
  w.add_uint32("t.u32", 4_000_000_000)
  w.add_int32("t.i32", -2_000_000_000)
  w.add_float32("t.f32", 0.1)
  w.add_uint64("t.u64", 2**63 + 5)
  w.add_int64("t.i64", -(2**62))
  w.add_float64("t.f64", 1 / 3)
  w.add_bool("t.bool", True)
  w.add_string("t.str", "héllo ▁ 日本")
  w.add_string("t.empty", "")
  w.add_array("t.strings", ["a", "", "▁b", "<start_of_turn>", "\u00e9" * 40])
  w.add_array("t.ints", [1, -2, 3])
  w.add_array("t.floats", [0.5, -1.25, 1e-3])
  w.add_array("t.bools", [True, False, True])
  w.add_tensor("f32", rng.normal(size=(3, 5)).astype(np.float32))
  w.add_tensor("f16", rng.normal(size=(4, 7)).astype(np.float16))
  w.add_tensor("vec", rng.normal(size=(9,)).astype(np.float32))
  for qtype in (gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0):
    x = rng.normal(size=(2, 64)).astype(np.float32)
    w.add_tensor(qtype.name.lower(), gguf.quants.quantize(x, qtype), raw_dtype=qtype)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


@pytest.mark.parametrize("alignment", [None, 64])
def test_every_value_type_and_tensor_kind_reads_as_the_gguf_package_does(tmp_path, alignment):
  path = tmp_path / "every.gguf"
  write_every_kind(path, alignment)
  r = assert_same_as_gguf_package(path)
  assert r.fields["t.str"] == "héllo ▁ 日本" and r.fields["t.u64"] == 2**63 + 5
  assert r.fields["t.strings"][3] == "<start_of_turn>"
  assert r.alignment == (alignment or 32) and r.data_offset % r.alignment == 0
  t = {t.name: t for t in r.tensors}
  assert t["f32"].shape == (5, 3) and t["f32"].data.shape == (3, 5)  # GGUF order, numpy order
  q = gguf.quants.dequantize(t["q8_0"].data, t["q8_0"].tensor_type)
  assert q.shape == (2, 64) and np.isfinite(q).all()
  assert not t["f32"].data.flags.writeable  # a read-only view of the file


def test_reader_is_reused_while_the_file_is_unchanged(tmp_path):
  path = tmp_path / "m.gguf"
  write_every_kind(path)
  a = gguf_file.reader(path)
  assert gguf_file.reader(str(path)) is a
  write_every_kind(path, alignment=64)  # rewritten: another size / mtime
  assert gguf_file.reader(path) is not a and gguf_file.reader(path).alignment == 64


@pytest.mark.parametrize("mutate, message", [
    (lambda b: b"GGML" + b[4:], "not a GGUF file"),
    (lambda b: b[:4] + (3 << 24).to_bytes(4, "little") + b[8:], "big-endian"),
    (lambda b: b[:4] + (7).to_bytes(4, "little") + b[8:], "GGUF version 7"),
    (lambda b: b[:40], "cannot read GGUF file"),  # inside the metadata
    (lambda b: b[:-40], "runs past the end of the file"),  # the last tensor's data
    (lambda b: b"", "empty file"),
])
def test_malformed_files_name_the_file_and_the_fault(tmp_path, mutate, message):
  good = tmp_path / "good.gguf"
  write_every_kind(good)
  bad = tmp_path / "bad.gguf"
  bad.write_bytes(mutate(good.read_bytes()))
  with pytest.raises(ValueError, match=message) as e:
    gguf_file.reader(bad)
  assert str(e.value).startswith(f"{bad.absolute()}: cannot read GGUF file")


@pytest.mark.slow
def test_real_smollm2_file_reads_as_the_gguf_package_does():
  """(Gemma 3's file: tests/test_gemma3.py, beside its float64 forward's GGUFReader.)"""
  from test_smollm2 import smollm2_path
  path = smollm2_path()
  r = assert_same_as_gguf_package(path)
  assert len(r.fields["tokenizer.ggml.tokens"]) == 49152
  assert os.path.getsize(path) >= r.tensors[-1].data_offset + r.tensors[-1].n_bytes
