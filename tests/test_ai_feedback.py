"""AI feedback (`rlhf-jax label`) and Constitutional AI data (`rlhf-jax constitution`):
the LM judge's verdict scores against an independent full forward, antisymmetry, ties,
position bias, the RM judge against the reward model's scores, agreement with gold by
hand, pairs through the trainers' preference pipeline, the constitution pipeline end to
end and its file:line errors. Tiny models; the starting policy is the shared SFT run on
1-digit addition (conftest `sft_add_run`)."""
import json
import os

import numpy as np
import pytest

from conftest import read_metrics
from rlhf_jax import ai_feedback, ai_feedback_constitution, ai_feedback_labels, judges, labeling
from rlhf_jax.constitution import ConstitutionError, load_constitution

CONSTITUTION = "configs/constitutions/harmless.json"


def write_jsonl(path, rows):
  with open(path, "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
  return str(path)


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
  rng = np.random.default_rng(0)
  rows = []
  for _ in range(24):
    a, b = (int(x) for x in rng.integers(0, 10, size=2))
    rows.append({"prompt": f"add: {a}+{b}", "answer": str(a + b)})
  return write_jsonl(tmp_path_factory.mktemp("prompts") / "prompts.jsonl", rows)


@pytest.fixture(scope="module")
def gold_labels(sft_add_run, prompts_file, tmp_path_factory):
  """`rlhf-jax label --judge=gold` on the SFT policy's own samples."""
  out = str(tmp_path_factory.mktemp("gold_labels"))
  rc = ai_feedback.label_main([
      "--judge=gold", f"--policy={sft_add_run}", f"--prompts={prompts_file}", f"--out={out}",
      "--k=4", "--num_prompts=16", "--eval_prompts=8", "--max_prompt_len=16",
      "--max_new_tokens=4", "--reference_fallback", "--no_progress"])
  assert rc == 0
  return out


@pytest.fixture(scope="module")
def rm_run(sft_add_run, gold_labels, tmp_path_factory):
  """A reward model trained (a few steps) on the labelled pairs.jsonl, through the RM
  trainer's own data pipeline (data.source=jsonl)."""
  from rlhf_jax.launch import load_config
  from rlhf_jax.trainers import reward_model
  wd = str(tmp_path_factory.mktemp("rm"))
  c = load_config("configs/rm.py:tiny")
  c.update(init_from=sft_add_run, num_steps=3, batch_size=4, log_every=1, eval_every=3)
  c.data.update(source="jsonl", train_path=f"{gold_labels}/pairs.jsonl",
                eval_path=f"{gold_labels}/pairs_eval.jsonl", max_prompt_len=16,
                max_completion_len=4, data_dir=str(tmp_path_factory.mktemp("tfds")))
  c.optimizer.warmup_steps = 1
  c.checkpoint.async_save = False
  reward_model.run(c, wd)
  return wd


@pytest.fixture(scope="module")
def lm_judge(sft_add_run):
  # The tiny tokenizer has no "B": the verdicts are "1" / "2".
  return judges.LMJudge(sft_add_run, rubric="Judge.", verdicts=("1", "2"), batch_size=4)


# ------------------------------------------------------------------ LM judge

def test_lm_judge_score_is_the_verdict_logprob_difference_and_antisymmetric(lm_judge):
  from rlhf_jax.data.preferences import truncate_prompt
  from rlhf_jax.data.sft import encode_prompt
  from rlhf_jax.models import lm_logits
  tok = lm_judge.tokenizer
  assert lm_judge.verdict_ids == (tok.encode("1")[0], tok.encode("2")[0])
  qs = ["add: 3+4", "add: 9+9", [{"role": "user", "content": "add: 1+1"}]]
  a, b = ["7", "18", "2"], ["8", "11", "22"]
  res = lm_judge.compare(qs, a, b, progress=False)
  for i in range(3):
    for first, second, key in ((a[i], b[i], "score_ab"), (b[i], a[i], "score_ba")):
      ids = lm_judge.prompt_ids(qs[i], first, second)  # the chat-rendered user turn
      full = encode_prompt(tok, [{"role": "user",
                                  "content": lm_judge.prompt_text(qs[i], first, second)}])
      assert ids == truncate_prompt(full, lm_judge.max_len, tok.bos_id)
      logits = np.asarray(lm_logits(lm_judge.model_config, lm_judge.params,
                                    np.asarray([ids])))[0, -1].astype(np.float64)
      logp = logits - logits.max() - np.log(np.sum(np.exp(logits - logits.max())))
      want = logp[lm_judge.verdict_ids[0]] - logp[lm_judge.verdict_ids[1]]
      assert res[key][i] == pytest.approx(want, abs=1e-4), (i, key)
  np.testing.assert_allclose(res["preference"], (res["score_ab"] - res["score_ba"]) / 2)
  swapped = lm_judge.compare(qs, b, a, progress=False)
  np.testing.assert_allclose(swapped["preference"], -res["preference"], atol=1e-6)
  np.testing.assert_allclose(swapped["score_ab"], res["score_ba"], atol=1e-6)


def test_ties_below_the_margin_give_no_pair():
  comps = [{"a": "x", "b": "y", "preference": 0.05}, {"a": "x", "b": "z", "preference": -0.5},
           {"a": "y", "b": "z", "preference": 0.0}, {"a": "y", "b": "w", "preference": 0.3}]
  pairs = labeling.pairs_from_comparisons("p", comps, max_pairs=5, tie_margin=0.1)
  assert [(p["chosen"], p["rejected"], p["preference"]) for p in pairs] == [
      ("z", "x", 0.5), ("y", "w", 0.3)]  # most confident first
  assert labeling.pairs_from_comparisons("p", comps, max_pairs=1, tie_margin=0.6) == []
  assert [labeling.is_tie(p, 0.1) for p in (0.0, 0.09, -0.09, 0.1, -2.0)] == [
      True, True, True, False, False]
  # pointwise scores: differences below the margin tie too
  ex = [{"prompt": "p", "answer": "1"}]
  pairs, stats = labeling.pairs_from_scores(ex, [["a", "b", "c"]], [[1.0, 0.95, 0.9]],
                                            tie_margin=0.2)
  assert pairs == [] and stats["tied_prompts"] == 1
  pairs, _ = labeling.pairs_from_scores(ex, [["a", "b", "c"]], [[1.0, 0.95, 0.9]],
                                        tie_margin=0.08, max_pairs=3)
  assert [(p["chosen"], p["rejected"]) for p in pairs] == [("a", "c")]


def test_best_vs_rest_pairs_only_prefer_the_judges_top_choice():
  ex = [{"prompt": "p", "answer": "3"}]
  cands, scores = [["3", "9", "4", "4", "2"]], [[1.0, 0.5, 0.0, 0.0, -1.0]]
  pairs, _ = labeling.pairs_from_scores(ex, cands, scores, max_pairs=2, pairing="best_vs_rest")
  assert [(p["chosen"], p["rejected"]) for p in pairs] == [("3", "2"), ("3", "4")]
  pairs, _ = labeling.pairs_from_scores(ex, cands, scores, max_pairs=9, pairing="best_vs_rest",
                                        tie_margin=0.75)
  assert [(p["chosen"], p["rejected"]) for p in pairs] == [("3", "2"), ("3", "4")]
  # pairwise: the text winning most comparisons (x: 2 wins; y wins 1, by a large margin)
  comps = [{"a": "x", "b": "y", "preference": 1.0}, {"a": "z", "b": "x", "preference": -0.2},
           {"a": "y", "b": "z", "preference": 3.0}]
  pairs = labeling.pairs_from_comparisons("p", comps, max_pairs=3, pairing="best_vs_rest")
  assert [(p["chosen"], p["rejected"]) for p in pairs] == [("x", "y"), ("x", "z")]


def test_lm_judge_labelling_counts_ties_and_position_bias(lm_judge, tmp_path):
  examples = [{"prompt": "add: 3+4", "answer": "7"}, {"prompt": "add: 2+2", "answer": "4"},
              {"prompt": "add: 5+1", "answer": "6"}]
  cands = [["7", "8", "7"], ["4", "4"], ["6", "1", "9"]]
  out = ai_feedback_labels.label(examples, cands, lm_judge, max_pairs=1, progress=False)["train"]
  s = out["stats"]
  assert s["comparisons"] == 1 + 0 + 3 and s["pairs"] == 2 and s["tied_prompts"] == 1
  recs = out["records"]
  assert [len(r["comparisons"]) for r in recs] == [1, 0, 3]
  c = recs[0]["comparisons"][0]
  assert {"a", "b", "logp_ab", "logp_ba", "score_ab", "score_ba", "preference", "tie",
          "gold_a", "gold_b"} <= set(c) and (c["gold_a"], c["gold_b"]) == (1.0, 0.0)
  all_c = [c for r in recs for c in r["comparisons"]]
  assert s["position"] == judges.position_stats([c["score_ab"] for c in all_c],
                                                [c["score_ba"] for c in all_c])
  everything_tied = ai_feedback_labels.label(examples, cands, lm_judge, tie_margin=1e9,
                                      progress=False)["train"]["stats"]
  assert everything_tied["pairs"] == 0 and everything_tied["tied_prompts"] == 3
  assert everything_tied["tied_comparisons"] == everything_tied["comparisons"] == 4


def test_position_stats_by_hand():
  s = judges.position_stats([1.0, 1.0, -1.0, 2.0], [1.0, -1.0, -1.0, -3.0])
  # the same position wins both times in comparisons 0 (first) and 2 (second)
  assert s == {"judged_in_both_orders": 4, "position_inconsistent_rate": 0.5,
               "first_position_rate": 4 / 8}


# ------------------------------------------------------------------ agreement with gold

class TableJudge:
  """A pointwise judge that looks its scores up in a table."""
  kind, spec = "pointwise", "table"

  def __init__(self, table):
    self.table = table

  def scores(self, prompts, completions, answers, progress=True):
    return np.asarray([self.table[(p, c)] for p, c in zip(prompts, completions)], np.float64)


def test_agreement_with_gold_matches_a_hand_computation():
  examples = [{"prompt": "add: 3+4", "answer": "7"}, {"prompt": "add: 2+3", "answer": "5"},
              {"prompt": "say hi", "answer": ""}, {"prompt": "add: 1+2", "answer": "3"}]
  cands = [["7", "8", "7", "9"], ["5", "6"], ["a", "b"], ["3", "4"]]
  table = {("add: 3+4", "7"): 0.9, ("add: 3+4", "8"): 0.5, ("add: 3+4", "9"): 0.7,
           ("add: 2+3", "5"): 0.1, ("add: 2+3", "6"): 0.1,
           ("say hi", "a"): 1.0, ("say hi", "b"): 0.0,
           ("add: 1+2", "3"): 0.0, ("add: 1+2", "4"): 1.0}
  out = ai_feedback_labels.label(examples, cands, TableJudge(table), margin_scale=2.0,
                          progress=False)["train"]
  # Comparisons of distinct texts: 7>8 (gold agrees), 7>9 (agrees), 9>8 (gold tie),
  # 5=6 (judge tie), a>b (no gold), 4>3 (gold disagrees): 2 of 3 decided agree.
  assert out["stats"]["gold_agreement"] == {
      "comparisons": 6, "no_gold": 1, "judge_ties": 1, "gold_ties": 1, "decided": 3,
      "agree": 2, "agreement": 2 / 3}
  # Pairs (best vs worst): 7>8 agrees, a>b has no gold, 4>3 disagrees; 5/6 tie: no pair.
  assert [(p["chosen"], p["rejected"]) for p in out["pairs"]] == [("7", "8"), ("a", "b"),
                                                                    ("4", "3")]
  assert [p["margin"] for p in out["pairs"]] == pytest.approx([0.8, 2.0, 2.0])
  assert out["stats"]["pairs_gold_agreement"] == {
      "comparisons": 3, "no_gold": 1, "judge_ties": 0, "gold_ties": 0, "decided": 2,
      "agree": 1, "agreement": 0.5}
  assert out["stats"]["tied_prompts"] == 1 and out["stats"]["tied_comparisons"] == 1
  rec = out["records"][0]
  assert [(c["text"], c["score"], c["gold"]) for c in rec["candidates"]] == [
      ("7", 0.9, 1.0), ("8", 0.5, 0.0), ("7", 0.9, 1.0), ("9", 0.7, 0.0)]
  assert labeling.gold_agreement([0.5, -0.5, 0.05], [1, 1, 0], [0, 0, 1], tie_margin=0.1)[
      "agreement"] == 0.5


# ------------------------------------------------------------------ label CLI, RM judge

def test_gold_label_cli_writes_pairs_records_and_stats(gold_labels, prompts_file):
  pairs = read_jsonl(f"{gold_labels}/pairs.jsonl")
  assert pairs and all(set(p) == {"prompt", "chosen", "rejected", "margin"} for p in pairs)
  records = read_jsonl(f"{gold_labels}/records.jsonl")
  assert [r["split"] for r in records] == ["train"] * 16 + ["eval"] * 8
  assert all(len(r["candidates"]) == 4 for r in records)
  stats = json.load(open(f"{gold_labels}/stats.json"))
  assert stats["judge"]["spec"] == "gold" and stats["samples_generated"] == 24 * 4
  for split in ("train", "eval"):
    assert stats[split]["gold_agreement"]["agreement"] in (1.0, None)  # gold agrees with gold
    assert stats[split]["pairs"] == len(read_jsonl(
        f"{gold_labels}/pairs{'_eval' if split == 'eval' else ''}.jsonl"))


def test_pairs_load_through_the_trainers_preference_pipeline(gold_labels, rm_run, tmp_path):
  from rlhf_jax.launch import load_config
  from rlhf_jax.data import pairs as pairs_lib
  rows = read_jsonl(f"{gold_labels}/pairs.jsonl")
  c = load_config("configs/dpo.py:tiny")
  c.data.update(source="jsonl", train_path=f"{gold_labels}/pairs.jsonl",
                data_dir=str(tmp_path / "tfds"))
  train, _, _ = pairs_lib.load_pairs(c, str(tmp_path))
  assert len(train) == len(rows)
  for ex, row in zip(train, rows):
    assert ex["prompt"] == [{"role": "user", "content": row["prompt"]}]
    assert (ex["chosen"], ex["rejected"]) == (row["chosen"], row["rejected"])
    assert ex["margin"] == pytest.approx(row["margin"])
  # ... and the reward-model trainer trained on them (the rm_run fixture)
  m = read_metrics(rm_run)
  assert m[-1]["step"] == 3 and "eval_accuracy" in m[-1]


def test_rm_judge_ranks_like_the_reward_model(rm_run, tmp_path, prompts_file):
  from rlhf_jax.rewards.reward_model import RewardModelReward
  cands = [{"prompt": "add: 3+4", "completions": ["7", "8", "1", "7"]},
           {"prompt": "add: 9+9", "completions": ["18", "9"]},
           {"prompt": [{"role": "user", "content": "add: 2+2"}], "completions": ["4", "5", "6"],
            "answer": "4"}]
  path = write_jsonl(tmp_path / "cands.jsonl", cands)
  out = str(tmp_path / "out")
  assert ai_feedback.label_main([f"--judge=rm:{rm_run}", f"--candidates={path}",
                                 f"--out={out}", "--max_pairs=1", "--no_progress"]) == 0
  rm = RewardModelReward(rm_run)
  pairs, records = read_jsonl(f"{out}/pairs.jsonl"), read_jsonl(f"{out}/records.jsonl")
  assert len(records) == 3
  for c, rec in zip(cands, records):
    want = rm.raw_scores([c["prompt"]] * len(c["completions"]), c["completions"], {})
    got = [x["score"] for x in rec["candidates"]]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    (pair,) = rec["pairs"]  # the best-scored text over the worst-scored one
    assert pair["chosen"] == c["completions"][int(np.argmax(want))]
    assert pair["rejected"] == c["completions"][int(np.argmin(want))]
  assert [p["margin"] for p in pairs] == pytest.approx(
      [r["pairs"][0]["chosen_score"] - r["pairs"][0]["rejected_score"] for r in records])
  stats = json.load(open(f"{out}/stats.json"))
  # gold answers: the third row's own, none for the others (no --prompts given)
  assert stats["train"]["gold_agreement"]["no_gold"] == 3 + 1
  assert stats["train"]["gold_agreement"]["decided"] + stats["train"]["gold_agreement"][
      "judge_ties"] + stats["train"]["gold_agreement"]["gold_ties"] == 3


def test_label_cli_errors_are_one_line(tmp_path, capsys, sft_add_run):
  bad = tmp_path / "cands.jsonl"
  bad.write_text('{"prompt": "p", "completions": ["a", "b"]}\n{"prompt": "p", '
                 '"completions": ["only one"]}\n')
  assert ai_feedback.label_main(["--judge=gold", f"--candidates={bad}",
                                 f"--out={tmp_path}/o"]) == 1
  err = capsys.readouterr().err.strip()
  assert err.startswith(f"error: {bad}:2: 'completions'") and "\n" not in err
  good = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "p", "completions": ["1", "2"]}])
  assert ai_feedback.label_main(["--judge=judge-me", f"--candidates={good}",
                                 f"--out={tmp_path}/o"]) == 1
  assert "--judge='judge-me': expected rm:" in capsys.readouterr().err
  assert ai_feedback.label_main([f"--judge=lm:{sft_add_run}", f"--candidates={good}",
                                 f"--out={tmp_path}/o"]) == 1  # default verdicts: no "B"
  assert "--verdicts: 'B' is not in the judge's vocabulary" in capsys.readouterr().err
  assert not os.path.exists(f"{tmp_path}/o")


