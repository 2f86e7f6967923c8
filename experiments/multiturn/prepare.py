"""Data of experiments/multiturn: write into OUT

  calc_sft.jsonl         SFT rows for "calc: 47*15+38" (two operations on 2-digit operands,
                         `data.synthetic.make_verifiable_example("calc_chain")`): a share
                         `--tool_frac` are tool-use transcripts played through the
                         calculator env (`envs.transcripts.make_transcript`: call the
                         calculator, then answer its result), the others answer directly
                         (the right number, which the tiny model cannot compute: it
                         learns the format, not the arithmetic). The SFT policy then calls
                         the tool about tool_frac of the time, the start GRPO improves on.
  calc_prompts_train.jsonl / calc_prompts_eval.jsonl
                         {"prompt", "answer"} RL prompts of the same task; no eval prompt
                         is among the SFT or RL training prompts.
  guess_sft.jsonl        SFT games of guess_number (1-8, at most 4 guesses), played through
                         the env (`envs.transcripts.play`): a share `--ignore_frac` by a
                         player that ignores the feedback (it repeats its first guess:
                         solves 1/8 of the games), the others by the player of
                         `envs.transcripts` (uniform in the range still possible: 83%).
                         The SFT policy mixes both; following the feedback is what RL can
                         learn.
  guess_prompts_train.jsonl  "guess 1-8" with secrets drawn uniformly (the RL prompts of
                         the guess arm; `--guess_digits` 1: 1-8)
  guess_prompts_eval.jsonl   every secret once: greedy episodes are deterministic, so the
                         greedy success rate is the share of secrets the policy finds

    python experiments/multiturn/prepare.py --out DIR [--seed 0] [--tool_frac 0.3]
"""
import argparse
import os

import numpy as np

from rlhf_jax.data.sft import write_jsonl_rows
from rlhf_jax.data.synthetic import guess_number_hi, make_verifiable_example
from rlhf_jax.envs.guess_number import GuessNumberEnv
from rlhf_jax.envs.transcripts import _guess_turns, make_transcript, play


def _turns_needed(turns, answer) -> int:
  """The scripted turns up to the one that finds the secret (all when none does)."""
  return next((i + 1 for i, t in enumerate(turns) if t == str(answer)), len(turns))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", required=True)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--digits", type=int, default=2)
  ap.add_argument("--tool_frac", type=float, default=0.3)
  ap.add_argument("--sft_rows", type=int, default=4000)
  ap.add_argument("--train_prompts", type=int, default=4000)
  ap.add_argument("--eval_prompts", type=int, default=128)
  ap.add_argument("--guess_digits", type=int, default=1)
  ap.add_argument("--ignore_frac", type=float, default=0.5)
  args = ap.parse_args()
  os.makedirs(args.out, exist_ok=True)
  rng = np.random.default_rng(args.seed)
  held, evals = set(), []
  while len(evals) < args.eval_prompts:
    ex = make_verifiable_example("calc_chain", rng, args.digits)
    if ex["prompt"] not in held:
      held.add(ex["prompt"])
      evals.append({"prompt": ex["prompt"], "answer": ex["answer"]})
  sft, tools = [], 0
  while len(sft) < args.sft_rows:
    row = make_transcript("calc_chain", rng, args.digits)
    prompt = row["messages"][0]
    if prompt["content"] in held:
      continue
    if rng.random() < args.tool_frac:
      tools += 1
      sft.append({"messages": row["messages"]})
    else:  # a direct answer: the single-turn rule (the last message learned)
      sft.append({"messages": [prompt, {"role": "assistant", "content": row["answer"]}]})
  train = []
  while len(train) < args.train_prompts:
    ex = make_verifiable_example("calc_chain", rng, args.digits)
    if ex["prompt"] not in held:
      train.append({"prompt": ex["prompt"], "answer": ex["answer"]})
  write_jsonl_rows(os.path.join(args.out, "calc_sft.jsonl"), sft)
  write_jsonl_rows(os.path.join(args.out, "calc_prompts_train.jsonl"), train)
  write_jsonl_rows(os.path.join(args.out, "calc_prompts_eval.jsonl"), evals)
  guess = [make_verifiable_example("guess_number", rng, args.guess_digits)
           for _ in range(args.train_prompts)]
  write_jsonl_rows(os.path.join(args.out, "guess_prompts_train.jsonl"),
                   [{"prompt": g["prompt"], "answer": g["answer"]} for g in guess])
  hi = guess_number_hi(args.guess_digits)
  games, ignoring = [], 0
  for _ in range(args.sft_rows):
    row = make_verifiable_example("guess_number", rng, args.guess_digits)
    env = GuessNumberEnv(hi=hi, max_guesses=4)
    if rng.random() < args.ignore_frac:  # ignores higher / lower: repeats its first guess
      ignoring += 1
      turns = [str(int(rng.integers(1, hi + 1)))] * 4
    else:
      turns = _guess_turns(row, rng, 4)
    messages, _, _ = play(env, row, 0, turns[:_turns_needed(turns, row["answer"])])
    games.append({"messages": [dict(m, weight=1) if m["role"] == "assistant" else m
                               for m in messages]})
  write_jsonl_rows(os.path.join(args.out, "guess_sft.jsonl"), games)
  print(f"guess_sft.jsonl: {len(games)} games ({ignoring} by the player ignoring feedback)")
  write_jsonl_rows(os.path.join(args.out, "guess_prompts_eval.jsonl"),
                   [{"prompt": f"guess 1-{hi}", "answer": str(s)} for s in range(1, hi + 1)])
  print(f"calc_sft.jsonl: {len(sft)} rows ({tools} tool-use transcripts); "
        f"{len(train)} train / {len(evals)} eval prompts")


if __name__ == "__main__":
  main()
