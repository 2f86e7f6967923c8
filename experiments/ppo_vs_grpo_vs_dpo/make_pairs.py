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
"""
import argparse
import json
import os
import time

from rlhf_jax import evaluation, labeling
from rlhf_jax import tokenizer as tok_lib
from rlhf_jax.rewards.math import MathReward
from rlhf_jax.trainers import common
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
  t0 = time.time()
  mcfg, params = common.load_init(args.policy, "float32", False)
  tokenizer = tok_lib.load_tokenizer(args.policy)
  examples = evaluation.read_prompt_rows(args.prompts, args.num_prompts + args.eval_prompts)
  cands = labeling.sample_candidates(
      model_config=mcfg, params=params, tokenizer=tokenizer, examples=examples, k=args.k,
      max_prompt_len=args.max_prompt_len, max_new_tokens=args.max_new_tokens, seed=args.seed)
  gold = MathReward()
  scores = [gold([ex["prompt"]] * args.k, c, {"answer": [ex["answer"]] * args.k})
            for ex, c in zip(examples, cands)]
  stats = {}
  for split, sl in (("train", slice(0, args.num_prompts)),
                    ("eval", slice(args.num_prompts, None))):
    pairs, s = labeling.pairs_from_scores(examples[sl], cands[sl], scores[sl], seed=args.seed,
                                          max_pairs=args.max_pairs, reference_fallback=True)
    write_jsonl_rows(os.path.join(args.out, f"pairs_{split}.jsonl"),
                [{"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]}
                 for p in pairs])
    stats[split] = s
  stats["samples_generated"] = len(examples) * args.k
  stats["seconds"] = time.time() - t0
  with open(os.path.join(args.out, "stats.json"), "w") as f:
    json.dump(stats, f, indent=2)
  print(json.dumps(stats))


if __name__ == "__main__":
  main()
