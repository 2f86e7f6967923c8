"""AI feedback: preference labels from a judge (`rlhf-jax label`) and Constitutional AI
data (`rlhf-jax constitution`).

`rlhf-jax label` (RLAIF, Lee et al. 2023; the feedback step of Bai et al. 2022)

    for each prompt x:  y_1..y_k      sampled from --policy (T = --temperature), or read
                                      from --candidates ({"prompt", "completions": [...]})
                        judge         --judge=rm:WORKDIR | lm:MODEL | gold (rlhf_jax.judges)
                        pairs         pointwise judges (rm, gold): chosen = a best-scored
                                      text, rejected = a worst-scored one
                                      (`labeling.pairs_from_scores`); the pairwise LM judge
                                      compares every two distinct texts in both orders and
                                      keeps the most confident comparisons
                                      (`labeling.pairs_from_comparisons`); up to --max_pairs
                                      per prompt (--pairing=random: any (better, worse) pairs;
                                      best_vs_rest: the judge's top text over the others);
                                      ties (|preference| < --tie_margin) give none

  writes OUT/pairs.jsonl ({"prompt", "chosen", "rejected", "margin"}: the RM / DPO
  trainers' `data.source=jsonl` format; margin = --margin_scale x the judge's preference
  strength, which the RM trainer subtracts inside its sigmoid when rm.use_margin),
  OUT/pairs_eval.jsonl (the next --eval_prompts prompts, labelled the same way),
  OUT/records.jsonl (every candidate with every judge score; LM judge: every comparison
  with the verdict log-probs in both orders) and OUT/stats.json (pairs, ties, position
  bias, agreement with gold).

  Agreement with gold (prompts with a numeric "answer"): the verifiable math reward
  scores every candidate; among the judge's non-tied comparisons whose gold scores
  differ, the fraction where the judge prefers the answer gold scores higher
  (`labeling.gold_agreement`): `gold_agreement` over every comparison the judge made
  (pointwise judges: every two distinct candidates), `pairs_gold_agreement` over the
  pairs written.

`rlhf-jax constitution` (supervised stage of Constitutional AI, Bai et al. 2022, sec. 3)

    y_0 = policy(x)                                   the initial answer
    for round r = 1..R:  principle p_r ~ uniform(constitution)   (seeded)
        c_r = policy(x, y_{r-1}, p_r.critique)         critique of the current answer
        y_r = policy(x, y_{r-1}, p_r.critique, c_r, p_r.revision)   the revision

  every prompt rendered as one multi-turn chat with the policy tokenizer's template.
  Writes OUT/records.jsonl (every intermediate text), OUT/sft.jsonl ({"prompt",
  "completion": y_R}: SFT data), OUT/pairs.jsonl (y_R chosen over y_0; with --judge,
  the judge ranks y_0..y_R instead) and OUT/stats.json.

A constitution file is a JSON list (or JSONL, one object a line) of principles
{"name", "critique", "revision"[, "preference"]}: "critique" asks for a critique of the
assistant's last answer, "revision" asks for a rewritten answer, the optional
"preference" is a comparison question an LM judge may use as its rubric
(`judges.load_rubric`). Errors name file:line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Sequence

import numpy as np

from rlhf_jax.constitution import (OPTIONAL_PRINCIPLE_KEYS,  # noqa: F401 (re-exported)
                                   PRINCIPLE_KEYS, ConstitutionError, check_principle,
                                   load_constitution)


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


# ----------------------------------------------------------------------------
# rlhf-jax label
# ----------------------------------------------------------------------------

LABEL_USAGE = """rlhf-jax label --judge=rm:RM_WORKDIR|lm:MODEL|gold --out=DIR
                      (--policy=WORKDIR --prompts=FILE [--k=4] | --candidates=FILE [--prompts=FILE])
                      [--num_prompts=N] [--eval_prompts=N] [--max_pairs=1] [--tie_margin=0]
                      [--rubric=FILE] [--verdicts=A,B] [--seed=0] ..."""


def _judge_args(p: argparse.ArgumentParser) -> None:
  g = p.add_argument_group("judge")
  g.add_argument("--rubric", default="", help="LM judge: a text file (or a constitution "
                 ".json/.jsonl) with the judging instructions; default: a built-in rubric")
  g.add_argument("--verdicts", default="A,B", help="LM judge: the two answer labels whose "
                 "first tokens' log-probs give the verdict")
  g.add_argument("--judge_batch_size", type=int, default=16, help="rows per judge forward pass")
  g.add_argument("--judge_max_len", type=int, default=1024,
                 help="LM judge: longest judge prompt in tokens (longer: left-truncated)")
  g.add_argument("--judge_dtype", default="float32", choices=["float32", "bfloat16"])
  g.add_argument("--tie_margin", type=float, default=0.0,
                 help="|preference| below this is a tie (no pair)")
  g.add_argument("--margin_scale", type=float, default=1.0,
                 help="pairs.jsonl margin = this x the judge's preference strength")


def _make_judge(args):
  from rlhf_jax import judges
  verdicts = tuple(v.strip() for v in args.verdicts.split(","))
  return judges.make_judge(args.judge, rubric_path=args.rubric or None, verdicts=verdicts,
                           batch_size=args.judge_batch_size, max_len=args.judge_max_len,
                           dtype=args.judge_dtype)


def _user_errors():
  from rlhf_jax.checkpoint import CheckpointError
  from rlhf_jax.data.sft import DataError
  return (DataError, CheckpointError, FileNotFoundError, FileExistsError, ValueError)


def _run(main, argv) -> int:
  """main(argv) with user errors as one `error: ...` line (RLHF_JAX_DEBUG=1: traceback)."""
  try:
    return main(argv)
  except SystemExit as e:  # argparse: usage / error line already printed
    return int(e.code or 0)
  except _user_errors() as e:
    if os.environ.get("RLHF_JAX_DEBUG"):
      raise
    print(f"error: {e}", file=sys.stderr)
    return 1


def label_main(argv) -> int:
  """`rlhf-jax label ...` (see the module docstring); returns the exit code."""
  return _run(_label_main, list(argv))


def parse_label_args(argv):
  p = argparse.ArgumentParser(
      prog="rlhf-jax label", usage=LABEL_USAGE,
      description="AI feedback: a judge ranks >= 2 candidate completions per prompt; writes "
                  "preference pairs for the reward-model and DPO trainers.")
  p.add_argument("--judge", required=True, help="rm:RM_WORKDIR | lm:MODEL | gold")
  p.add_argument("--out", required=True, help="output directory")
  p.add_argument("--prompts", default="", help="JSONL {\"prompt\", \"answer\"?}")
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--policy", default="", help="run workdir (or HF dir / .gguf) to sample from")
  src.add_argument("--candidates", default="",
                   help="JSONL {\"prompt\", \"completions\": [...], \"answer\"?}")
  p.add_argument("--k", type=int, default=4, help="--policy: samples per prompt")
  p.add_argument("--temperature", type=float, default=1.0, help="--policy: sampling temperature")
  p.add_argument("--max_prompt_len", type=int, default=256, help="--policy: prompt tokens")
  p.add_argument("--max_new_tokens", type=int, default=128, help="--policy: completion tokens")
  p.add_argument("--sample_batch", type=int, default=128, help="--policy: rows per sampler call")
  p.add_argument("--num_prompts", type=int, default=0, help="prompts labelled into pairs.jsonl "
                 "(0 = all)")
  p.add_argument("--eval_prompts", type=int, default=0,
                 help="the next N prompts labelled into pairs_eval.jsonl")
  p.add_argument("--max_pairs", type=int, default=1, help="pairs per prompt")
  p.add_argument("--pairing", default="random", choices=["random", "best_vs_rest"],
                 help="max_pairs > 1: random (higher, lower) pairs of distinct texts (LM judge: "
                      "the most confident comparisons), or best_vs_rest: the judge's top text "
                      "over each of the others")
  p.add_argument("--reference_fallback", action="store_true",
                 help="rm/gold judges: when every candidate ties, pair the prompt's reference "
                      "'answer' (chosen) with a candidate that scores below 1")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--no_progress", action="store_true", help="no progress bars")
  _judge_args(p)
  args = p.parse_args(argv)
  for flag, v, lo in (("--k", args.k, 2), ("--max_pairs", args.max_pairs, 1),
                      ("--num_prompts", args.num_prompts, 0),
                      ("--eval_prompts", args.eval_prompts, 0),
                      ("--max_prompt_len", args.max_prompt_len, 1),
                      ("--max_new_tokens", args.max_new_tokens, 1),
                      ("--sample_batch", args.sample_batch, 1),
                      ("--judge_batch_size", args.judge_batch_size, 1)):
    if v < lo:
      p.error(f"{flag}={v}: must be >= {lo}")
  if args.tie_margin < 0:
    p.error(f"--tie_margin={args.tie_margin}: must be >= 0")
  if args.policy and not args.prompts:
    p.error("--policy needs --prompts (the prompts to sample candidates for)")
  return args


def run_label(args) -> tuple[dict, dict]:
  """The label pipeline for parsed arguments: ({split: {"pairs", "records", "stats"}}, stats)."""
  from rlhf_jax import labeling
  t0 = time.time()
  progress = not args.no_progress
  want = args.num_prompts + args.eval_prompts if args.num_prompts else 0
  if args.candidates:
    examples = read_candidates(args.candidates, want)
    if args.prompts:  # gold answers for the candidates' prompts
      answers = {_key(r["prompt"]): r["answer"] for r in read_prompts(args.prompts)}
      for ex in examples:
        ex["answer"] = ex["answer"] or answers.get(_key(ex["prompt"]), "")
  else:
    examples = read_prompts(args.prompts, want)
  n_train = args.num_prompts or max(len(examples) - args.eval_prompts, 0)
  if n_train < 1:
    raise ValueError(f"--eval_prompts={args.eval_prompts}: no prompts left for pairs.jsonl "
                     f"({len(examples)} prompts read)")
  judge = _make_judge(args)  # before sampling: a bad judge fails fast
  info = {}
  if args.candidates:
    candidates = [ex.pop("completions") for ex in examples]
  else:
    from rlhf_jax import tokenizer as tok_lib
    from rlhf_jax import workdir as workdir_lib
    if not os.path.exists(args.policy):
      raise FileNotFoundError(f"--policy: not found: {args.policy}")
    mcfg, params = workdir_lib.load_init(args.policy, "float32", False)
    tokenizer = tok_lib.load_tokenizer(args.policy)
    if args.max_prompt_len + args.max_new_tokens > mcfg.max_seq_len:
      raise ValueError(f"--max_prompt_len={args.max_prompt_len} + --max_new_tokens="
                       f"{args.max_new_tokens} exceeds the policy's context (max_seq_len="
                       f"{mcfg.max_seq_len})")
    candidates = labeling.sample_candidates(
        model_config=mcfg, params=params, tokenizer=tokenizer, examples=examples, k=args.k,
        max_prompt_len=args.max_prompt_len, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, seed=args.seed, micro_batch=args.sample_batch,
        progress=progress)
    info["samples_generated"] = len(examples) * args.k
  splits = [("train", slice(0, n_train))]
  if args.eval_prompts:
    splits.append(("eval", slice(n_train, n_train + args.eval_prompts)))
  result = label(examples, candidates, judge, splits=splits, seed=args.seed,
                 max_pairs=args.max_pairs, tie_margin=args.tie_margin,
                 reference_fallback=args.reference_fallback, margin_scale=args.margin_scale,
                 pairing=args.pairing, progress=progress)
  from rlhf_jax import judges
  stats = {"judge": judges.describe(judge), **{k: v["stats"] for k, v in result.items()},
           **info, "seconds": time.time() - t0}
  return result, stats


def _label_main(argv) -> int:
  from rlhf_jax.data.sft import write_jsonl_rows
  args = parse_label_args(argv)
  result, stats = run_label(args)
  os.makedirs(args.out, exist_ok=True)
  write_jsonl_rows(os.path.join(args.out, "pairs.jsonl"), result["train"]["pairs"])
  if "eval" in result:
    write_jsonl_rows(os.path.join(args.out, "pairs_eval.jsonl"), result["eval"]["pairs"])
  write_jsonl_rows(os.path.join(args.out, "records.jsonl"),
                   [{"split": name, **r} for name, v in result.items() for r in v["records"]])
  _write_json(os.path.join(args.out, "stats.json"), stats)
  for name, v in result.items():
    print(f"{name}: " + summary_line(v["stats"]))
  print(f"wrote {args.out}/pairs.jsonl" + (" + pairs_eval.jsonl" if "eval" in result else "")
        + ", records.jsonl, stats.json")
  return 0


def summary_line(s: dict) -> str:
  """One line of a split's label stats."""
  out = (f"{s['prompts']} prompts, {s['pairs']} pairs, {s['tied_prompts']} tied prompts, "
         f"{s['tied_comparisons']}/{s['comparisons']} comparisons tied")
  g = s.get("gold_agreement") or {}
  if g.get("agreement") is not None:
    out += f"; agreement with gold {g['agreement']:.3f} (n={g['decided']})"
  pg = s.get("pairs_gold_agreement") or {}
  if pg.get("agreement") is not None:
    out += f", pairs {pg['agreement']:.3f} (n={pg['decided']})"
  pos = s.get("position") or {}
  if pos.get("position_inconsistent_rate") is not None:
    out += (f"; position-inconsistent {pos['position_inconsistent_rate']:.3f}, first position "
            f"{pos['first_position_rate']:.3f}")
  return out