# ------------------------------------------------------------------ constitution

def test_constitution_pipeline_end_to_end(sft_add_run, prompts_file, tmp_path):
  out = str(tmp_path / "cai")
  argv = [f"--policy={sft_add_run}", f"--constitution={CONSTITUTION}",
          f"--prompts={prompts_file}", "--num_prompts=3", "--rounds=2", "--max_new_tokens=4",
          "--seed=1", "--no_progress"]
  assert ai_feedback_constitution.constitution_main(argv + [f"--out={out}"]) == 0
  names = {p["name"] for p in load_constitution(CONSTITUTION)}
  records = read_jsonl(f"{out}/records.jsonl")
  assert len(records) == 3
  for rec in records:
    assert [r["round"] for r in rec["rounds"]] == [1, 2]
    assert rec["rounds"][0]["response"] == rec["initial_response"]
    assert rec["rounds"][1]["response"] == rec["rounds"][0]["revision"]
    assert rec["final_response"] == rec["rounds"][1]["revision"]
    for r in rec["rounds"]:
      assert r["principle"] in names and isinstance(r["critique"], str)
      assert isinstance(r["revision"], str) and r["critique_request"] and r["revision_request"]
  sft = read_jsonl(f"{out}/sft.jsonl")
  assert [(s["prompt"], s["completion"]) for s in sft] == [
      (r["prompt"], r["final_response"]) for r in records]
  from rlhf_jax.data.preferences import parse_preference_row
  from rlhf_jax.data.sft import row_to_messages
  for i, s in enumerate(sft):
    row_to_messages(f"{out}/sft.jsonl", i + 1, s)
  pairs = read_jsonl(f"{out}/pairs.jsonl")
  for i, p in enumerate(pairs):
    parse_preference_row(f"pairs.jsonl:{i + 1}", p)
  stats = json.load(open(f"{out}/stats.json"))
  assert stats["pairs"] + stats["unchanged"] == 3 and sum(stats["principles"].values()) == 6
  # A judge ranks the initial answer and both revisions instead.
  assert ai_feedback_constitution.constitution_main(
      argv + [f"--out={out}_judged", "--judge=gold"]) == 0
  judged = read_jsonl(f"{out}_judged/records.jsonl")
  assert [r["rounds"] for r in judged] == [r["rounds"] for r in records]  # same seed
  assert all(len(r["judge"]["candidates"]) == 3 for r in judged)
  for p in read_jsonl(f"{out}_judged/pairs.jsonl"):
    assert p["margin"] == 1.0  # gold: a correct text over a wrong one


