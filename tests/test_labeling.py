"""Preference pairs from scored candidates (rlhf_jax.labeling.pairs_from_scores)."""
from rlhf_jax.labeling import pairs_from_scores


def test_one_pair_per_prompt_best_vs_worst_and_ties_skipped():
  ex = [{"prompt": "p0", "answer": "3"}, {"prompt": "p1", "answer": "5"},
        {"prompt": "p2", "answer": "7"}]
  cands = [["3", "4", "2", "3"], ["5", "5"], ["1", "2"]]
  scores = [[1, 0, 0, 1], [1, 1], [0, 0]]
  pairs, stats = pairs_from_scores(ex, cands, scores, seed=0)
  assert [(p["prompt"], p["chosen"]) for p in pairs] == [("p0", "3")]
  assert pairs[0]["rejected"] in ("4", "2") and pairs[0]["chosen_score"] == 1.0
  assert stats == {"prompts": 3, "pairs": 1, "tied_prompts": 2, "reference_pairs": 0,
                   "mean_candidate_score": (0.5 + 1 + 0) / 3}


def test_reference_fallback_only_for_all_wrong_prompts():
  ex = [{"prompt": "p1", "answer": "5"}, {"prompt": "p2", "answer": "7"}]
  pairs, stats = pairs_from_scores(ex, [["5", "5"], ["1", "2"]], [[1, 1], [0, 0]],
                                   reference_fallback=True)
  assert len(pairs) == 1 and pairs[0]["chosen"] == "7" and pairs[0]["rejected"] in ("1", "2")
  assert stats["reference_pairs"] == 1 and stats["tied_prompts"] == 2


def test_max_pairs_gives_distinct_ordered_text_pairs():
  ex = [{"prompt": "p", "answer": "3"}]
  cands = [["3", "4", "4", "2", "9", "3"]]
  scores = [[1.0, 0.0, 0.0, 0.0, 0.5, 1.0]]
  pairs, _ = pairs_from_scores(ex, cands, scores, max_pairs=10, seed=3)
  got = {(p["chosen"], p["rejected"]) for p in pairs}
  # distinct texts 3 (1.0), 9 (0.5), 4 (0), 2 (0): every strictly ordered pair, no duplicates
  assert got == {("3", "9"), ("3", "4"), ("3", "2"), ("9", "4"), ("9", "2")}
  assert len(pairs) == len(got)
  assert all(p["chosen_score"] > p["rejected_score"] for p in pairs)
  two, _ = pairs_from_scores(ex, cands, scores, max_pairs=2, seed=3)
  assert len(two) == 2 and {(p["chosen"], p["rejected"]) for p in two} <= got
