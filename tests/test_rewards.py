"""Reward functions: final-number extraction (real GSM8K + adversarial strings), math reward,
length / EOS / overlong rules, weighted combination, the config registry, and the
reward-model reward against the scalar model applied directly."""
import json
import os

import numpy as np
import pytest

from rlhf_jax.rewards import (CombinedReward, RewardError, combine, make_reward_fn,
                              register_reward_fn, reward_metrics)
from rlhf_jax.rewards import math as math_rw
from rlhf_jax.rewards import rules
from rlhf_jax.rewards.math import answers_match, extract_final_number, normalize_number

from conftest import shared_data_file


# ----------------------------------------------------------------------------
# Final-number extraction
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    ("#### 42", "42"),
    ("so x = 5\n#### 1,234", "1234"),
    ("We get 12 then 7. #### 19 (checked: 3 ways)", "19"),
    (r"Thus $x = \boxed{42}$.", "42"),
    (r"\boxed{\frac{3}{4}} and later 9", "0.75"),
    (r"\boxed{\dfrac{-1}{8}}", "-0.125"),
    (r"\boxed{1{,}000}", "1000"),
    (r"first \boxed{7}, corrected: \boxed{ 8 }", "8"),
    (r"\boxed{x^{2}=9, so x=3}", "2"),  # first number inside the box
    ("The answer is 42.", "42"),
    ("The final answer is: **-17** apples, not 18", "-17"),
    ("Answer: $1,234.50.", "1234.5"),
    ("answer = 3/4", "0.75"),
    ("The answer is 1/3", "1/3"),
    ("The answer is below.\nSo 2+2=4", "4"),  # no number on the marker's line: last number
    ("The answer is:\n42", "42"),
    ("The answer is 6, since 2*3 = 6 not 7", "6"),
    ("He paid $1,234.50 in total.", "1234.5"),
    ("It is -5 degrees.", "-5"),
    ("$-5", "-5"),
    ("-$5", "-5"),
    ("\u22123 degrees", "-3"),
    ("5-3 = 2", "2"),
    ("5-3", "3"),  # a binary minus is not a sign
    ("It takes 45 minutes, i.e. 0.75 hours.", "0.75"),
    ("Growth was 50%.", "50"),
    ("There are 12 apples.", "12"),
    ("pi is about 3.14.", "3.14"),
    ("He ran .5 miles", "0.5"),
    ("1000.0", "1000"),
    ("version2 has 7 items", "7"),  # digits glued to a word are not numbers
    ("no numbers here", None),
    ("", None),
    ("####", None),
])
def test_extract_final_number(text, expected):
  assert extract_final_number(text) == expected


@pytest.mark.parametrize("a,b,same", [
    ("1,000", "1000.0", True), ("$1000", "1000", True), ("0.75", "3/4", True),
    ("6/8", "0.75", True), ("-5", "5", False), ("1000", "1000.01", False),
    ("18 dollars", "18", True), (None, "5", False), ("abc", "5", False), ("1/0", "1", False),
    ("2125", "2,125", True), ("1/3", "0.333", False),
])
def test_answers_match(a, b, same):
  assert answers_match(a, b) is same
  assert answers_match(b, a) is same


def test_answers_match_tolerance_and_normalize():
  assert answers_match("0.3333", "1/3", rel_tol=1e-3)
  assert not answers_match("0.3333", "1/3")
  assert normalize_number("1,234.50") == "1234.5"
  assert normalize_number("-1/8") == "-0.125"
  assert normalize_number("2/6") == "1/3"
  assert normalize_number(" 7 ") == "7"
  assert normalize_number("x") is None and normalize_number(None) is None


@pytest.fixture(scope="module")
def gsm8k_rows():
  rows = []
  for split in ("train", "test"):
    with open(shared_data_file(f"gsm8k_{split}.jsonl"), encoding="utf-8") as f:
      rows += [json.loads(line) for line in f]
  return rows


def test_gsm8k_reference_answers_extract(gsm8k_rows):
  """Every official answer text extracts to its '#### n' number (commas removed)."""
  from rlhf_jax.data.prompts import parse_gsm8k_answer
  assert len(gsm8k_rows) == 7473 + 1319
  last_number_ok = 0
  for i, row in enumerate(gsm8k_rows):
    target = row["answer"].rpartition("####")[2].strip().replace(",", "")
    assert extract_final_number(row["answer"]) == target, (i, row["answer"][-80:])
    # Without the marker the last number of the reasoning is usually (not always) the answer.
    _, solution = parse_gsm8k_answer("gsm8k", row["answer"])
    last_number_ok += answers_match(extract_final_number(solution), target)
  assert last_number_ok / len(gsm8k_rows) > 0.97  # 8,547 of 8,792 at the time of writing


