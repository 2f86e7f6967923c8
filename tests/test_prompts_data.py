"""Prompt data for online RL: GSM8K (real files) and jsonl_prompts TFDS array_record builders
without TensorFlow, malformed rows, left-padded prompt tokenization, synthetic verifiable tasks."""
import gzip
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from rlhf_jax.data import prompts
from rlhf_jax.data import synthetic
from rlhf_jax.data.sft import DataError

from conftest import CharTokenizer, NoBosTokenizer, shared_data_file




def write_jsonl(path, rows):
  path = Path(path)
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
  return str(path)


# ----------------------------------------------------------------------------
# GSM8K, real data
# ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gsm8k_files():
  return {"train": str(shared_data_file("gsm8k_train.jsonl")),
          "test": str(shared_data_file("gsm8k_test.jsonl"))}


@pytest.fixture(scope="module")
def gsm8k_built(gsm8k_files, tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  return prompts.build_gsm8k(str(data_dir), files=gsm8k_files), data_dir


def test_gsm8k_build_without_tensorflow(gsm8k_built):
  builder, data_dir = gsm8k_built
  assert "tensorflow" not in sys.modules
  version_dir = data_dir / "gsm8k" / "main" / "1.0.0"
  assert sorted(p.name for p in version_dir.glob("*.array_record-*")) == [
      "gsm8k-test.array_record-00000-of-00001", "gsm8k-train.array_record-00000-of-00001"]
  assert len(prompts.load_prompts(builder, "train")) == 7473
  assert len(prompts.load_prompts(builder, "test")) == 1319
  assert len(prompts.load_prompts(str(version_dir), "test")) == 1319  # directory only
  with pytest.raises(DataError, match="no split 'validation'"):
    prompts.load_prompts(builder, "validation")


def test_gsm8k_every_row(gsm8k_built, gsm8k_files):
  builder, _ = gsm8k_built
  for split, path in gsm8k_files.items():
    rows = [json.loads(line) for line in open(path, encoding="utf-8")]
    src = prompts.load_prompts(builder, split)
    assert len(src) == len(rows)
    for i, (ex, row) in enumerate(zip(src[:], rows)):
      assert ex["source"] == f"{path}:{i + 1}"
      assert ex["prompt"] == [{"role": "user", "content": row["question"]}]
      head, tail = row["answer"].split("\n#### ")
      assert ex["answer"] == tail.replace(",", "")
      assert re.fullmatch(r"-?\d+", ex["answer"]), ex["answer"]
      assert "<<" not in ex["solution"] and ">>" not in ex["solution"] and "####" not in ex[
          "solution"]
      assert ex["solution"] == re.sub(r"<<[^>]*>>", "", head)
  stats = prompts.prompt_stats(builder)
  for split, n in (("train", 7473), ("test", 1319)):
    assert stats[split]["examples"] == stats[split]["with_answer"] == n
    assert stats[split]["malformed_skipped"] == 0
  n_annotations = sum(open(p, encoding="utf-8").read().count("<<") for p in gsm8k_files.values())
  assert stats["train"]["annotations_stripped"] + stats["test"]["annotations_stripped"] == (
      n_annotations)


def test_gsm8k_rows_by_hand(gsm8k_built):
  train = prompts.load_prompts(gsm8k_built[0], "train")
  test = prompts.load_prompts(gsm8k_built[0], "test")
  assert train[0]["answer"] == "72"
  assert train[0]["solution"] == ("Natalia sold 48/2 = 24 clips in May.\n"
                                  "Natalia sold 48+24 = 72 clips altogether in April and May.")
  assert train[1]["solution"] == ("Weng earns 12/60 = $0.2 per minute.\n"
                                  "Working 50 minutes, she earned 0.2 x 50 = $10.")
  assert test[0]["answer"] == "18"
  assert test[0]["solution"].endswith("She makes 9 * 2 = $18 every day at the farmer’s market.")
  assert test[146]["answer"] == "2125"  # "#### 2,125"
  assert "500*.25= 125 pieces" in test[146]["solution"]
  assert test[489]["answer"] == "-10"
  assert test[489]["solution"].startswith("-48 + 21 + (-3) = -30\n-30/3 = -10 degrees")


def test_gsm8k_malformed_and_manual_dir(tmp_path):
  good = {"question": "1+1?", "answer": "1+1=<<1+1=2>>2\n#### 2"}
  path = write_jsonl(tmp_path / "train.jsonl", [good, {"question": "q", "answer": "no marker"},
                                                {"question": "q"}])
  with pytest.raises(DataError, match=r"train.jsonl:2: 'answer' must be a string ending in "
                                      r"'#### <number>'.*skip_malformed=True"):
    prompts.build_gsm8k(str(tmp_path / "tfds1"), files={"train": path})
  b = prompts.build_gsm8k(str(tmp_path / "tfds2"), manual_dir=str(tmp_path), skip_malformed=True)
  assert [ex["answer"] for ex in prompts.load_prompts(b, "train")] == ["2"]
  stats = prompts.prompt_stats(b)["train"]
  assert stats["malformed_skipped"] == 2 and stats["annotations_stripped"] == 1
  assert "train.jsonl:3: 'answer' must be a string" in stats["malformed_examples"][1]
  with pytest.raises(DataError, match="no GSM8K files"):
    prompts.build_gsm8k(str(tmp_path / "tfds3"), manual_dir=str(tmp_path / "tfds2"))


def test_parse_gsm8k_answer():
  assert prompts.parse_gsm8k_answer("f:1", "a <<1+2=3>>3 b\n#### 1,234 ") == ("1234", "a 3 b")
  with pytest.raises(DataError, match="f:1: nothing after '####'"):
    prompts.parse_gsm8k_answer("f:1", "x\n#### ")


# ----------------------------------------------------------------------------
# jsonl_prompts
# ----------------------------------------------------------------------------

MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]


