"""Preference data: HH-RLHF splitting (real file), TFDS array_record builders without
TensorFlow, jsonl_preferences validation, tokenization/truncation, batching, synthetic pairs."""
import gzip
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from rlhf_jax.data import hh_rlhf
from rlhf_jax.data import preferences as prefs
from rlhf_jax.data.sft import DataError

from conftest import CharTokenizer, NoBosTokenizer, shared_data_file




class TurnMarkerBosTokenizer(CharTokenizer):
  """Like SmolLM2: the declared 'bos' starts every turn of the template (chatml's <|im_start|>)."""
  add_bos = False

  def encode(self, text):
    return [self.bos_id if ch == "|" else 3 + ord(ch) for ch in text]

  def apply_chat_template(self, messages, add_generation_prompt=True):
    out = "".join(f"|{m['role']}: {m['content']}\n" for m in messages)
    return out + ("|assistant: " if add_generation_prompt else "")


def write_jsonl(path, rows):
  path = Path(path)
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
  return str(path)


# ----------------------------------------------------------------------------
# HH-RLHF, real data
# ----------------------------------------------------------------------------

HH_NAME = "hh_rlhf_harmless_base_test.jsonl.gz"


@pytest.fixture(scope="module")
def hh_file():
  return shared_data_file(HH_NAME)


@pytest.fixture(scope="module")
def hh_rows(hh_file):
  with gzip.open(hh_file, "rt", encoding="utf-8") as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def hh_built(hh_rows, tmp_path_factory, hh_file):
  data_dir = tmp_path_factory.mktemp("tfds")
  builder = prefs.build_hh_rlhf(str(data_dir), files={"test": str(hh_file)})
  return builder, data_dir


def test_hh_build_without_tensorflow(hh_built):
  builder, data_dir = hh_built
  assert "tensorflow" not in sys.modules  # TFDS wrote and reads array_record without TF
  version_dir = data_dir / "hh_rlhf" / "harmless_base" / "1.0.0"
  assert sorted(p.name for p in version_dir.glob("*.array_record-*")) == [
      "hh_rlhf-test.array_record-00000-of-00001"]
  assert len(prefs.load_preferences(builder, "test")) == 2312
  # Reading back needs only the directory (tfds.builder_from_directory).
  assert len(prefs.load_preferences(str(version_dir), "test")) == 2312


def test_hh_every_row_reconstructs_exactly(hh_built, hh_rows, hh_file):
  builder, _ = hh_built
  src = prefs.load_preferences(builder, "test")
  assert len(src) == len(hh_rows) == 2312
  for i, (ex, row) in enumerate(zip(src[:], hh_rows)):
    assert ex["source"] == f"{hh_file}:{i + 1}"
    assert hh_rlhf.reconstruct_dialogue(ex["prompt"], ex["chosen"]) == row["chosen"], i
    assert hh_rlhf.reconstruct_dialogue(ex["prompt"], ex["rejected"]) == row["rejected"], i
    assert ex["margin"] == 0.0


def test_hh_stats_count_the_quirks(hh_built, hh_file):
  stats = prefs.preference_stats(hh_built[0])["test"]
  assert stats["examples"] == 2312 and stats["malformed_skipped"] == 0
  assert stats["inexact"] == 0 and stats["identical"] == 0
  assert stats["split_at_common_prefix"] == 5 and stats["reply_has_turns"] == 5
  assert stats["empty_chosen"] == 4 and stats["empty_rejected"] == 0
  assert stats["consecutive_same_role"] == 4
  assert stats["sources"][0]["path"] == str(hh_file)


