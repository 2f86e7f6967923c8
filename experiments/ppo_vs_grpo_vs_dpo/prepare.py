"""Stage 1 of the flagship study: write the task's data files into OUT.

Task: 2-digit addition, "add: 47+15" -> "62", with a verifiable gold reward
(the final number equals a + b).

  pretrain.jsonl        LM pre-training corpus (loss on every token): addition
                        rows whose answers are wrong with probability `noise`
                        (off by 1..3, the kind of errors web text has), mixed
                        with the *capability* skill (reverse a string).
  sft.jsonl             clean addition demonstrations for SFT.
  prompts_train.jsonl   {"prompt", "answer"} RL / preference prompts.
  prompts_eval.jsonl    held-out prompts (no (a, b) pair of the training prompts).
  capability_eval.jsonl held-out reverse-a-string rows: the skill nobody optimises,
                        whose change after RL / DPO is the alignment tax.

    python experiments/ppo_vs_grpo_vs_dpo/prepare.py --out DIR [--seed 0]
"""
import argparse
import os

import numpy as np

from rlhf_jax.data.synthetic import make_example
from rlhf_jax.data.sft import write_jsonl_rows




def addition(rng, digits):
  a, b = (int(x) for x in rng.integers(0, 10 ** digits, size=2))
  return a, b


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", required=True)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--digits", type=int, default=2)
  ap.add_argument("--noise", type=float, default=0.15, help="wrong-answer rate in pretraining")
  ap.add_argument("--pretrain_rows", type=int, default=8000)
  ap.add_argument("--capability_frac", type=float, default=0.25,
                  help="share of capability (reverse) rows in pretraining and SFT")
  ap.add_argument("--sft_rows", type=int, default=2000)
  ap.add_argument("--train_prompts", type=int, default=4000)
  ap.add_argument("--eval_prompts", type=int, default=256)
  ap.add_argument("--capability_rows", type=int, default=128)
  args = ap.parse_args()
  os.makedirs(args.out, exist_ok=True)
  rng = np.random.default_rng(args.seed)

  # Held-out (a, b) pairs first, so that no training row contains them -- unless the
  # task is too small for that (1 digit: 100 problems), then eval = every problem.
  n_problems = 10 ** (2 * args.digits)
  if args.eval_prompts >= n_problems // 2:
    held = [(a, b) for a in range(10 ** args.digits) for b in range(10 ** args.digits)]
    held_set = set()
  else:
    held = set()
    while len(held) < args.eval_prompts:
      held.add(addition(rng, args.digits))
    held = sorted(held, key=lambda _: rng.random())
    held_set = set(held)

  def fresh():
    while True:
      ab = addition(rng, args.digits)
      if ab not in held_set:
        return ab

  pre = []
  for _ in range(args.pretrain_rows):
    if rng.random() >= args.capability_frac:
      a, b = fresh()
      c = a + b
      if rng.random() < args.noise:
        c = max(0, c + int(rng.choice([-1, 1])) * int(rng.integers(1, 4)))
      pre.append({"prompt": f"add: {a}+{b}", "completion": str(c)})
    else:
      pre.append(make_example("reverse", rng, 3, 8))
  write_jsonl_rows(os.path.join(args.out, "pretrain.jsonl"), pre)
  sft = []
  for _ in range(args.sft_rows):
    a, b = fresh()
    sft.append({"prompt": f"add: {a}+{b}", "completion": str(a + b)})
  write_jsonl_rows(os.path.join(args.out, "sft.jsonl"), sft)
  train = []
  for _ in range(args.train_prompts):
    a, b = fresh()
    train.append({"prompt": f"add: {a}+{b}", "answer": str(a + b)})
  write_jsonl_rows(os.path.join(args.out, "prompts_train.jsonl"), train)
  write_jsonl_rows(os.path.join(args.out, "prompts_eval.jsonl"),
        [{"prompt": f"add: {a}+{b}", "answer": str(a + b)} for a, b in held])
  cap_rng = np.random.default_rng(args.seed + 1)
  write_jsonl_rows(os.path.join(args.out, "capability_eval.jsonl"),
        [make_example("reverse", cap_rng, 3, 8) for _ in range(args.capability_rows)])
  print(f"wrote {len(pre)} pretraining rows, {len(sft)} SFT rows, {len(train)} + "
        f"{len(held)} prompts, {args.capability_rows} capability rows to {args.out}")


if __name__ == "__main__":
  main()