# ----------------------------------------------------------------------------
# Math reward
# ----------------------------------------------------------------------------

def test_math_reward():
  fn = math_rw.math_reward(correct=2.0, incorrect=-1.0, format_reward=0.5)
  completions = ["3 + 4 = 7\n#### 7", "The answer is 7.", "#### 8", "no idea", r"\boxed{7.0}"]
  r = fn(["q"] * 5, completions, {"answer": ["7", "7", "7", "7", "7"]})
  assert r.dtype == np.float32 and r.tolist() == [2.5, 2.0, -0.5, -1.0, 2.0]
  boxed = math_rw.MathReward(format_marker="\\boxed")
  assert boxed(["q"], [r"\boxed{1,000}"], {"answer": ["1000"]}).tolist() == [1.0]
  assert fn.name == "math"
  with pytest.raises(RewardError, match=r"row 1 has no numeric reference answer"):
    fn(["q", "q"], ["1", "2"], {"answer": ["1", ""]})
  with pytest.raises(RewardError, match=r"needs metadata\['answer'\]"):
    fn(["q"], ["1"], {})
  with pytest.raises(RewardError, match=r"metadata\['answer'\] has 2 rows, expected 1"):
    fn(["q"], ["1"], {"answer": ["1", "2"]})
  with pytest.raises(RewardError, match="2 prompts but 1 completions"):
    fn(["q", "q"], ["1"], {"answer": ["1"]})


# ----------------------------------------------------------------------------
# Rules
# ----------------------------------------------------------------------------

LENGTHS = [0, 5, 6, 7, 9, 10, 11, 30]


def test_length_penalty():
  fn = rules.LengthPenalty(target=6, coef=0.5)
  r = fn(["p"] * 8, ["c"] * 8, {"completion_lengths": LENGTHS})
  np.testing.assert_array_equal(r, np.float32([0, 0, 0, -0.5, -1.5, -2, -2.5, -12]))
  assert r.dtype == np.float32
  with pytest.raises(RewardError, match=r"'length_penalty' needs metadata\['completion_lengths'\]"):
    fn(["p"], ["c"], {"finished": [True]})


def test_missing_eos():
  fn = rules.MissingEosPenalty(penalty=-2.0)
  r = fn(["p"] * 3, ["c"] * 3, {"finished": [True, False, np.True_]})
  assert r.dtype == np.float32 and r.tolist() == [0.0, -2.0, 0.0]


def test_overlong_dapo():
  # L_max = 10, L_cache = 4: 0 up to 6, linear to -1 at 10, -1 beyond.
  fn = rules.OverlongPenalty(max_len=10, cache_len=4)
  r = fn(["p"] * 8, ["c"] * 8, {"completion_lengths": LENGTHS})
  np.testing.assert_allclose(r, [0, 0, 0, -0.25, -0.75, -1, -1, -1], atol=1e-7)
  half = rules.OverlongPenalty(max_len=10, cache_len=4, scale=0.5)
  np.testing.assert_allclose(half(["p"], ["c"], {"completion_lengths": [8]}), [-0.25])
  with pytest.raises(ValueError, match="0 < cache_len <= max_len"):
    rules.OverlongPenalty(max_len=4, cache_len=5)


# ----------------------------------------------------------------------------
# Combination and registry
# ----------------------------------------------------------------------------

META = {"answer": ["7", "7", "3"], "finished": [True, False, True],
        "completion_lengths": [4, 12, 9]}
COMPLETIONS = ["#### 7", "It is 7", "#### 4"]