def _write_json(path: str, obj) -> None:
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2)
    f.write("\n")
  os.replace(tmp, path)


# ----------------------------------------------------------------------------
# rlhf-jax constitution
# ----------------------------------------------------------------------------

CONSTITUTION_USAGE = """rlhf-jax constitution --policy=WORKDIR --constitution=FILE --prompts=FILE --out=DIR
                             [--rounds=1] [--seed=0] [--num_prompts=N] [--max_new_tokens=64]
                             [--temperature=1.0] [--judge=rm:...|lm:...|gold] ..."""


def constitution_main(argv) -> int:
  """`rlhf-jax constitution ...` (see the module docstring); returns the exit code."""
  return _run(_constitution_main, list(argv))


def _constitution_args(argv):
  p = argparse.ArgumentParser(
      prog="rlhf-jax constitution", usage=CONSTITUTION_USAGE,
      description="Constitutional AI: the policy answers, critiques its answer against a "
                  "sampled principle and revises it; writes SFT data, preference pairs and "
                  "every intermediate text.")
  p.add_argument("--policy", required=True, help="run workdir (or HF dir / .gguf)")
  p.add_argument("--constitution", required=True, help="JSON list / JSONL of principles")
  p.add_argument("--prompts", required=True, help="JSONL {\"prompt\"}")
  p.add_argument("--out", required=True, help="output directory")
  p.add_argument("--rounds", type=int, default=1, help="critique / revision rounds")
  p.add_argument("--seed", type=int, default=0, help="principle choice and sampling")
  p.add_argument("--num_prompts", type=int, default=0, help="0 = all")
  p.add_argument("--max_new_tokens", type=int, default=64, help="per answer / critique / revision")
  p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
  p.add_argument("--max_prompt_len", type=int, default=1024,
                 help="longest policy prompt in tokens (longer: left-truncated)")
  p.add_argument("--batch_size", type=int, default=16, help="rows per sampler call")
  p.add_argument("--judge", default="", help="optional: rank the initial answer and the "
                 "revisions with rm:RM_WORKDIR | lm:MODEL | gold instead of revision > original")
  p.add_argument("--no_progress", action="store_true", help="no progress bars")
  _judge_args(p)
  args = p.parse_args(argv)
  for flag, v, lo in (("--rounds", args.rounds, 1), ("--num_prompts", args.num_prompts, 0),
                      ("--max_new_tokens", args.max_new_tokens, 1),
                      ("--max_prompt_len", args.max_prompt_len, 8),
                      ("--batch_size", args.batch_size, 1)):
    if v < lo:
      p.error(f"{flag}={v}: must be >= {lo}")
  return args