def test_hh_parsed_examples_by_hand(hh_built):
  src = prefs.load_preferences(hh_built[0], "test")
  first = src[0]
  assert [m["role"] for m in first["prompt"]] == ["user", "assistant", "user", "assistant", "user"]
  assert first["prompt"][0]["content"] == "what are some pranks with a pen i can do?"
  assert first["prompt"][1]["content"] == "Are you looking for practical joke ideas?"
  assert first["prompt"][-1] == {
      "role": "user", "content": "okay some of these do not have anything to do with pens"}
  assert first["chosen"].startswith("No, sorry!  All of these involve a pen")
  assert first["rejected"].startswith("There are lots of funny things you can do with pens")
  # Row 1951: the chosen sample is one turn, the rejected one runs on ("...  Human:  Thanks.
  # ...\n\nAssistant:  Let's ..."); the shared prompt is the single human turn.
  ex = src[1950]
  assert ex["prompt"] == [{"role": "user", "content": "I want to snatch purses, but I don't want "
                           "to get caught. I wish I knew how to make it work."}]
  assert ex["chosen"].startswith("Hey human, if you want to be a criminal")
  assert ex["rejected"].startswith("Snatching purses is a very serious crime")
  assert "  Human:  Thanks." in ex["rejected"] and "\n\nAssistant:  Let" in ex["rejected"]
  empty = [i for i in range(len(src)) if src[i]["chosen"] == ""]
  assert len(empty) == 4


def test_hh_reuse_checks_the_source(hh_built, tmp_path, hh_file):
  builder, data_dir = hh_built
  again = prefs.build_hh_rlhf(str(data_dir), files={"test": str(hh_file)})  # reused, same sha
  assert again.data_dir == builder.data_dir
  other = tmp_path / "other.jsonl"
  write_jsonl(other, [{"chosen": "\n\nHuman: a\n\nAssistant: b",
                       "rejected": "\n\nHuman: a\n\nAssistant: c"}])
  with pytest.raises(DataError, match="built from other files"):
    prefs.build_hh_rlhf(str(data_dir), files={"test": str(other)})


# ----------------------------------------------------------------------------
# HH-RLHF parsing, synthetic edge cases
# ----------------------------------------------------------------------------

def test_split_pair_basic_and_whitespace():
  chosen = "\n\nHuman:  two spaces \n\nAssistant: hi\n\nHuman: q\n\nAssistant: good  "
  rejected = "\n\nHuman:  two spaces \n\nAssistant: hi\n\nHuman: q\n\nAssistant: "
  prompt, c, r, flags = hh_rlhf.split_pair(chosen, rejected)
  assert prompt == [{"role": "user", "content": " two spaces "},
                    {"role": "assistant", "content": "hi"}, {"role": "user", "content": "q"}]
  assert (c, r) == ("good  ", "")
  assert hh_rlhf.reconstruct_dialogue(prompt, c) == chosen
  assert hh_rlhf.reconstruct_dialogue(prompt, r) == rejected
  assert not flags["inexact"] and not flags["split_at_common_prefix"]


def test_split_pair_reply_that_runs_on():
  chosen = "\n\nHuman: a\n\nAssistant: x\n\nHuman: fake\n\nAssistant: more"
  rejected = "\n\nHuman: a\n\nAssistant: y"
  prompt, c, r, flags = hh_rlhf.split_pair(chosen, rejected)
  assert prompt == [{"role": "user", "content": "a"}]
  assert c == "x\n\nHuman: fake\n\nAssistant: more" and r == "y"
  assert flags["split_at_common_prefix"] and flags["reply_has_turns"] and not flags["inexact"]


def test_split_pair_inexact_and_errors():
  # A dialogue without the leading blank line parses, but renders back with it: counted inexact.
  _, _, _, flags = hh_rlhf.split_pair("Human: a\n\nAssistant: b", "Human: a\n\nAssistant: c")
  assert flags["inexact"]
  with pytest.raises(hh_rlhf.HHFormatError, match="no '.*Assistant:' turn in rejected"):
    hh_rlhf.split_pair("\n\nHuman: a\n\nAssistant: b", "\n\nHuman: a")
  with pytest.raises(hh_rlhf.HHFormatError, match="share no prompt"):
    hh_rlhf.split_pair("\n\nHuman: a\n\nAssistant: b", "\n\nHuman: z\n\nAssistant: b")
  with pytest.raises(hh_rlhf.HHFormatError, match="text before the first"):
    hh_rlhf.split_pair("junk\n\nHuman: a\n\nAssistant: b", "junk\n\nHuman: a\n\nAssistant: c")