def test_combine_weighted_sum_and_parts():
  total, parts = combine((math_rw.MathReward(), 2.0),
                         (rules.MissingEosPenalty(), 1.0),
                         ("long", rules.LengthPenalty(target=8, coef=0.1), 0.5)).score(
                             ["q"] * 3, COMPLETIONS, META)
  assert sorted(parts) == ["long", "math", "missing_eos"]
  assert parts["math"].tolist() == [1, 1, 0] and parts["missing_eos"].tolist() == [0, -1, 0]
  np.testing.assert_allclose(parts["long"], [0, -0.4, -0.1], rtol=1e-6)
  np.testing.assert_allclose(total, [2, 2 - 1 - 0.2, -0.05], rtol=1e-6)
  assert total.dtype == np.float32
  m = reward_metrics(total, parts)
  assert sorted(m) == ["reward/long", "reward/math", "reward/missing_eos", "reward/total"]
  assert m["reward/math"] == pytest.approx(2 / 3)


def test_combined_checks_outputs():
  class Bad:
    name = "bad"

    def __init__(self, out):
      self.out = out

    def __call__(self, prompts, completions, metadata):
      return self.out

  with pytest.raises(RewardError, match=r"'bad' returned shape \(2,\), expected \(3,\)"):
    combine((Bad(np.zeros(2)), 1.0)).total(["q"] * 3, ["c"] * 3, {})
  with pytest.raises(RewardError, match=r"'bad' returned non-finite values at rows \[1\]"):
    combine((Bad(np.array([0.0, np.nan, 1.0])), 1.0))(["q"] * 3, ["c"] * 3, {})
  # A combined reward nested in another contributes its total.
  inner = combine((rules.MissingEosPenalty(), 2.0))
  outer = combine(("inner", inner, 0.5), (rules.MissingEosPenalty(), 1.0))
  total, parts = outer(["q"] * 3, COMPLETIONS, META)
  assert total.tolist() == [0, -2, 0] and parts["inner"].tolist() == [0, -2, 0]
  with pytest.raises(ValueError, match="no components"):
    CombinedReward([])


def test_make_reward_fn_specs():
  fn = make_reward_fn([{"name": "math", "weight": 1.0},
                       {"name": "missing_eos", "weight": 1.0, "penalty": -1.0},
                       {"name": "overlong", "weight": 0.5, "max_len": 12, "cache_len": 4}])
  total, parts = fn.score(["q"] * 3, COMPLETIONS, META)
  assert fn.labels == ["math", "missing_eos", "overlong"]
  np.testing.assert_allclose(parts["overlong"], [0, -1, -0.25])
  np.testing.assert_allclose(total, [1, -0.5, -0.125])
  t2, p2 = fn(["q"] * 3, COMPLETIONS, META)
  np.testing.assert_array_equal(t2, total)
  assert sorted(p2) == sorted(parts)
  np.testing.assert_array_equal(fn.total(["q"] * 3, COMPLETIONS, META), total)
  assert make_reward_fn("math").labels == ["math"]
  assert make_reward_fn({"name": "math", "correct": 3.0}).total(
      ["q"], ["7"], {"answer": ["7"]}) == 3
  two = make_reward_fn(["math", {"name": "math", "label": "math_strict", "format_reward": 1.0}])
  assert two.labels == ["math", "math_strict"]
  assert two.total(["q"], ["#### 7"], {"answer": ["7"]}).tolist() == [3.0]


def test_make_reward_fn_from_config_dict():
  from ml_collections import ConfigDict
  cfg = ConfigDict({"rewards": [{"name": "length_penalty", "target": 2, "coef": 1.0},
                                {"name": "missing_eos", "weight": 2.0}]})
  fn = make_reward_fn(cfg.rewards)
  assert fn.total(["q"] * 3, COMPLETIONS, META).tolist() == [-2.0, -12.0, -7.0]
  assert make_reward_fn(ConfigDict({"name": "math"})).labels == ["math"]


@pytest.mark.parametrize("spec,fragment", [
    ("bleu", "unknown reward function 'bleu'; valid: ['length_penalty', 'math', 'missing_eos', "
             "'overlong', 'prm', 'reward_model'"),
    ({"name": "math", "correctt": 1}, "reward 'math': unknown option(s) ['correctt']; valid: "
                                      "['correct', 'incorrect'"),
    ({"name": "overlong", "max_len": 8}, "reward 'overlong': missing required option(s) "
                                         "['cache_len']"),
    ({"weight": 1.0}, "missing 'name'"),
    ([{"name": "math"}, {"name": "math"}], "duplicate component names ['math']"),
    ({"name": "math", "weight": "high"}, "weight must be a number"),
    (3, "expected a name, a dict with 'name', or a list"),
])
def test_make_reward_fn_errors(spec, fragment):
  with pytest.raises(ValueError) as e:
    make_reward_fn(spec)
  assert fragment in str(e.value), str(e.value)