def test_jsonl_prompts_round_trip(tmp_path):
  train = write_jsonl(tmp_path / "train.jsonl", [
      {"prompt": "add: 1+2", "answer": "3", "solution": "1+2=3"},
      "",
      {"prompt": MESSAGES},
      {"prompt": "n", "answer": 7, "extra": "ignored"},
      {"prompt": "f", "answer": 0.5, "solution": None},
  ])
  with gzip.open(tmp_path / "eval.jsonl.gz", "wt") as f:
    f.write(json.dumps({"prompt": "é?", "answer": "ü"}, ensure_ascii=False) + "\n")
  b = prompts.build_jsonl_prompts({"train": train, "eval": str(tmp_path / "eval.jsonl.gz")},
                                  str(tmp_path / "tfds"), name="t")
  src = prompts.load_prompts(b, "train")
  assert repr(src) == "PromptSource('jsonl_prompts/t/1.0.0[train]', 4 examples)"
  assert src[0] == {"prompt": [{"role": "user", "content": "add: 1+2"}], "answer": "3",
                    "solution": "1+2=3", "source": f"{train}:1"}
  assert src[1] == {"prompt": MESSAGES, "answer": "", "solution": "", "source": f"{train}:3"}
  assert [src[i]["answer"] for i in (2, 3, -1)] == ["7", "0.5", "0.5"]
  assert prompts.load_prompts(b, "eval")[0]["prompt"][0]["content"] == "é?"
  assert prompts.prompt_stats(b)["train"]["with_answer"] == 3
  with pytest.raises(IndexError):
    src[4]
  # Rebuilding into the same data_dir from other files is refused, not silently stale.
  other = write_jsonl(tmp_path / "other.jsonl", [{"prompt": "x"}])
  with pytest.raises(DataError, match="built from other files"):
    prompts.build_jsonl_prompts({"train": other, "eval": str(tmp_path / "eval.jsonl.gz")},
                                str(tmp_path / "tfds"), name="t")


