"""Preference pairs for the trainers (reward model, DPO family): config -> arrays.

`config.data.source` picks where pairs come from; every source is built into a
TFDS array_record dataset under `data.data_dir` (default WORKDIR/tfds) by
`rlhf_jax.data.tfds_builders` and read back with random access:

  synthetic  WORKDIR/data/pref_<task>_{train,eval}.jsonl generated from the seed:
             chosen = the task's correct answer, rejected = a corrupted one
  jsonl      data.train_path / data.eval_path: {"prompt","chosen","rejected"[,"margin"]}
  hh_rlhf    data.train_path: an HH-RLHF .jsonl(.gz) file, or a directory with the
             official <subset>/{train,test}.jsonl.gz layout; data.eval_path: a file
"""
from __future__ import annotations

import hashlib
import os

import numpy as np

from rlhf_jax.data import preferences as prefs
from rlhf_jax.data.sft import DataError

SOURCES = ("synthetic", "jsonl", "hh_rlhf")


def _name(*paths) -> str:
  key = "|".join(os.path.abspath(p) for p in paths if p)
  return "f" + hashlib.sha1(key.encode()).hexdigest()[:12]


def load_pairs(config, workdir: str):
  """(train source, eval source or None, stats dict) of decoded preference examples."""
  import tensorflow_datasets as tfds
  tfds.disable_progress_bar()  # our own progress bar is the one that matters
  d = config.data
  data_dir = d.data_dir or os.path.join(workdir, "tfds")
  eval_split = "eval"
  if d.source == "synthetic":
    files = {}
    for split, n, seed in (("train", d.synthetic_train_examples, config.seed),
                           ("eval", d.synthetic_eval_examples, config.seed + 10_000)):
      path = os.path.join(workdir, "data",
                          f"pref_{d.synthetic_task}_{d.synthetic_corruption}_{split}.jsonl")
      if not os.path.exists(path):
        prefs.write_synthetic_preferences(path, d.synthetic_task, n, seed,
                                          corruption=d.synthetic_corruption)
      files[split] = path
    builder = prefs.build_jsonl_preferences(files, data_dir, name=_name(*files.values()),
                                            skip_malformed=d.skip_malformed)
  elif d.source == "jsonl":
    if not d.train_path:
      raise DataError("config.data.train_path: required when data.source='jsonl'")
    files = {"train": d.train_path, **({"eval": d.eval_path} if d.eval_path else {})}
    builder = prefs.build_jsonl_preferences(files, data_dir, name=_name(*files.values()),
                                            skip_malformed=d.skip_malformed)
  elif d.source == "hh_rlhf":
    if not d.train_path:
      raise DataError("config.data.train_path: required when data.source='hh_rlhf' "
                      "(an HH-RLHF .jsonl.gz file or the official directory)")
    eval_split = "test"
    if os.path.isdir(d.train_path):
      builder = prefs.build_hh_rlhf(data_dir, d.hh_subset, manual_dir=d.train_path,
                                    config_name=_name(d.train_path),
                                    skip_malformed=d.skip_malformed)
    else:
      files = {"train": d.train_path, **({"test": d.eval_path} if d.eval_path else {})}
      builder = prefs.build_hh_rlhf(data_dir, d.hh_subset, files=files,
                                    config_name=_name(*files.values()),
                                    skip_malformed=d.skip_malformed)
  else:
    raise DataError(f"config.data.source={d.source!r}: expected one of {SOURCES}")
  train = prefs.load_preferences(builder, "train")
  evals = prefs.load_preferences(builder, eval_split) if eval_split in builder.info.splits else None
  stats = {}
  for split, s in prefs.preference_stats(builder).items():
    for k, v in s.items():
      if isinstance(v, (int, float)) and not isinstance(v, bool):
        stats[f"{split}_{k}"] = v
  return train, evals, stats


def messages(prompt) -> list[dict]:
  return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def corpus(source):
  """(prompt messages, reply) for both replies of every pair (tokenizer training)."""
  for ex in source:
    yield messages(ex["prompt"]), ex["chosen"]
    yield messages(ex["prompt"]), ex["rejected"]


def tokenize(config, tokenizer, source):
  """(arrays, stats): {chosen_,rejected_}{tokens,segment_ids,loss_mask} [N, T], margin [N]."""
  stats: dict = {}
  arrays = prefs.tokenize_preferences(source, tokenizer, config.data.max_prompt_len,
                                      config.data.max_completion_len, stats)
  return arrays, {k: v for k, v in stats.items() if k != "examples"}


def mismatched_rows(arrays, pad_id: int) -> dict[str, np.ndarray]:
  """KTO's mismatched pairs: row i = prompt of pair i + chosen reply of pair (i+1) mod N.

  Returns kl_{tokens,segment_ids,loss_mask} [N, T] (same layout as chosen_*).
  """
  tokens, seg, mask = (arrays[f"chosen_{k}"] for k in ("tokens", "segment_ids", "loss_mask"))
  N, T = tokens.shape
  out = {"kl_tokens": np.full((N, T), pad_id, np.int32), "kl_segment_ids": np.zeros((N, T), np.int32),
         "kl_loss_mask": np.zeros((N, T), np.int32)}
  for i in range(N):
    j = (i + 1) % N
    prompt = tokens[i][(seg[i] == 1) & (mask[i] == 0)]
    reply = tokens[j][mask[j] == 1]
    n = len(prompt) + len(reply)
    out["kl_tokens"][i, :n] = np.concatenate([prompt, reply])
    out["kl_segment_ids"][i, :n] = 1
    out["kl_loss_mask"][i, len(prompt):n] = 1
  return out