def test_register_reward_fn():
  class Const:
    name = "const"

    def __init__(self, value=1.0):
      self.value = value

    def __call__(self, prompts, completions, metadata):
      return np.full((len(completions),), self.value, np.float32)

  register_reward_fn("test_const", Const)
  try:
    assert make_reward_fn({"name": "test_const", "value": 2.5, "weight": 2}).total(
        ["q"], ["c"], {}).tolist() == [5.0]
    with pytest.raises(ValueError, match="already registered"):
      register_reward_fn("test_const", Const)
  finally:
    from rlhf_jax import rewards
    rewards.REWARD_FNS.pop("test_const")


# ----------------------------------------------------------------------------
# Reward model
# ----------------------------------------------------------------------------

MAX_PROMPT, MAX_COMPLETION = 24, 12


@pytest.fixture(scope="module")
def rm_workdir(tmp_path_factory):
  """A random-init reward model saved as a workdir (model_config.json, tokenizer, orbax)."""
  import jax

  from rlhf_jax.checkpoint import Checkpointer
  from rlhf_jax.models import ModelConfig
  from rlhf_jax.models.heads import init_scalar_params
  from rlhf_jax.tokenizer import train_sentencepiece
  wd = tmp_path_factory.mktemp("rm")
  text = wd / "corpus.txt"
  text.write_text("User: add 12+7 what is it?\nAssistant: 19 the answer is 42. abc xyz\n" * 20)
  tok = train_sentencepiece(text, wd / "sp" / "sp", vocab_size=40, model_type="char")
  tok.save(wd)
  mcfg = ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=2,
                     n_kv_heads=1, head_dim=16, d_ff=64, max_seq_len=64)
  (wd / "model_config.json").write_text(json.dumps(mcfg.to_dict()))
  (wd / "config.json").write_text(json.dumps(
      {"data": {"max_prompt_len": MAX_PROMPT, "max_completion_len": MAX_COMPLETION}}))
  params = jax.jit(init_scalar_params, static_argnums=0)(mcfg, jax.random.PRNGKey(0))
  ckpt = Checkpointer(str(wd / "checkpoints"), save_every=1, keep=1, async_save=False)
  ckpt.maybe_save(1, {"params": params}, force=True)
  ckpt.close()
  return str(wd)


PROMPTS = ["add: 12+7", [{"role": "system", "content": "be brief"},
                         {"role": "user", "content": "what is it?"}],
           "a" * 40, "xyz", "abc", "12"]
REPLIES = ["19", "the answer is 42.", "abc", "x" * 30, "", "is it 7?"]


