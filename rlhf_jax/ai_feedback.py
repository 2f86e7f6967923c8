"""AI feedback: preference labels from a judge (`rlhf-jax label`). Constitutional AI data
(`rlhf-jax constitution`) is in rlhf_jax.ai_feedback_constitution.

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

  Agreement with gold: see rlhf_jax.ai_feedback_labels.
"""
from __future__ import annotations

import argparse
import os
import time

from rlhf_jax.ai_feedback_cli import _judge_args, _make_judge, _run, _write_json
from rlhf_jax.ai_feedback_labels import _key, label, read_candidates, read_prompts


LABEL_USAGE = """rlhf-jax label --judge=rm:RM_WORKDIR|lm:MODEL|gold --out=DIR
                      (--policy=WORKDIR --prompts=FILE [--k=4] | --candidates=FILE [--prompts=FILE])
                      [--num_prompts=N] [--eval_prompts=N] [--max_pairs=1] [--tie_margin=0]
                      [--rubric=FILE] [--verdicts=A,B] [--seed=0] ..."""


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
