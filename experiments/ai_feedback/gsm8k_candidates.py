"""Candidates for an LM-judge check on real data: GSM8K questions, each with its reference
solution and a corrupted copy whose final answer is wrong.

    python experiments/ai_feedback/gsm8k_candidates.py --gsm8k=../shared/data/gsm8k_test.jsonl \
        --out=runs/gsm8k_candidates.jsonl [--n=32 --seed=0]

Each row: {"prompt": question, "answer": gold number, "completions": [correct, wrong]} in
random order, where `wrong` is the reference solution with every occurrence of the final
number (in the last line and after '####') replaced by a nearby wrong one. A judge that
checks the arithmetic prefers the correct one; `rlhf-jax label` reports how often it does
(agreement with gold) and how often its verdict depends on the order (position bias).
"""
import argparse
import json
import re

import numpy as np


def clean(solution: str) -> str:
  """GSM8K solution without calculator annotations <<48/2=24>>."""
  return re.sub(r"<<[^>]*>>", "", solution).strip()


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--gsm8k", required=True, help="GSM8K JSONL {question, answer}")
  ap.add_argument("--out", required=True)
  ap.add_argument("--n", type=int, default=32)
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args()
  rng = np.random.default_rng(args.seed)
  rows = []
  with open(args.gsm8k) as f:
    for line in f:
      ex = json.loads(line)
      sol = clean(ex["answer"])
      gold = sol.rpartition("####")[2].strip().replace(",", "")
      if not gold.lstrip("-").isdigit() or len(sol) > 400:
        continue  # short, integer-answer problems only (tiny contexts, exact gold)
      wrong_n = str(int(gold) + int(rng.choice([-3, -2, -1, 1, 2, 3, 10])))
      body, _, _ = sol.rpartition("####")
      lines = body.strip().split("\n")
      lines[-1] = re.sub(rf"(?<!\d){re.escape(gold)}(?!\d)", wrong_n, lines[-1])
      wrong = "\n".join(lines) + f"\n#### {wrong_n}"
      pair = [sol, wrong] if rng.random() < 0.5 else [wrong, sol]
      rows.append({"prompt": ex["question"], "answer": gold, "completions": pair})
      if len(rows) >= args.n:
        break
  with open(args.out, "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
  print(f"wrote {len(rows)} candidate pairs to {args.out}")


if __name__ == "__main__":
  main()