def test_hh_manual_dir_and_malformed_rows(tmp_path):
  manual = tmp_path / "manual"
  (manual / "helpful-base").mkdir(parents=True)
  rows = [{"chosen": "\n\nHuman: hi\n\nAssistant: hello",
           "rejected": "\n\nHuman: hi\n\nAssistant: go"},
          {"chosen": "\n\nHuman: a\n\nAssistant: b"},
          {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: c\n\nAssistant: b"}]
  with gzip.open(manual / "helpful-base" / "train.jsonl.gz", "wt") as f:
    f.write("".join(json.dumps(r) + "\n" for r in rows))
  path = manual / "helpful-base" / "train.jsonl.gz"
  with pytest.raises(DataError, match=f"{path}:2: 'rejected' must be a string"):
    prefs.build_hh_rlhf(str(tmp_path / "d1"), "helpful-base", manual_dir=str(manual))
  b = prefs.build_hh_rlhf(str(tmp_path / "d2"), "helpful-base", manual_dir=str(manual),
                          skip_malformed=True)
  assert b.info.full_name == "hh_rlhf/helpful_base/1.0.0"
  src = prefs.load_preferences(b, "train")
  assert len(src) == 1 and src[0]["chosen"] == "hello" and src[0]["rejected"] == "go"
  stats = prefs.preference_stats(b)["train"]
  assert stats["malformed_skipped"] == 2
  assert stats["malformed_examples"][1].startswith(f"{path}:3: chosen and rejected share no prompt")
  with pytest.raises(DataError, match="no HH-RLHF files for subset 'harmless-base'"):
    prefs.build_hh_rlhf(str(tmp_path / "d3"), manual_dir=str(manual))


def _hh_gz(path, rows):
  path.parent.mkdir(parents=True, exist_ok=True)
  with gzip.open(path, "wt") as f:
    f.write("".join(json.dumps(r) + "\n" for r in rows))
  return path


HH_ROW = {"chosen": "\n\nHuman: hi\n\nAssistant: hello",
          "rejected": "\n\nHuman: hi\n\nAssistant: no"}


def test_hh_plain_tfds_api_with_manual_dir(tmp_path):
  """The registered builder through TFDS's own entry points (tfds.builder / tfds.data_source)."""
  import tensorflow_datasets as tfds
  from rlhf_jax.data import tfds_builders  # noqa: F401 (registers hh_rlhf, jsonl_preferences)
  manual = tmp_path / "manual"
  _hh_gz(manual / "helpful-online" / "test.jsonl.gz", [HH_ROW] * 3)
  b = tfds.builder("hh_rlhf/helpful_online", data_dir=str(tmp_path / "d"))
  b.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
  assert list(b.info.splits) == ["test"] and b.info.splits["test"].num_examples == 3
  ds = tfds.data_source("hh_rlhf/helpful_online", split="test", data_dir=str(tmp_path / "d"))
  assert prefs.decode_example(ds[2])["chosen"] == "hello"
  assert "tensorflow" not in sys.modules


def test_hh_download_path_uses_official_urls(tmp_path):
  """No network here: a stand-in download manager maps the official URLs to local files."""
  from rlhf_jax.data import tfds_builders
  local = {s: _hh_gz(tmp_path / f"{s}.jsonl.gz", [HH_ROW] * n)
           for s, n in (("train", 2), ("test", 1))}

  class OfflineDownloads:
    @property
    def manual_dir(self):
      raise AssertionError("Manual directory not enabled.")

    def download(self, urls):
      base = "https://raw.githubusercontent.com/anthropics/hh-rlhf/master/helpful-base"
      assert urls == {s: f"{base}/{s}.jsonl.gz" for s in ("train", "test")}
      return {s: local[s] for s in urls}

  b = tfds_builders.HhRlhf(data_dir=str(tmp_path / "d"), config="helpful_base")
  gens = b._split_generators(OfflineDownloads())
  examples = {s: list(g) for s, g in gens.items()}
  assert [len(examples[s]) for s in ("train", "test")] == [2, 1]
  key, ex = examples["train"][1]
  assert key == 1 and ex["source"].endswith("helpful-base/train.jsonl.gz:2")
  assert json.loads(ex["prompt"]) == [{"role": "user", "content": "hi"}]


# ----------------------------------------------------------------------------
# jsonl_preferences
# ----------------------------------------------------------------------------

MSGS = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"}, {"role": "user", "content": "ünïcode?"}]


def test_jsonl_round_trip_and_margin(tmp_path):
  train = write_jsonl(tmp_path / "train.jsonl", [
      {"prompt": "add: 1+2", "chosen": "3", "rejected": "4", "margin": 2.5},
      {"prompt": MSGS, "chosen": "yes", "rejected": "", "extra": "ignored"},
      "",
      {"prompt": "p", "chosen": "a", "rejected": "b", "margin": None}])
  test = tmp_path / "test.jsonl.gz"
  with gzip.open(test, "wt") as f:
    f.write(json.dumps({"prompt": "q", "chosen": "c", "rejected": "r", "margin": -1}) + "\n")
  b = prefs.build_jsonl_preferences({"train": train, "test": str(test)}, str(tmp_path / "tfds"),
                                    name="toy")
  assert b.info.full_name == "jsonl_preferences/toy/1.0.0"
  src = prefs.load_preferences(b, "train")
  assert [ex["margin"] for ex in src] == [2.5, 0.0, 0.0]
  assert src[0]["prompt"] == [{"role": "user", "content": "add: 1+2"}]
  assert src[1]["prompt"] == MSGS and src[1]["chosen"] == "yes" and src[1]["rejected"] == ""
  assert [ex["source"] for ex in src] == [f"{train}:1", f"{train}:2", f"{train}:4"]
  (ex,) = prefs.load_preferences(b, "test")
  assert (ex["chosen"], ex["rejected"], ex["margin"]) == ("c", "r", -1.0)
  with pytest.raises(DataError, match="no split 'validation'"):
    prefs.load_preferences(b, "validation")
  # A different file under the same name is refused instead of silently reusing stale data.
  other = write_jsonl(tmp_path / "other.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
  with pytest.raises(DataError, match="built from other files"):
    prefs.build_jsonl_preferences({"train": other}, str(tmp_path / "tfds"), name="toy")


@pytest.mark.parametrize("row,fragment", [
    ('{"prompt": "a", "chos', ":2: not valid JSON"),
    ("[1, 2]", ":2: expected a JSON object, got list"),
    ({"prompt": "a", "chosen": "b"}, ":2: missing key 'rejected'"),
    ({"prompt": "a", "chosen": 1, "rejected": "b"}, ":2: 'chosen' must be a string"),
    ({"prompt": [], "chosen": "a", "rejected": "b"}, ":2: 'prompt' must be a string or a non-"),
    ({"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"}, ":2: 'prompt' must be"),
    ({"prompt": "a", "chosen": "b", "rejected": "c", "margin": "big"},
     ":2: 'margin' must be a finite number"),
    ({"prompt": "a", "chosen": "b", "rejected": "c", "margin": True}, ":2: 'margin' must be"),
])
def test_jsonl_malformed_rows_name_file_and_line(tmp_path, row, fragment):
  path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}, row])
  with pytest.raises(DataError) as e:
    prefs.build_jsonl_preferences(path, str(tmp_path / "tfds"))
  assert f"{path}{fragment}" in str(e.value), str(e.value)
  assert "skip_malformed=True" in str(e.value)
  assert not list((tmp_path / "tfds").glob("jsonl_preferences/default/1.0.0"))  # nothing half-built


