"""AI-feedback labelling: candidates judged into preference pairs, records and stats.

`label(examples, candidates, judge)` is the core of `rlhf-jax label` (rlhf_jax.ai_feedback)
and of the judged `rlhf-jax constitution` (rlhf_jax.ai_feedback_constitution); the readers
of prompt and candidate files live here too.

Agreement with gold (prompts with a numeric "answer"): the verifiable math reward
scores every candidate; among the judge's non-tied comparisons whose gold scores
differ, the fraction where the judge prefers the answer gold scores higher
(`labeling.gold_agreement`): `gold_agreement` over every comparison the judge made
(pointwise judges: every two distinct candidates), `pairs_gold_agreement` over the
pairs written.
"""
from __future__ import annotations

import json
from typing import Sequence

import numpy as np


# ----------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------

def read_prompts(path: str, limit: int = 0) -> list[dict]:
  """[{"prompt": str | messages, "answer": str}] of a JSONL prompt file (limit 0 = all)."""
  from rlhf_jax import evaluation
  from rlhf_jax.data.rows import check_messages
  rows = evaluation.read_prompt_rows(path, limit if limit > 0 else 1 << 62)
  for i, r in enumerate(rows):
    if isinstance(r["prompt"], list):
      r["prompt"] = check_messages(f"{path}: row {i + 1}", r["prompt"])
  return rows


def read_candidates(path: str, limit: int = 0) -> list[dict]:
  """[{"prompt", "answer", "completions": [str, ...]}] of a JSONL candidates file: rows
  {"prompt": str | messages, "completions": [>= 2 strings], "answer"?}."""
  from rlhf_jax.data import sft as sft_data
  from rlhf_jax.data.rows import check_messages
  rows = []
  for lineno, row in sft_data.read_jsonl_rows(path, required=("prompt", "completions")):
    where = f"{path}:{lineno}"
    prompt = row["prompt"]
    if not isinstance(prompt, str):
      prompt = check_messages(where, prompt)
    comps = row["completions"]
    if (not isinstance(comps, list) or len(comps) < 2
        or not all(isinstance(c, str) for c in comps)):
      raise sft_data.DataError(f"{where}: 'completions' must be a list of >= 2 strings "
                               f"(the candidates the judge ranks)")
    rows.append({"prompt": prompt, "answer": str(row.get("answer", "") or ""),
                 "completions": list(comps)})
    if limit and len(rows) >= limit:
      break
  return rows


def _key(prompt) -> str:
  return json.dumps(prompt, sort_keys=True)


def gold_scores(texts: Sequence[str], answer: str) -> np.ndarray:
  """float64 gold (math) scores of texts for one answer; NaN when there is no numeric one."""
  from rlhf_jax.rewards.math import MathReward, normalize_number
  if normalize_number(answer) is None:
    return np.full((len(texts),), np.nan)
  return np.asarray(MathReward()([""] * len(texts), list(texts),
                                 {"answer": [answer] * len(texts)}), np.float64)


def _distinct(texts: Sequence[str]) -> list[str]:
  return list(dict.fromkeys(texts))


# ----------------------------------------------------------------------------
# Labelling
# ----------------------------------------------------------------------------

