"""`rlhf-jax constitution` (supervised stage of Constitutional AI, Bai et al. 2022, sec. 3)

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
import os
import time

import numpy as np

from rlhf_jax.ai_feedback_cli import _judge_args, _make_judge, _run, _write_json
from rlhf_jax.ai_feedback_labels import label, read_prompts
from rlhf_jax.constitution import load_constitution


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
