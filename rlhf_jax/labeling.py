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


PAIRINGS = ("random", "best_vs_rest")


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
                      reference_score: float = 1.0, tie_margin: float = 0.0,
                      pairing: str = "random") -> tuple[list[dict], dict]:
  """(pairs [{"prompt", "chosen", "rejected", "chosen_score", "rejected_score", "example"}],
  stats); "example" = the index of the example the pair comes from.

  Per example, duplicate candidate texts are merged; max_pairs=1: chosen = a random
  best-scored text, rejected = a random worst-scored one; max_pairs > 1: up to that
  many distinct (higher, lower)-scored text pairs, drawn at random (pairing="random"),
  or (pairing="best_vs_rest") chosen = a random best-scored text every time, rejected =
  the other texts, lowest-scored first: only the judge's top choice is ever preferred,
  the comparison an imperfect judge gets right most often. Two texts whose scores
  differ by less than `tie_margin` (or not at all) tie and are never paired; no pair
  when all scores tie (see the module docstring for `reference_fallback`).
  stats: prompts, pairs, tied prompts, reference-fallback pairs, mean candidate score.
  """
  if pairing not in PAIRINGS:
    raise ValueError(f"pairing={pairing!r}: expected one of {PAIRINGS}")
  rng = np.random.default_rng(seed)
  pairs, tied, fallback = [], 0, 0

  def add(prompt, c, r):
    pairs.append({"prompt": prompt, "chosen": c[0], "rejected": r[0],
                  "chosen_score": c[1], "rejected_score": r[1], "example": index})

  for index, (ex, cands, s) in enumerate(zip(examples, candidates, scores)):
    best_of = {}
    for text, score in zip(cands, np.asarray(s, np.float64)):
      best_of[text] = max(float(score), best_of.get(text, -np.inf))
    items = list(best_of.items())
    hi, lo = max(v for _, v in items), min(v for _, v in items)
    if hi > lo and hi - lo >= tie_margin:
      if max_pairs == 1:
        top = [it for it in items if it[1] == hi]
        bottom = [it for it in items if it[1] == lo]
        add(ex["prompt"], top[rng.integers(len(top))], bottom[rng.integers(len(bottom))])
      elif pairing == "best_vs_rest":
        top = [it for it in items if it[1] == hi]
        best = top[rng.integers(len(top))]
        rest = [it for it in items if hi - it[1] >= tie_margin and it[1] < hi]
        shuffle = rng.random(len(rest))
        for i in sorted(range(len(rest)), key=lambda i: (rest[i][1], shuffle[i]))[:max_pairs]:
          add(ex["prompt"], best, rest[i])
      else:
        combos = [(a, b) for a in items for b in items
                  if a[1] > b[1] and a[1] - b[1] >= tie_margin]
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


def is_tie(preference: float, tie_margin: float) -> bool:
  """A judge's preference (> 0: the first answer is better) is a tie when it is 0 or its
  magnitude is below `tie_margin`."""
  return preference == 0 or abs(preference) < tie_margin


def pairs_from_comparisons(prompt, comparisons, *, max_pairs: int = 1, tie_margin: float = 0.0,
                           rng: np.random.Generator | None = None,
                           pairing: str = "random") -> list[dict]:
  """Preference pairs from a pairwise judge's comparisons of one prompt's candidates.

  comparisons: [{"a": text, "b": text, "preference": float}] (> 0: a is better). Tied
  comparisons (`is_tie`) give no pair; the others are ranked by confidence |preference|
  (equal ones in random order) and the `max_pairs` most confident become
  {"prompt", "chosen", "rejected", "preference"} (preference = |preference|).
  pairing="best_vs_rest" keeps only the comparisons won by the best text (the most
  non-tied comparisons won, a Copeland rank; ties broken by the mean preference).
  """
  if pairing not in PAIRINGS:
    raise ValueError(f"pairing={pairing!r}: expected one of {PAIRINGS}")
  rng = rng if rng is not None else np.random.default_rng(0)
  decided = [c for c in comparisons if not is_tie(float(c["preference"]), tie_margin)]
  if pairing == "best_vs_rest" and decided:
    prefs: dict[str, list[float]] = {}
    for c in comparisons:
      prefs.setdefault(c["a"], []).append(float(c["preference"]))
      prefs.setdefault(c["b"], []).append(-float(c["preference"]))
    won = {t: sum(not is_tie(v, tie_margin) and v > 0 for v in vs) for t, vs in prefs.items()}
    best = max(prefs, key=lambda t: (won[t], float(np.mean(prefs[t]))))
    decided = [c for c in decided if (c["a"] == best and c["preference"] > 0)
               or (c["b"] == best and c["preference"] < 0)]
  shuffle = rng.random(len(decided))  # breaks ties in confidence at random
  order = sorted(range(len(decided)),
                 key=lambda i: (-abs(float(decided[i]["preference"])), shuffle[i]))
  out = []
  for i in order[:max_pairs]:
    c = decided[i]
    win, lose = (c["a"], c["b"]) if c["preference"] > 0 else (c["b"], c["a"])
    out.append({"prompt": prompt, "chosen": win, "rejected": lose,
                "preference": abs(float(c["preference"]))})
  return out