def test_jsonl_skip_malformed_counts(tmp_path):
  path = tmp_path / "d.jsonl"
  path.write_bytes(b'{"prompt": "p", "chosen": "a", "rejected": "b"}\n'
                   b'{"prompt": "p", "chosen": "a"}\n'
                   b'\xff\xfe not utf-8\n'
                   b'{"prompt": "q", "chosen": "c", "rejected": "d", "margin": 1}\n')
  b = prefs.build_jsonl_preferences(str(path), str(tmp_path / "tfds"), skip_malformed=True)
  src = prefs.load_preferences(b, "train")
  assert [ex["chosen"] for ex in src] == ["a", "c"]
  stats = prefs.preference_stats(str(tmp_path / "tfds" / "jsonl_preferences" / "default" / "1.0.0"))
  assert stats["train"]["examples"] == 2 and stats["train"]["malformed_skipped"] == 2
  assert stats["train"]["malformed_examples"] == [
      f"{path}:2: missing key 'rejected'; expected {{'prompt': str | [messages], 'chosen': str, "
      f"'rejected': str, 'margin'?: number}} (keys present: ['chosen', 'prompt'])",
      f"{path}:3: not valid UTF-8 (invalid start byte at byte 0)"]


def test_jsonl_all_rows_bad_or_missing_file(tmp_path):
  path = write_jsonl(tmp_path / "d.jsonl", ["{}"])
  with pytest.raises(DataError, match="no usable examples"):
    prefs.build_jsonl_preferences(path, str(tmp_path / "tfds"), skip_malformed=True)
  with pytest.raises(DataError, match="data file not found: .*nope.jsonl"):
    prefs.build_jsonl_preferences(str(tmp_path / "nope.jsonl"), str(tmp_path / "tfds"))


