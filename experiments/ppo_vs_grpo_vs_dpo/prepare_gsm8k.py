"""Stage 1 of the flagship study's `smollm2` preset: GSM8K (+ Austen as the capability set).

  sft.jsonl             GSM8K train solutions (calculator annotations stripped) as
                        {"messages": [question, worked solution ending "#### n"]}
  prompts_train.jsonl   {"prompt", "answer"} the remaining training questions (RL, pairs)
  prompts_eval.jsonl    GSM8K test questions
  capability_eval.jsonl held-out LM text: Austen passages split into a prompt (first half)
                        and a completion (second half) -- language modelling that no arm
                        optimises (the alignment tax)

    python experiments/ppo_vs_grpo_vs_dpo/prepare_gsm8k.py --data_dir ../shared/data --out DIR
"""
import argparse
import json
import os

import numpy as np

from rlhf_jax.data.prompts import parse_gsm8k_row, strip_calculator_annotations
from rlhf_jax.data.sft import write_jsonl_rows


def rows(path):
  with open(path) as f:
    for i, line in enumerate(f, start=1):
      if line.strip():
        yield parse_gsm8k_row(f"{path}:{i}", json.loads(line))




def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--data_dir", default=os.environ.get("RLHF_JAX_DATA", "../shared/data"))
  ap.add_argument("--out", required=True)
  ap.add_argument("--sft_rows", type=int, default=3000)
  ap.add_argument("--capability_rows", type=int, default=256)
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args()
  os.makedirs(args.out, exist_ok=True)
  train = list(rows(os.path.join(args.data_dir, "gsm8k_train.jsonl")))
  test = list(rows(os.path.join(args.data_dir, "gsm8k_test.jsonl")))
  rng = np.random.default_rng(args.seed)
  order = rng.permutation(len(train))
  sft = [train[i] for i in order[:args.sft_rows]]
  rl = [train[i] for i in order[args.sft_rows:]]
  write_jsonl_rows(os.path.join(args.out, "sft.jsonl"),
        [{"messages": r["prompt"] + [{"role": "assistant", "content": strip_calculator_annotations(
            r["solution"]) + f"\n#### {r['answer']}"}]} for r in sft])
  write_jsonl_rows(os.path.join(args.out, "prompts_train.jsonl"),
        [{"prompt": r["prompt"], "answer": r["answer"]} for r in rl])
  write_jsonl_rows(os.path.join(args.out, "prompts_eval.jsonl"),
        [{"prompt": r["prompt"], "answer": r["answer"]} for r in test])
  with open(os.path.join(args.data_dir, "austen.txt")) as f:
    paras = [p.replace("\n", " ").strip() for p in f.read().split("\n\n")]
  paras = [p for p in paras if 200 <= len(p) <= 600]
  pick = rng.choice(len(paras), size=min(args.capability_rows, len(paras)), replace=False)
  cap = []
  for i in pick:
    words = paras[i].split()
    h = len(words) // 2
    cap.append({"prompt": "Continue the passage: " + " ".join(words[:h]),
                "completion": " ".join(words[h:])})
  write_jsonl_rows(os.path.join(args.out, "capability_eval.jsonl"), cap)
  print(f"wrote {len(sft)} SFT rows, {len(rl)} + {len(test)} prompts, {len(cap)} capability "
        f"rows to {args.out}")


if __name__ == "__main__":
  main()