def test_reward_model_matches_scalar_model(rm_workdir):
  import jax

  from rlhf_jax.data.preferences import tokenize_preferences
  from rlhf_jax.models.heads import ScalarModel
  from rlhf_jax.rewards.reward_model import RewardModelReward
  from rlhf_jax.trainers.reward_model import load_reward_model, pair_scores
  fn = RewardModelReward(rm_workdir, batch_size=4)  # lengths from config.json
  assert (fn.max_prompt_len, fn.max_completion_len) == (MAX_PROMPT, MAX_COMPLETION)
  before = fn.compilations
  r = fn(PROMPTS, REPLIES, {})  # two micro-batches of 4, the second padded
  compilations = fn.compilations
  assert compilations - before <= 1  # 0 when an earlier test compiled this shape
  assert r.dtype == np.float32 and r.shape == (6,) and np.all(np.isfinite(r))
  assert np.std(r) > 0

  # The same rows through the trainer's tokenization and pair_scores.
  mcfg, params, tok = load_reward_model(rm_workdir)
  arrays = tokenize_preferences(
      [{"prompt": p, "chosen": c, "rejected": "abc"} for p, c in zip(PROMPTS, REPLIES)],
      tok, MAX_PROMPT, MAX_COMPLETION)
  tokens, seg = fn.tokenize(PROMPTS, REPLIES, {})
  np.testing.assert_array_equal(tokens, arrays["chosen_tokens"])
  np.testing.assert_array_equal(seg, arrays["chosen_segment_ids"])
  r_c, _ = jax.jit(lambda p, b: pair_scores(ScalarModel(mcfg), p, b))(params, arrays)
  np.testing.assert_allclose(r, np.asarray(r_c), rtol=1e-5, atol=1e-5)

  # Other batch sizes reuse the one compiled [batch_size, T] function.
  np.testing.assert_allclose(fn(PROMPTS[:3], REPLIES[:3], {}), r[:3], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(fn(PROMPTS[2:], REPLIES[2:], {"answer": [""] * 4}), r[2:],
                             rtol=1e-5, atol=1e-5)
  assert fn.compilations == compilations
  assert fn([], [], {}).shape == (0,)


def test_reward_model_options(rm_workdir):
  from rlhf_jax.rewards.reward_model import RewardModelReward
  fn = RewardModelReward(rm_workdir, batch_size=4)
  raw = fn.raw_scores(PROMPTS, REPLIES)
  mean, std = fn.calibrate(PROMPTS, REPLIES, {})
  assert mean == pytest.approx(raw.mean(), abs=1e-6) and std == pytest.approx(raw.std(), rel=1e-5)
  r = fn(PROMPTS, REPLIES, {})
  assert abs(r.mean()) < 1e-5 and r.std() == pytest.approx(1.0, rel=1e-4)
  # add_eos="if_finished": unfinished rows are scored without EOS (at their last token).
  eos_if = RewardModelReward(rm_workdir, batch_size=4, add_eos="if_finished", whiten=True)
  tokens, seg = eos_if.tokenize(PROMPTS[:2], REPLIES[:2], {"finished": [True, False]})
  n0, n1 = seg.sum(1)
  assert tokens[0, n0 - 1] == eos_if.tokenizer.eos_id
  assert tokens[1, n1 - 1] != eos_if.tokenizer.eos_id
  w = eos_if(PROMPTS, REPLIES, {"finished": [True] * 6})
  assert abs(w.mean()) < 1e-5 and w.std() == pytest.approx(1.0, rel=1e-3)
  with pytest.raises(RewardError, match=r"needs metadata\['finished'\]"):
    eos_if(PROMPTS, REPLIES, {})
  # Through the registry, with explicit lengths and weight.
  reg = make_reward_fn([{"name": "reward_model", "workdir": rm_workdir, "weight": 2.0,
                         "max_prompt_len": MAX_PROMPT, "max_completion_len": MAX_COMPLETION,
                         "batch_size": 4}, {"name": "missing_eos"}])
  total, parts = reg.score(PROMPTS, REPLIES, {"finished": [True] * 5 + [False]})
  np.testing.assert_allclose(parts["reward_model"], raw, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(total, 2 * raw - np.array([0] * 5 + [1]), rtol=1e-5, atol=1e-5)


def test_reward_model_errors(rm_workdir, tmp_path):
  from rlhf_jax.rewards.reward_model import RewardModelReward
  with pytest.raises(RewardError, match="does not exist"):
    RewardModelReward(str(tmp_path / "nope"))
  with pytest.raises(RewardError, match="pass max_prompt_len and max_completion_len"):
    RewardModelReward(str(tmp_path))
  with pytest.raises(ValueError, match="add_eos='never'"):
    RewardModelReward(rm_workdir, add_eos="never")


def test_reward_model_normalize_reads_the_rm_runs_heldout_score_stats(rm_workdir):
  from rlhf_jax.rewards.reward_model import RewardModelReward
  metrics = os.path.join(rm_workdir, "metrics.jsonl")
  assert not os.path.exists(metrics)
  with pytest.raises(RewardError, match="normalize=True needs eval_score_mean"):
    RewardModelReward(rm_workdir, batch_size=4, normalize=True)
  with open(metrics, "w") as f:
    f.write(json.dumps({"step": 0, "eval_score_mean": 9.0, "eval_score_std": 9.0}) + "\n")
    f.write(json.dumps({"step": 5, "loss": 1.0}) + "\n")
    f.write(json.dumps({"step": 10, "eval_score_mean": 0.25, "eval_score_std": 2.0}) + "\n")
    f.write('{"step": 11, "eval_sc')  # a line cut by a kill
  try:
    fn = RewardModelReward(rm_workdir, batch_size=4, normalize=True)
    assert (fn.mean, fn.std) == (0.25, 2.0)  # the last eval row
    raw = fn.raw_scores(PROMPTS, REPLIES)
    np.testing.assert_allclose(fn(PROMPTS, REPLIES, {}), (raw - 0.25) / 2.0, rtol=1e-6)
  finally:
    os.remove(metrics)