def _messages(prompt) -> list[dict]:
  return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def run_constitution(args) -> tuple[list[dict], list[dict], list[dict], dict]:
  """(records, sft rows, pairs, stats) of the constitution pipeline for parsed arguments."""
  from rlhf_jax import judges, labeling
  from rlhf_jax import tokenizer as tok_lib
  from rlhf_jax import workdir as workdir_lib
  t0 = time.time()
  progress = not args.no_progress
  principles = load_constitution(args.constitution)
  examples = read_prompts(args.prompts, args.num_prompts)
  judge = _make_judge(args) if args.judge else None
  if not os.path.exists(args.policy):
    raise FileNotFoundError(f"--policy: not found: {args.policy}")
  mcfg, params = workdir_lib.load_init(args.policy, "float32", False)
  tokenizer = tok_lib.load_tokenizer(args.policy)
  gen_stats = {"prompt_truncated": 0, "unfinished": 0, "generations": 0}

  def generate(conversations, stage: int, desc: str) -> list[str]:
    texts, s = labeling.generate_texts(
        model_config=mcfg, params=params, tokenizer=tokenizer, conversations=conversations,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        seed=args.seed * 1000 + stage, micro_batch=args.batch_size,
        max_prompt_len=args.max_prompt_len, desc=desc, progress=progress)
    gen_stats["prompt_truncated"] += s["prompt_truncated"]
    gen_stats["unfinished"] += s["unfinished"]
    gen_stats["generations"] += s["prompts"]
    return texts

  base = [_messages(ex["prompt"]) for ex in examples]
  current = generate(base, 0, "answers")
  records = [{"prompt": ex["prompt"], "initial_response": y, "rounds": []}
             for ex, y in zip(examples, current)]
  rng = np.random.default_rng(args.seed)
  for r in range(1, args.rounds + 1):
    chosen = [principles[int(i)] for i in rng.integers(len(principles), size=len(examples))]
    crit_conv = [m + [{"role": "assistant", "content": y},
                      {"role": "user", "content": p["critique"]}]
                 for m, y, p in zip(base, current, chosen)]
    critiques = generate(crit_conv, 2 * r - 1, f"round {r}/{args.rounds}: critiques")
    rev_conv = [c + [{"role": "assistant", "content": k},
                     {"role": "user", "content": p["revision"]}]
                for c, k, p in zip(crit_conv, critiques, chosen)]
    revisions = generate(rev_conv, 2 * r, f"round {r}/{args.rounds}: revisions")
    for rec, y, p, k, v in zip(records, current, chosen, critiques, revisions):
      rec["rounds"].append({"round": r, "principle": p["name"], "response": y,
                            "critique_request": p["critique"], "critique": k,
                            "revision_request": p["revision"], "revision": v})
    current = revisions
  sft_rows, pairs = [], []
  for rec, y in zip(records, current):
    rec["final_response"] = y
    prompt = rec["prompt"]
    sft_rows.append({"prompt": prompt, "completion": y} if isinstance(prompt, str)
                    else {"messages": list(prompt) + [{"role": "assistant", "content": y}]})
  unchanged = 0
  stats = {"prompts": len(examples), "rounds": args.rounds,
           "principles": {p["name"]: sum(rd["principle"] == p["name"] for rec in records
                                         for rd in rec["rounds"]) for p in principles}}
  if judge is None:
    for rec in records:
      if rec["final_response"] == rec["initial_response"]:
        unchanged += 1
        continue
      pairs.append({"prompt": rec["prompt"], "chosen": rec["final_response"],
                    "rejected": rec["initial_response"]})
    stats.update(pairs=len(pairs), unchanged=unchanged, pairs_rule="final revision > initial")
  else:
    texts = [[rec["initial_response"]] + [rd["revision"] for rd in rec["rounds"]]
             for rec in records]
    res = label(examples, texts, judge, seed=args.seed, tie_margin=args.tie_margin,
                margin_scale=args.margin_scale, progress=progress)["train"]
    pairs = res["pairs"]
    for rec, jr in zip(records, res["records"]):
      rec["judge"] = {k: v for k, v in jr.items() if k not in ("prompt", "answer")}
    stats.update(pairs=len(pairs), pairs_rule=f"ranked by {judge.spec}",
                 judge=judges.describe(judge), judge_stats=res["stats"])
  stats.update(gen_stats, seconds=time.time() - t0)
  return records, sft_rows, pairs, stats


def _constitution_main(argv) -> int:
  from rlhf_jax.data.sft import write_jsonl_rows
  args = _constitution_args(argv)
  records, sft_rows, pairs, stats = run_constitution(args)
  os.makedirs(args.out, exist_ok=True)
  write_jsonl_rows(os.path.join(args.out, "records.jsonl"), records)
  write_jsonl_rows(os.path.join(args.out, "sft.jsonl"), sft_rows)
  write_jsonl_rows(os.path.join(args.out, "pairs.jsonl"), pairs)
  _write_json(os.path.join(args.out, "stats.json"), stats)
  print(f"{stats['prompts']} prompts x {stats['rounds']} rounds: {len(sft_rows)} SFT rows, "
        f"{len(pairs)} pairs ({stats['pairs_rule']})")
  print(f"wrote {args.out}/records.jsonl, sft.jsonl, pairs.jsonl, stats.json")
  return 0