def label(examples: list[dict], candidates: list[list[str]], judge, *,
          splits: Sequence[tuple[str, slice]] = (("train", slice(None)),), seed: int = 0,
          max_pairs: int = 1, tie_margin: float = 0.0, reference_fallback: bool = False,
          margin_scale: float = 1.0, pairing: str = "random", progress: bool = True) -> dict:
  """Judge every example's candidates; returns {split: {"pairs", "records", "stats"}}.

  pairs: [{"prompt", "chosen", "rejected", "margin"}]; records: one per example (every
  candidate and judge score); stats: see the module docstring.
  """
  from rlhf_jax import judges, labeling
  golds = [gold_scores(_distinct(c), ex.get("answer", "")) for ex, c in zip(examples, candidates)]
  gold_of = [dict(zip(_distinct(c), g)) for c, g in zip(candidates, golds)]
  out = {}
  if judge.kind == "pointwise":
    flat_p = [ex["prompt"] for ex, c in zip(examples, candidates) for _ in c]
    flat_c = [t for c in candidates for t in c]
    flat_a = [ex.get("answer", "") for ex, c in zip(examples, candidates) for _ in c]
    flat = judge.scores(flat_p, flat_c, flat_a, progress=progress)
    scores, i = [], 0
    for c in candidates:
      scores.append(flat[i:i + len(c)])
      i += len(c)
    for name, sl in splits:
      ex_s, c_s, s_s, g_s = examples[sl], candidates[sl], scores[sl], gold_of[sl]
      pairs, stats = labeling.pairs_from_scores(
          ex_s, c_s, s_s, seed=seed, max_pairs=max_pairs, reference_fallback=reference_fallback,
          tie_margin=tie_margin, pairing=pairing)
      prefs, ga, gb = [], [], []
      records = []
      by_example: dict[int, list] = {}
      for p in pairs:
        by_example.setdefault(p["example"], []).append(p)
      for j, (ex, c, s, g) in enumerate(zip(ex_s, c_s, s_s, g_s)):
        best = {}
        for t, v in zip(c, s):
          best[t] = max(float(v), best.get(t, -np.inf))
        texts = list(best)
        for a in range(len(texts)):
          for b in range(a + 1, len(texts)):
            prefs.append(best[texts[a]] - best[texts[b]])
            ga.append(g[texts[a]])
            gb.append(g[texts[b]])
        records.append({"prompt": ex["prompt"], "answer": ex.get("answer", ""),
                        "candidates": [{"text": t, "score": float(v), "gold": _num(g[t])}
                                       for t, v in zip(c, s)],
                        "pairs": [_pair_record(p) for p in by_example.get(j, [])]})
      rows = [{"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"],
               "margin": margin_scale * (p["chosen_score"] - p["rejected_score"])}
              for p in pairs]
      stats.update(_common_stats(ex_s, c_s, prefs, tie_margin))
      stats["gold_agreement"] = labeling.gold_agreement(prefs, ga, gb, tie_margin)
      stats["pairs_gold_agreement"] = _pairs_agreement(ex_s, rows)
      out[name] = {"pairs": rows, "records": records, "stats": stats}
    return out

  # Pairwise (LM) judge: every two distinct texts of a prompt, both orders.
  comps = []  # (example index, a, b)
  for i, c in enumerate(candidates):
    texts = _distinct(c)
    comps += [(i, texts[a], texts[b]) for a in range(len(texts))
              for b in range(a + 1, len(texts))]
  res = judge.compare([examples[i]["prompt"] for i, _, _ in comps], [a for _, a, _ in comps],
                      [b for _, _, b in comps], progress=progress)
  per_example: list[list[dict]] = [[] for _ in examples]
  for j, (i, a, b) in enumerate(comps):
    pref = float(res["preference"][j])
    per_example[i].append({
        "a": a, "b": b, "logp_ab": res["logp_ab"][j].tolist(),
        "logp_ba": res["logp_ba"][j].tolist(), "score_ab": float(res["score_ab"][j]),
        "score_ba": float(res["score_ba"][j]), "preference": pref,
        "tie": labeling.is_tie(pref, tie_margin), "gold_a": _num(gold_of[i][a]),
        "gold_b": _num(gold_of[i][b])})
  index = np.arange(len(examples))
  for name, sl in splits:
    rng = np.random.default_rng(seed)
    rows, records, tied_prompts = [], [], 0
    prefs, ga, gb, s_ab, s_ba = [], [], [], [], []
    for i in index[sl]:
      ex = examples[i]
      cs = per_example[i]
      pairs = labeling.pairs_from_comparisons(ex["prompt"], cs, max_pairs=max_pairs,
                                              tie_margin=tie_margin, rng=rng, pairing=pairing)
      tied_prompts += int(not pairs)
      new = [{"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"],
              "margin": margin_scale * p["preference"]} for p in pairs]
      rows += new
      for c in cs:
        prefs.append(c["preference"])
        ga.append(np.nan if c["gold_a"] is None else c["gold_a"])
        gb.append(np.nan if c["gold_b"] is None else c["gold_b"])
        s_ab.append(c["score_ab"])
        s_ba.append(c["score_ba"])
      records.append({"prompt": ex["prompt"], "answer": ex.get("answer", ""),
                      "candidates": [{"text": t, "gold": _num(gold_of[i][t])}
                                     for t in candidates[i]],
                      "comparisons": cs, "pairs": [_pair_record(p) for p in new]})
    ex_s, c_s = examples[sl], candidates[sl]
    stats = {"prompts": len(ex_s), "pairs": len(rows), "tied_prompts": tied_prompts,
             "reference_pairs": 0}
    stats.update(_common_stats(ex_s, c_s, prefs, tie_margin))
    stats["position"] = judges.position_stats(s_ab, s_ba)
    stats["gold_agreement"] = labeling.gold_agreement(prefs, ga, gb, tie_margin)
    stats["pairs_gold_agreement"] = _pairs_agreement(ex_s, rows)
    out[name] = {"pairs": rows, "records": records, "stats": stats}
  return out


def _num(x) -> float | None:
  x = float(x)
  return None if np.isnan(x) else x


def _pair_record(p: dict) -> dict:
  return {k: p[k] for k in ("chosen", "rejected", "margin", "chosen_score", "rejected_score",
                            "preference") if k in p}


def _common_stats(examples, candidates, prefs, tie_margin) -> dict:
  from rlhf_jax import labeling
  n_ties = sum(labeling.is_tie(float(p), tie_margin) for p in prefs)
  golds = [g for ex, c in zip(examples, candidates) for g in gold_scores(c, ex.get("answer", ""))]
  golds = [g for g in golds if not np.isnan(g)]
  return {"candidates": sum(len(c) for c in candidates),
          "distinct_candidates": sum(len(set(c)) for c in candidates),
          "comparisons": len(prefs), "tied_comparisons": int(n_ties),
          "mean_candidate_gold": float(np.mean(golds)) if golds else None}


def _pairs_agreement(examples, rows) -> dict:
  """gold_agreement over the written pairs (chosen vs rejected)."""
  from rlhf_jax import labeling
  answers = {_key(ex["prompt"]): ex.get("answer", "") for ex in examples}
  ga, gb = [], []
  for r in rows:
    g = gold_scores([r["chosen"], r["rejected"]], answers.get(_key(r["prompt"]), ""))
    ga.append(g[0])
    gb.append(g[1])
  return labeling.gold_agreement([1.0] * len(rows), ga, gb)