@pytest.mark.parametrize("row,fragment", [
    ('{"prompt": "a", "answ', "d.jsonl:2: not valid JSON"),
    ({"question": "a"}, "d.jsonl:2: missing key 'prompt'"),
    ({"prompt": [{"role": "user"}]}, "d.jsonl:2: 'prompt' must be a string or a non-empty list"),
    ({"prompt": []}, "d.jsonl:2: 'prompt' must be a string or a non-empty list"),
    ({"prompt": "a", "answer": [1]}, "d.jsonl:2: 'answer' must be a string or a finite number"),
    ({"prompt": "a", "answer": True}, "d.jsonl:2: 'answer' must be a string or a finite number"),
    ({"prompt": "a", "solution": 3}, "d.jsonl:2: 'solution' must be a string"),
    ("[1]", "d.jsonl:2: expected a JSON object"),
])
def test_jsonl_prompts_malformed(tmp_path, row, fragment):
  path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "ok"}, row, {"prompt": "ok2"}])
  with pytest.raises(DataError) as e:
    prompts.build_jsonl_prompts(path, str(tmp_path / "tfds"))
  assert fragment in str(e.value), str(e.value)
  b = prompts.build_jsonl_prompts(path, str(tmp_path / "tfds_skip"), skip_malformed=True)
  assert [ex["prompt"][0]["content"] for ex in prompts.load_prompts(b, "train")] == ["ok", "ok2"]
  stats = prompts.prompt_stats(b)["train"]
  assert stats["malformed_skipped"] == 1 and fragment in stats["malformed_examples"][0]


def test_jsonl_prompts_errors(tmp_path):
  with pytest.raises(DataError, match="data file not found"):
    prompts.build_jsonl_prompts(str(tmp_path / "nope.jsonl"), str(tmp_path / "tfds"))
  path = write_jsonl(tmp_path / "bad.jsonl", [{"x": 1}])
  with pytest.raises(DataError, match="split 'train': no usable examples"):
    prompts.build_jsonl_prompts(path, str(tmp_path / "tfds"), skip_malformed=True)
  with pytest.raises(DataError, match="not a built TFDS dataset directory"):
    prompts.load_prompts(str(tmp_path), "train")


# ----------------------------------------------------------------------------
# Tokenization for the sampler
# ----------------------------------------------------------------------------

def test_tokenize_prompts_left_pads():
  tok = CharTokenizer()
  exs = [{"prompt": "ab"}, {"prompt": MESSAGES}, {"prompt": [{"role": "user", "content": "x"}]}]
  stats = {}
  tokens, mask = prompts.tokenize_prompts(exs, tok, 40, stats)
  assert tokens.dtype == mask.dtype == np.int32 and tokens.shape == mask.shape == (3, 40)
  for row, ex in enumerate(exs):
    msgs = [{"role": "user", "content": ex["prompt"]}] if isinstance(ex["prompt"], str) else (
        ex["prompt"])
    ids = [tok.bos_id] + tok.encode(tok.apply_chat_template(msgs))
    n = len(ids)
    assert tokens[row, 40 - n:].tolist() == ids
    assert tokens[row, :40 - n].tolist() == [tok.pad_id] * (40 - n)
    assert mask[row].tolist() == [0] * (40 - n) + [1] * n
  assert stats == {"examples": 3, "prompt_truncated": 0}
  # Strings and examples are both accepted; every row ends at the last column.
  t2, _ = prompts.tokenize_prompts(["ab"], tok, 40)
  np.testing.assert_array_equal(t2[0], tokens[0])


def test_tokenize_prompts_left_truncates_keeping_bos():
  tok = CharTokenizer()
  long = "0123456789" * 3
  tokens, mask = prompts.tokenize_prompts([{"prompt": long}], tok, 12, stats := {})
  full = [tok.bos_id] + tok.encode(f"user: {long}\nassistant: ")
  assert tokens[0].tolist() == [tok.bos_id] + full[-11:]
  assert mask.sum() == 12 and stats["prompt_truncated"] == 1
  tokens, _ = prompts.tokenize_prompts([{"prompt": long}], NoBosTokenizer(), 12)
  assert tok.decode(tokens[0].tolist()) == "\nassistant: "
  with pytest.raises(ValueError, match="max_prompt_len=0"):
    prompts.tokenize_prompts([{"prompt": "a"}], tok, 0)
  with pytest.raises(DataError, match="no prompts"):
    prompts.tokenize_prompts([], tok, 4)