@pytest.mark.parametrize("text,line,message", [
    ('[\n  {"name": "a", "critique": "c", "revision": "r"},\n  {"name": "b",\n'
     '   "critique": "c"}\n]\n', 3, "principle is missing 'revision'"),
    ('[\n  {"name": "a", "critique": "c", "revision": "r"},\n  {"name": "a", "critique": "c", '
     '"revision": "r"}\n]', 3, "duplicate principle name 'a' (first at line 2)"),
    ('[\n  {"name": "a", "critique": "c", "revision": "r", "critic": "x"}\n]', 2,
     "unknown key 'critic'"),
    ('[\n  {"name": "a", "critique": "", "revision": "r"}\n]', 2,
     "'critique' must be a non-empty string"),
    ('[\n  {"name": "a", "critique": "c", "revision": "r"}\n  {"name": "b"}\n]', 3,
     "expected ',' or ']'"),
    ('[\n  {"name": "a", "critique": "c",\n   "revision": r}\n]', 3, "not valid JSON"),
])
def test_bad_constitution_file_names_file_and_line(tmp_path, text, line, message):
  path = tmp_path / "bad.json"
  path.write_text(text)
  with pytest.raises(ConstitutionError) as e:
    load_constitution(str(path))
  assert str(e.value).startswith(f"{path}:{line}: ") and message in str(e.value)


def test_bad_constitution_cli_is_one_error_line(tmp_path, capsys, prompts_file):
  path = tmp_path / "c.jsonl"
  path.write_text('{"name": "a", "critique": "c", "revision": "r"}\n\n{"name": "b", '
                  '"critique": "c", "revison": "r"}\n')
  rc = ai_feedback_constitution.constitution_main([
      f"--policy={tmp_path}/no_policy", f"--constitution={path}", f"--prompts={prompts_file}",
      f"--out={tmp_path}/o"])
  err = capsys.readouterr().err.strip()
  assert rc == 1 and err == (f"error: {path}:3: unknown key 'revison'; a principle has "
                             f"['name', 'critique', 'revision'] and optionally ['preference']")
  assert not os.path.exists(f"{tmp_path}/o")


def test_experiment_sweep_validates(tmp_path, capsys):
  """experiments/ai_feedback/sweep.py loads and every override key exists (dry run)."""
  from rlhf_jax.sweep import main
  assert main(["experiments/ai_feedback/sweep.py:tiny", f"--sweep_dir={tmp_path}",
               "--dry_run"]) == 0
  out = capsys.readouterr().out
  assert "label --judge=rm:" in out and "--pairing=best_vs_rest" in out
