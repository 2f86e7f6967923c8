"""Preference pairs from a policy's own samples, labelled by a judge.

    for each prompt x:  y_1..y_k ~ pi(.|x)          (`sample_candidates`)
                        s_i = judge(x, y_i)          (any reward function, e.g. the gold
                                                      verifiable reward, or a reward model)
                        chosen = a best-scored y, rejected = a worst-scored y
                                                     (`pairs_from_scores`)

On-policy pairs like these are how the DPO paper (Rafailov et al. 2023, sec. 6)
and RLHF pipelines (Ouyang et al. 2022) build preference data from an SFT model;
with a gold judge they give a *proxy* reward model whose errors can be measured
(Gao et al. 2022). Prompts whose k samples all score the same give no pair,
unless `reference_fallback` is set and a reference answer exists: then the
reference is chosen over the worst sample when that sample scores below
`reference_score` (the score a correct answer gets).
"""
from __future__ import annotations

import numpy as np

from rlhf_jax import rollout


def sample_candidates(*, model_config, params, tokenizer, examples, k: int,
                      max_prompt_len: int, max_new_tokens: int, temperature: float = 1.0,
                      seed: int = 0, micro_batch: int = 128, progress: bool = True
                      ) -> list[list[str]]:
  """k sampled completions (texts) for every example {"prompt": str | messages}."""
  import types

  import jax
  import tqdm

  from rlhf_jax.data import prompts as prompt_data
  n = len(examples)
  rows_per_call = max(1, micro_batch // k)
  cfg = types.SimpleNamespace(temperature=temperature, top_k=0, top_p=1.0,
                              max_new_tokens=max_new_tokens,
                              generate_micro_batch=rows_per_call * k,
                              logprob_micro_batch=rows_per_call * k)
  out: list[list[str]] = []
  key = jax.random.PRNGKey(seed)
  no_reward = lambda prompts, texts, meta: (np.zeros(len(texts), np.float32), {})
  for i in tqdm.trange(0, n, rows_per_call, desc="sampling", unit="batch", disable=not progress):
    chunk = list(examples[i:i + rows_per_call])
    real = len(chunk)
    chunk += [chunk[-1]] * (rows_per_call - real)  # fixed shapes: one compilation
    tokens, mask = prompt_data.tokenize_prompts(chunk, tokenizer, max_prompt_len)
    ro = rollout.generate_rollout(
        model_config=model_config, params=params, ref_params=None, prompt_tokens_NP=tokens,
        prompt_mask_NP=mask, group_size=k, rng=jax.random.fold_in(key, i), rollout_cfg=cfg,
        tokenizer=tokenizer, reward_fn=no_reward, metadata={}, need_ref=False,
        logps_fn=_cached_logps(model_config, tokens.shape[1], temperature))
    out += [ro.texts[j * k:(j + 1) * k] for j in range(real)]
  return out


_LOGPS = {}


def _cached_logps(model_config, prompt_len, temperature):
  key = (model_config, prompt_len, temperature)
  if key not in _LOGPS:
    _LOGPS[key] = rollout.completion_logps_fn(model_config, prompt_len, temperature)
  return _LOGPS[key]


def pairs_from_scores(examples, candidates, scores, *, seed: int = 0, max_pairs: int = 1,
                      reference_fallback: bool = False, reference_key: str = "answer",
                      reference_score: float = 1.0) -> tuple[list[dict], dict]:
  """(pairs [{"prompt", "chosen", "rejected", "chosen_score", "rejected_score"}], stats).

  Per example, duplicate candidate texts are merged; max_pairs=1: chosen = a random
  best-scored text, rejected = a random worst-scored one; max_pairs > 1: up to that
  many distinct (higher, lower)-scored text pairs, drawn at random. No pair when all
  scores tie (see the module docstring for `reference_fallback`). stats: prompts,
  pairs, tied prompts, reference-fallback pairs, mean candidate score.
  """
  rng = np.random.default_rng(seed)
  pairs, tied, fallback = [], 0, 0

  def add(prompt, c, r):
    pairs.append({"prompt": prompt, "chosen": c[0], "rejected": r[0],
                  "chosen_score": c[1], "rejected_score": r[1]})

  for ex, cands, s in zip(examples, candidates, scores):
    best_of = {}
    for text, score in zip(cands, np.asarray(s, np.float64)):
      best_of[text] = max(float(score), best_of.get(text, -np.inf))
    items = list(best_of.items())
    hi, lo = max(v for _, v in items), min(v for _, v in items)
    if hi > lo:
      if max_pairs == 1:
        top = [it for it in items if it[1] == hi]
        bottom = [it for it in items if it[1] == lo]
        add(ex["prompt"], top[rng.integers(len(top))], bottom[rng.integers(len(bottom))])
      else:
        combos = [(a, b) for a in items for b in items if a[1] > b[1]]
        for i in rng.permutation(len(combos))[:max_pairs]:
          add(ex["prompt"], *combos[i])
      continue
    tied += 1
    ref = ex.get(reference_key)
    if reference_fallback and ref and lo < reference_score and str(ref) not in best_of:
      fallback += 1
      add(ex["prompt"], (str(ref), float(reference_score)), items[rng.integers(len(items))])
  mean = float(np.mean([np.mean(s) for s in scores])) if len(scores) else float("nan")
  return pairs, {"prompts": len(examples), "pairs": len(pairs), "tied_prompts": tied,
                 "reference_pairs": fallback, "mean_candidate_score": mean}