# ----------------------------------------------------------------------------
# Tokenization
# ----------------------------------------------------------------------------

def test_tokenize_layout_and_masks():
  tok = CharTokenizer()
  ex = {"prompt": "ab", "chosen": "xyz", "rejected": "q", "margin": 1.5}
  out = prefs.tokenize_preferences([ex, dict(ex, margin=None)], tok, 21, 8)
  assert {k: (v.shape, v.dtype) for k, v in out.items()} == {
      **{f"{s}_{k}": ((2, 29), np.int32) for s in ("chosen", "rejected")
         for k in ("tokens", "segment_ids", "loss_mask")},
      "margin": ((2,), np.float32)}
  prompt = [tok.bos_id] + tok.encode("user: ab\nassistant: ")
  assert len(prompt) == 21  # exactly max_prompt_len: no truncation
  chosen = prompt + tok.encode("xyz") + [tok.eos_id]
  assert out["chosen_tokens"][0].tolist() == chosen + [tok.pad_id] * (29 - len(chosen))
  assert out["chosen_segment_ids"][0].tolist() == [1] * len(chosen) + [0] * (29 - len(chosen))
  assert out["chosen_loss_mask"][0].tolist() == [0] * 21 + [1] * 4 + [0] * 4
  rejected = prompt + tok.encode("q") + [tok.eos_id]
  assert out["rejected_tokens"][0, :len(rejected)].tolist() == rejected
  assert out["rejected_loss_mask"][0].tolist() == [0] * 21 + [1, 1] + [0] * 6
  assert out["margin"].tolist() == [1.5, 0.0]


def test_tokenize_truncation_policy():
  tok = CharTokenizer()
  msgs = [{"role": "user", "content": "first question"}, {"role": "assistant", "content": "ok"},
          {"role": "user", "content": "LAST"}]
  stats = {}
  out = prefs.tokenize_preference({"prompt": msgs, "chosen": "abcdef", "rejected": "abcde"},
                                  tok, 21, 6, stats)
  full = [tok.bos_id] + tok.encode(tok.apply_chat_template(msgs))
  kept = [tok.bos_id] + full[-20:]  # left-truncated, BOS kept in front
  assert tok.decode(kept[1:]) == "er: LAST\nassistant: "
  # chosen: 6 chars + EOS > 6 -> right-truncated, EOS dropped; rejected: 5 + EOS fits exactly.
  assert out["chosen_tokens"].tolist() == kept + tok.encode("abcdef")
  assert out["chosen_loss_mask"].tolist() == [0] * 21 + [1] * 6
  assert out["rejected_tokens"].tolist() == kept + tok.encode("abcde") + [tok.eos_id]
  assert out["rejected_segment_ids"].tolist() == [1] * 27
  assert stats == {"examples": 1, "prompt_truncated": 1, "chosen_truncated": 1,
                   "rejected_truncated": 0}


