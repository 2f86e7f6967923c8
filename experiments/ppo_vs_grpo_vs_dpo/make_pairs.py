"""Stage 3 of the flagship study: on-policy preference pairs labelled by the gold reward.

Samples k completions per training prompt from the SFT policy (T = 1), scores
them with the verifiable gold reward (`math`: final number == answer) and keeps
up to --max_pairs (correct, incorrect) pairs of distinct texts per prompt (`rlhf_jax.labeling`); prompts whose
k samples are all wrong pair the reference answer with a wrong sample, all-correct
prompts give no pair. These pairs train the *proxy* reward model and DPO.

    python experiments/ppo_vs_grpo_vs_dpo/make_pairs.py --policy SFT_WORKDIR \
        --prompts DATA/prompts_train.jsonl --out OUT [--k 4 --num_prompts 1024]

Writes OUT/pairs_train.jsonl, OUT/pairs_eval.jsonl (pairs of the next
`--eval_prompts` prompts, for the RM's held-out accuracy) and OUT/stats.json.

A thin wrapper of `rlhf-jax label --judge=gold --reference_fallback` (rlhf_jax/ai_feedback.py),
which also writes every candidate and the agreement statistics; this script keeps the
study's file names and its margin-free pairs.
"""
import argparse
import json
import os

from rlhf_jax import ai_feedback
from rlhf_jax.data.sft import write_jsonl_rows


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--policy", required=True, help="SFT run workdir")
  ap.add_argument("--prompts", required=True, help="JSONL {prompt, answer}")
  ap.add_argument("--out", required=True)
  ap.add_argument("--k", type=int, default=4, help="samples per prompt")
  ap.add_argument("--max_pairs", type=int, default=1, help="pairs per prompt (distinct texts)")
  ap.add_argument("--num_prompts", type=int, default=1024)
  ap.add_argument("--eval_prompts", type=int, default=256)
  ap.add_argument("--max_prompt_len", type=int, default=16)
  ap.add_argument("--max_new_tokens", type=int, default=4)
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args()
  os.makedirs(args.out, exist_ok=True)
  label_args = ai_feedback.parse_label_args([
      "--judge=gold", "--reference_fallback", f"--policy={args.policy}",
      f"--prompts={args.prompts}", f"--out={args.out}", f"--k={args.k}",
      f"--max_pairs={args.max_pairs}", f"--num_prompts={args.num_prompts}",
      f"--eval_prompts={args.eval_prompts}", f"--max_prompt_len={args.max_prompt_len}",
      f"--max_new_tokens={args.max_new_tokens}", f"--seed={args.seed}"])
  result, label_stats = ai_feedback.run_label(label_args)
  stats = {}
  for split, name in (("train", "train"), ("eval", "eval")):
    part = result.get(split, {"pairs": [], "stats": {}})
    write_jsonl_rows(os.path.join(args.out, f"pairs_{name}.jsonl"),
                     [{"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]}
                      for p in part["pairs"]])
    stats[name] = part["stats"]
  stats["samples_generated"] = label_stats.get("samples_generated", 0)
  stats["seconds"] = label_stats["seconds"]
  with open(os.path.join(args.out, "stats.json"), "w") as f:
    json.dump(stats, f, indent=2)
  print(json.dumps({k: stats[k] for k in ("samples_generated", "seconds")}
                   | {s: {k: stats[s].get(k) for k in ("prompts", "pairs", "tied_prompts",
                                                        "reference_pairs")} for s in
                      ("train", "eval")}))


if __name__ == "__main__":
  main()
