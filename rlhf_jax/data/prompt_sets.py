"""Prompt sets for the online-RL trainers: config -> prompt batches + metadata.

`config.data.source`:
  synthetic  WORKDIR/data/prompts_<task>_{train,eval}.jsonl generated from the seed
             (`rlhf_jax.data.synthetic.make_verifiable_example`: add / arithmetic / word;
             guess_number / calc_chain for the multi-turn envs of rlhf_jax/envs)
  jsonl      data.train_path / data.eval_path: {"prompt", "answer"?} rows
  gsm8k      data.train_path / data.eval_path: the official GSM8K JSONL files
All are built into TFDS array_record datasets (`data.data_dir`, default WORKDIR/tfds).
"""
from __future__ import annotations

import os

import numpy as np

from rlhf_jax.data import prompts as prompt_data
from rlhf_jax.data.sft import DataError, batched
from rlhf_jax.data.pairs import _name

SOURCES = ("synthetic", "jsonl", "gsm8k")


def load(config, workdir: str):
  """(train source, eval source or None, stats) of decoded prompt examples."""
  import tensorflow_datasets as tfds
  tfds.disable_progress_bar()
  d = config.data
  data_dir = d.data_dir or os.path.join(workdir, "tfds")
  if d.source == "synthetic":
    files = {}
    for split, n, seed in (("train", d.synthetic_train_examples, config.seed),
                           ("eval", d.synthetic_eval_examples, config.seed + 10_000)):
      path = os.path.join(workdir, "data",
                          f"prompts_{d.synthetic_task}_d{d.synthetic_digits}_{split}.jsonl")
      if not os.path.exists(path):
        prompt_data.write_synthetic_prompts(path, d.synthetic_task, n, seed,
                                            digits=d.synthetic_digits)
      files[split] = path
    builder = prompt_data.build_jsonl_prompts(files, data_dir, name=_name(*files.values()),
                                              skip_malformed=d.skip_malformed)
  elif d.source in ("jsonl", "gsm8k"):
    if not d.train_path:
      raise DataError(f"config.data.train_path: required when data.source={d.source!r}")
    files = {"train": d.train_path, **({"eval": d.eval_path} if d.eval_path else {})}
    if d.source == "jsonl":
      builder = prompt_data.build_jsonl_prompts(files, data_dir, name=_name(*files.values()),
                                                skip_malformed=d.skip_malformed)
    else:
      builder = prompt_data.build_gsm8k(data_dir, files=files,
                                        config_name=_name(*files.values()),
                                        skip_malformed=d.skip_malformed)
  else:
    raise DataError(f"config.data.source={d.source!r}: expected one of {SOURCES}")
  train = prompt_data.load_prompts(builder, "train")
  evals = prompt_data.load_prompts(builder, "eval") if "eval" in builder.info.splits else None
  stats = {f"{split}_{k}": v for split, s in prompt_data.prompt_stats(builder).items()
           for k, v in s.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
  return train, evals, stats


def _messages(prompt):
  return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def corpus(source):
  """(prompt messages, reference solution) pairs, for training a tokenizer."""
  for ex in source:
    yield _messages(ex["prompt"]), ex.get("solution") or ex.get("answer") or ""


def batches(config, tokenizer, source, prompts_per_step: int, seed: int):
  """(grain dataset: ds[step] -> {"tokens" [N, P], "mask" [N, P], "index" [N]},
  metadata(index [N]) -> {"answer": [...]} for the reward functions)."""
  if len(source) < prompts_per_step:
    name = getattr(source, "name", "") or "the training prompts"
    raise DataError(f"{name}: {len(source)} prompts, fewer than "
                    f"rollout.prompts_per_step={prompts_per_step}")
  tokens, mask = prompt_data.tokenize_prompts(source, tokenizer, config.data.max_prompt_len)
  arrays = {"tokens": tokens, "mask": mask, "index": np.arange(len(tokens), dtype=np.int32)}
  answers = [ex["answer"] for ex in source]

  def metadata(index):
    return {"answer": [answers[int(i)] for i in index],
            "prompt_messages": [_messages(source[int(i)]["prompt"]) for i in index]}
  return batched(arrays, prompts_per_step, seed), metadata