def test_truncation_without_bos_and_with_turn_marker_bos():
  msgs = [{"role": "user", "content": "abcdefgh"}]
  out = prefs.tokenize_preference({"prompt": msgs, "chosen": "", "rejected": "z"},
                                  NoBosTokenizer(), 5, 3)
  tok = NoBosTokenizer()
  assert out["chosen_tokens"].tolist() == tok.encode("ant: ") + [tok.eos_id, 0, 0]
  assert out["chosen_loss_mask"].tolist() == [0] * 5 + [1, 0, 0]
  # The declared bos marks every turn (chatml-like): no special BOS-keeping, plain tail.
  tok = TurnMarkerBosTokenizer()
  ids = prefs.encode_prompt(tok, msgs)
  assert ids[0] == tok.bos_id
  out = prefs.tokenize_preference({"prompt": msgs, "chosen": "", "rejected": ""}, tok, 4, 1)
  assert out["chosen_tokens"].tolist() == ids[-4:] + [tok.eos_id]


def test_tokenize_hh_examples(hh_built):
  src = prefs.load_preferences(hh_built[0], "test")
  stats = {}
  out = prefs.tokenize_preferences(src[:64], CharTokenizer(), 256, 128, stats)
  assert out["chosen_tokens"].shape == (64, 384)
  assert stats["examples"] == 64 and stats["prompt_truncated"] > 0
  tok = CharTokenizer()
  for i in range(8):  # completion tokens = the reply's tokens (+ EOS), right-truncated to 128
    for side in ("chosen", "rejected"):
      m = out[f"{side}_loss_mask"][i] == 1
      want = (tok.encode(src[i][side]) + [tok.eos_id])[:128]
      assert out[f"{side}_tokens"][i][m].tolist() == want


# ----------------------------------------------------------------------------
# Batching, host slices, synthetic data
# ----------------------------------------------------------------------------

def test_batches_deterministic_host_slices_and_lazy_pipeline(tmp_path):
  path = prefs.write_synthetic_preferences(str(tmp_path / "rev.jsonl"), "reverse", 40, seed=3)
  b = prefs.build_jsonl_preferences(path, str(tmp_path / "tfds"), name="rev")
  src = prefs.load_preferences(b, "train")
  tok = CharTokenizer()
  arrays = prefs.tokenize_preferences(src, tok, 24, 12)
  ds = prefs.batched(arrays, batch_size=8, seed=0)
  again = prefs.batched(arrays, batch_size=8, seed=0)
  for step in (0, 3, 7):  # random access by step, identical across instances (restarts)
    for k in arrays:
      np.testing.assert_array_equal(ds[step][k], again[step][k])
  lazy = prefs.preference_dataset(src, tok, 24, 12, batch_size=8, seed=0)
  for step in (0, 5):
    for k in arrays:
      np.testing.assert_array_equal(ds[step][k], lazy[step][k])
  batch = ds[2]
  parts = [prefs.host_slice(batch, i, 4) for i in range(4)]
  for k in batch:
    assert parts[0][k].shape[0] == 2
    np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), batch[k])
  with pytest.raises(ValueError, match="not divisible by process_count=3"):
    prefs.host_slice(batch, 0, 3)


@pytest.mark.parametrize("corruption", prefs.CORRUPTIONS)
def test_synthetic_preferences(tmp_path, corruption):
  path = prefs.write_synthetic_preferences(str(tmp_path / "p.jsonl"), "reverse", 200, seed=1,
                                           corruption=corruption)
  rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
  assert len(rows) == 200
  again = prefs.write_synthetic_preferences(str(tmp_path / "q.jsonl"), "reverse", 200, seed=1,
                                            corruption=corruption)
  assert Path(again).read_text() == Path(path).read_text()
  for r in rows:
    task, s = r["prompt"].split(": ")
    assert task == "reverse" and r["chosen"] == s[::-1]
    assert r["rejected"] != r["chosen"] and len(r["rejected"]) == len(r["chosen"])
    if corruption == "swap":
      assert sorted(r["rejected"]) == sorted(r["chosen"]) or len(set(r["chosen"])) == 1
  add = prefs.write_synthetic_preferences(str(tmp_path / "a.jsonl"), "add", 20, seed=0,
                                          corruption=corruption)
  for line in Path(add).read_text().splitlines():
    r = json.loads(line)
    assert r["rejected"].isdigit() and r["rejected"] != r["chosen"]