def gold_agreement(preferences, gold_a, gold_b, tie_margin: float = 0.0) -> dict:
  """How often a judge's pairwise preferences agree with gold scores.

  preferences[i] > 0: the judge prefers answer a_i over b_i (a tie: `is_tie`);
  gold_a[i], gold_b[i]: their gold scores (NaN where there is no gold label). Among
  the comparisons the judge decides and whose gold scores differ ("decided"),
  agreement = the fraction where the judge prefers the answer with the higher gold
  score. Returns {"comparisons", "no_gold", "judge_ties", "gold_ties", "decided",
  "agree", "agreement" (None when nothing is decided)}; judge_ties / gold_ties count
  comparisons with gold labels that the judge / the gold scores leave tied.
  """
  out = dict(comparisons=0, no_gold=0, judge_ties=0, gold_ties=0, decided=0, agree=0)
  for p, ga, gb in zip(preferences, gold_a, gold_b):
    p, ga, gb = float(p), float(ga), float(gb)
    out["comparisons"] += 1
    if np.isnan(ga) or np.isnan(gb):
      out["no_gold"] += 1
    elif is_tie(p, tie_margin):
      out["judge_ties"] += 1
    elif ga == gb:
      out["gold_ties"] += 1
    else:
      out["decided"] += 1
      out["agree"] += int((p > 0) == (ga > gb))
  out["agreement"] = out["agree"] / out["decided"] if out["decided"] else None
  return out


def _bucket(n: int, lo: int = 16) -> int:
  """The smallest power of two >= max(n, lo): padded lengths that bound recompilations."""
  b = lo
  while b < n:
    b *= 2
  return b


def generate_texts(*, model_config, params, tokenizer, conversations, max_new_tokens: int,
                   temperature: float = 1.0, seed: int = 0, micro_batch: int = 16,
                   max_prompt_len: int = 512, desc: str = "generating",
                   progress: bool = True) -> tuple[list[str], dict]:
  """One completion (text) per conversation ([{"role", "content"}] messages, a chat prompt
  ending with the user's turn), rendered with the tokenizer's chat template.

  Prompts longer than `max_prompt_len` tokens (at most the model's context,
  model_config.max_seq_len, minus max_new_tokens) are LEFT-truncated (a leading BOS kept).
  Batches are `micro_batch` rows (the last one padded with copies) of prompts padded
  to a power-of-two length, so the sampler compiles once per length bucket.
  temperature <= 0: greedy. Returns (texts, {"prompts", "prompt_truncated", "unfinished"}).
  """
  import jax
  import tqdm

  from rlhf_jax import sampling
  from rlhf_jax.data.preferences import truncate_prompt
  from rlhf_jax.data.sft import encode_prompt
  max_prompt_len = min(max_prompt_len, model_config.max_seq_len - max_new_tokens)
  if max_prompt_len < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the "
                     f"model's context (max_seq_len={model_config.max_seq_len})")
  ids = []
  truncated = 0
  for msgs in conversations:
    full = encode_prompt(tokenizer, msgs)
    row = truncate_prompt(full, max_prompt_len, tokenizer.bos_id)
    truncated += int(len(row) < len(full))
    ids.append(row)
  texts: list[str] = []
  unfinished = 0
  greedy = temperature <= 0
  key = jax.random.PRNGKey(seed)
  for i in tqdm.trange(0, len(ids), micro_batch, desc=desc, unit="batch",
                       disable=not progress or not ids):
    chunk = ids[i:i + micro_batch]
    real = len(chunk)
    chunk = chunk + [chunk[-1]] * (micro_batch - real)
    P = min(_bucket(max(len(x) for x in chunk)), max_prompt_len)
    tokens = np.full((micro_batch, P), tokenizer.pad_id, np.int32)
    mask = np.zeros((micro_batch, P), np.int32)
    for j, x in enumerate(chunk):
      tokens[j, P - len(x):], mask[j, P - len(x):] = x, 1
    out = sampling.generate(model_config, params, tokens, mask, jax.random.fold_in(key, i),
                            max_new_tokens=max_new_tokens, greedy=greedy,
                            temperature=1.0 if greedy else temperature,
                            eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
    comp, cmask = np.asarray(out.tokens_BN), np.asarray(out.mask_BN)
    for row, m in list(zip(comp, cmask))[:real]:
      kept = [int(t) for t, k in zip(row, m) if k]
      unfinished += int(not kept or kept[-1] != tokenizer.eos_id)
      texts.append(tokenizer.decode([t for t in kept if t != tokenizer.eos_id]))
  return texts, {"prompts": len(ids), "prompt_truncated": truncated, "unfinished": unfinished}