# ----------------------------------------------------------------------------
# Synthetic verifiable prompts
# ----------------------------------------------------------------------------

def _solve(prompt: str) -> int:
  """Independent solver of the synthetic prompts."""
  m = re.fullmatch(r"(?:add|compute): (\d+)([-+*])(\d+)", prompt)
  if m:
    a, op, b = int(m[1]), m[2], int(m[3])
    return a + b if op == "+" else a - b if op == "-" else a * b
  a, b = (int(x) for x in re.findall(r"\d+", prompt))
  if "buys" in prompt and "more" in prompt:
    return a + b
  if "gives away" in prompt:
    return a - b
  assert "boxes" in prompt
  return a * b


@pytest.mark.parametrize("task", synthetic.VERIFIABLE_TASKS)
def test_synthetic_prompts_are_correct(tmp_path, task):
  path = prompts.write_synthetic_prompts(str(tmp_path / f"{task}.jsonl"), task, 200, seed=3,
                                         digits=3)
  rows = [json.loads(line) for line in open(path)]
  assert len(rows) == 200
  for r in rows:
    assert r["answer"] == str(_solve(r["prompt"])), r
    assert r["solution"] == r["answer"] or r["solution"].endswith(f"#### {r['answer']}")
    assert max(int(x) for x in re.findall(r"\d+", r["prompt"])) < 1000
  assert any(int(x) >= 100 for r in rows for x in re.findall(r"\d+", r["prompt"]))
  if task == "add":  # same format as the SFT / preference "add" task
    assert all(re.fullmatch(r"add: \d+\+\d+", r["prompt"]) for r in rows)
  if task == "arithmetic":
    assert {r["prompt"][len("compute: "):].strip("0123456789") for r in rows} == {"+", "-", "*"}
  again = prompts.write_synthetic_prompts(str(tmp_path / "again.jsonl"), task, 200, seed=3,
                                          digits=3)
  assert open(again).read() == open(path).read()
  b = prompts.build_jsonl_prompts(path, str(tmp_path / "tfds"), name=task)
  src = prompts.load_prompts(b, "train")
  assert [ex["answer"] for ex in src[:]] == [r["answer"] for r in rows]


def test_synthetic_digits_and_errors():
  rng = np.random.default_rng(0)
  exs = [synthetic.make_verifiable_example("arithmetic", rng, digits=1) for _ in range(100)]
  assert all(len(x) == 1 for e in exs for x in re.findall(r"\d+", e["prompt"]))
  with pytest.raises(ValueError, match="digits=0"):
    synthetic.make_verifiable_example("add", rng, digits=0)
  with pytest.raises(ValueError, match="unknown verifiable task 'mul'.*'word'"):
    synthetic.make_verifiable_example("mul", rng)


def test_build_prints_one_line_of_ours_not_tfds_download_messages(tmp_path, capfd):
  """TFDS's "Downloading and preparing dataset Unknown size ...", "Using custom data
  configuration" and "Variant folder ... has no dataset_info.json" read like a download on
  an offline machine: building (as the trainers do) says one line of ours instead."""
  from rlhf_jax.data import prompt_sets
  from rlhf_jax.launch import load_config
  train = write_jsonl(tmp_path / "train.jsonl", [
      {"question": "1+1?", "answer": "1+1=<<1+1=2>>2\n#### 2"},
      {"question": "2+2?", "answer": "#### 4"}])
  test = write_jsonl(tmp_path / "test.jsonl", [{"question": "3+3?", "answer": "#### 6"}])
  c = load_config("configs/grpo.py:tiny")
  c.data.update(source="gsm8k", train_path=train, eval_path=test)
  data_dir = tmp_path / "wd" / "tfds" / "gsm8k"
  for state in ("built", "cached"):
    prompt_sets.load(c, str(tmp_path / "wd"))
    out, err = capfd.readouterr()
    (built,) = data_dir.glob("*/1.0.0")
    assert out + err == f"dataset gsm8k: 2 train / 1 eval rows -> {built} ({state})\n"
