"""SFT data pipeline: masking, padding, packing, determinism, and bad-input messages."""
import json

import numpy as np
import pytest
from conftest import CharTokenizer

from rlhf_jax.data import sft as sft_data
from rlhf_jax.data import synthetic



def write(tmp_path, rows, name="d.jsonl"):
  p = tmp_path / name
  p.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
  return str(p)


def test_loss_mask_covers_completion_and_eos_only(tmp_path):
  tok = CharTokenizer()
  path = write(tmp_path, [{"prompt": "ab", "completion": "xyz"}])
  [(tokens, mask)] = sft_data.tokenize_sft_file(path, tok, 64)
  prompt = [tok.bos_id] + tok.encode("user: ab\nassistant: ")
  assert tokens.tolist() == prompt + tok.encode("xyz") + [tok.eos_id]
  assert mask.tolist() == [0] * len(prompt) + [1, 1, 1, 1]


def test_messages_format(tmp_path):
  tok = CharTokenizer()
  path = write(tmp_path, [{"messages": [{"role": "system", "content": "s"},
                                        {"role": "user", "content": "u"},
                                        {"role": "assistant", "content": "a"}]}])
  [(tokens, mask)] = sft_data.tokenize_sft_file(path, tok, 64)
  assert tok.decode(tokens[mask == 1][:-1].tolist()) == "a"


@pytest.mark.parametrize("rows,fragment", [
    (['{"prompt": "a", "completion": "b"}', '{"prompt": "a", "compl'], "d.jsonl:2: not valid JSON"),
    ([{"prompt": "a"}], "d.jsonl:1: missing key 'completion'"),
    ([{"prompt": "a", "completion": 3}], "d.jsonl:1: 'completion' must be a string"),
    (["[1, 2]"], "d.jsonl:1: expected a JSON object"),
    ([{"messages": [{"role": "user", "content": "u"}, {"role": "user", "content": "v"}]}],
     "d.jsonl:1: the last message must have role 'assistant'"),
])
def test_malformed_rows_name_file_and_line(tmp_path, rows, fragment):
  path = write(tmp_path, rows)
  with pytest.raises(sft_data.DataError, match=None) as e:
    sft_data.tokenize_sft_file(path, CharTokenizer(), 64)
  assert fragment in str(e.value), str(e.value)


def test_missing_file(tmp_path):
  with pytest.raises(sft_data.DataError, match="data file not found: .*nope.jsonl"):
    sft_data.tokenize_sft_file(str(tmp_path / "nope.jsonl"), CharTokenizer(), 64)


def test_overlength_error_truncate_drop(tmp_path):
  tok = CharTokenizer()
  path = write(tmp_path, [{"prompt": "a", "completion": "b"},
                          {"prompt": "a", "completion": "b" * 100}])
  with pytest.raises(sft_data.DataError) as e:
    sft_data.tokenize_sft_file(path, tok, 32)
  assert "d.jsonl:2" in str(e.value) and "max_seq_len=32" in str(e.value)
  assert len(sft_data.tokenize_sft_file(path, tok, 32, "drop")) == 1
  ex = sft_data.tokenize_sft_file(path, tok, 32, "truncate")
  assert len(ex) == 2 and len(ex[1][0]) == 32


def test_packing_preserves_every_example_and_segments(tmp_path):
  tok = CharTokenizer()
  rows = [{"prompt": "p" * int(n), "completion": "c" * int(m)}
          for n, m in np.random.default_rng(0).integers(1, 8, size=(40, 2))]
  ex = sft_data.tokenize_sft_file(write(tmp_path, rows), tok, 48)
  packed = sft_data.pack_examples(ex, 48, tok.pad_id, seed=0)
  assert packed["tokens"].shape[0] < len(ex)  # actually packs
  found = []
  for r in range(packed["tokens"].shape[0]):
    seg = packed["segment_ids"][r]
    for s in range(1, seg.max() + 1):
      sel = seg == s
      assert np.all(np.diff(np.nonzero(sel)[0]) == 1)  # contiguous
      found.append((tuple(packed["tokens"][r][sel]), tuple(packed["loss_mask"][r][sel])))
    assert np.all(packed["tokens"][r][seg == 0] == tok.pad_id)
  assert sorted(found) == sorted((tuple(t), tuple(m)) for t, m in ex)


def test_batches_deterministic_by_step_and_reshuffled_per_epoch(tmp_path):
  arrays = {"x": np.arange(10)[:, None].repeat(3, 1)}
  a = sft_data.batched(arrays, 4, seed=1)
  b = sft_data.batched(arrays, 4, seed=1)
  firsts = [a[i]["x"][:, 0].tolist() for i in range(5)]
  assert firsts == [b[i]["x"][:, 0].tolist() for i in range(5)]
  epoch1 = sum(firsts[:2], []) + firsts[2][:2]
  assert sorted(epoch1) == list(range(10))  # first 10 rows = one permutation
  assert firsts != [sft_data.batched(arrays, 4, seed=2)[i]["x"][:, 0].tolist() for i in range(5)]


def test_synthetic_tasks_are_correct_and_seeded():
  rng = np.random.default_rng(0)
  for _ in range(20):
    e = synthetic.make_example("reverse", rng)
    assert e["completion"] == e["prompt"].split(": ")[1][::-1]
    e = synthetic.make_example("sort", rng)
    assert e["completion"] == "".join(sorted(e["prompt"].split(": ")[1]))
    e = synthetic.make_example("add", rng)
    a, b = e["prompt"].split(": ")[1].split("+")
    assert int(e["completion"]) == int(a) + int(b)
  with pytest.raises(ValueError, match="unknown synthetic task"):
    synthetic.make_example("nope", rng)
