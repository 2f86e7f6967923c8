"""Prompt data for online RL (PPO, GRPO): prompts with optional reference answers.

Storage. Prompt sets are TFDS datasets in `array_record` files, built by the
builders in `rlhf_jax.data.tfds_prompts` (`gsm8k`: OpenAI GSM8K;
`jsonl_prompts`: any JSONL of prompt rows) without TensorFlow, exactly like
the preference data sets (`rlhf_jax.data.preferences`). Every example has
the features

    prompt    str   JSON list of {"role", "content"} chat messages
    answer    str   reference final answer ("" when there is none), e.g. "72"
    solution  str   full reference solution ("" when there is none)
    source    str   "file:line" the row came from (or "url:line")

`load_prompts(builder_or_dir, split)` returns a random-access sequence of
decoded examples ({"prompt": [messages], "answer", "solution", "source"}).

GSM8K (`gsm8k`; the official JSONL {"question", "answer"}): prompt = the
question as one user turn; the official answer is reasoning with calculator
annotations ("48/2 = <<48/2=24>>24") and a last line "#### 72". answer = the
number after the last "####" with thousands commas removed ("1,000" ->
"1000"); solution = the reasoning before it with the annotations removed
("48/2 = 24"), trailing whitespace stripped. A row without "####" is
malformed.

JSONL rows (`jsonl_prompts`; one object per line, `.jsonl` or `.jsonl.gz`):

    {"prompt": "text" | [{"role", "content"}, ...], "answer": str | number (optional),
     "solution": str (optional)}

A string prompt is one user turn; a number answer is written as JSON writes
it (7 -> "7"). Malformed rows raise `DataError` naming file:line, or with
`skip_malformed=True` are skipped and counted (`prompt_stats`).

Synthetic verifiable tasks (`write_synthetic_prompts`): jsonl_prompts rows of
`rlhf_jax.data.synthetic.make_verifiable_example` ("add: 12+7" -> "19",
"compute: 12*7", small word problems), difficulty set by `digits`.

Tokenization for the sampler (`tokenize_prompts`): prompt ids from
`encode_prompt` (chat template with the generation prompt, BOS when the
tokenizer adds one), LEFT-truncated to max_prompt_len with
`preferences.truncate_prompt` (same policy as preference data: the most
recent turns survive, a lone leading BOS stays), then LEFT-padded to
max_prompt_len so every prompt ends at the last column and generation
continues from there:

    tokens_BP = [pad ... pad, prompt ids]     mask_BP = [0 ... 0, 1 ... 1]
"""
from __future__ import annotations

import json
import os
from typing import Iterable

import numpy as np

from rlhf_jax.data.preferences import (  # noqa: F401 (DataError re-exported)
    DataError, PreferenceSource, _builder, _text, preference_stats, truncate_prompt)
from rlhf_jax.data.rows import (parse_gsm8k_answer, parse_gsm8k_row,  # noqa: F401 (re-exported)
                                parse_prompt_row, strip_calculator_annotations)
from rlhf_jax.data.sft import encode_prompt


def decode_prompt_example(ex: dict) -> dict:
  """A stored example (bytes strings, JSON prompt) as Python values."""
  return {"prompt": json.loads(_text(ex["prompt"])), "answer": _text(ex["answer"]),
          "solution": _text(ex["solution"]), "source": _text(ex.get("source", b""))}


class PromptSource(PreferenceSource):
  """Random-access view of one built prompt split: source[i] -> decoded example dict.

  Index i is the i-th row of the split in file order; usable as a grain
  `MapDataset` source.
  """

  def __getitem__(self, i):
    if isinstance(i, slice):
      return [self[j] for j in range(*i.indices(len(self)))]
    if not -len(self) <= i < len(self):
      raise IndexError(f"{self.name}: index {i} out of range for {len(self)} examples")
    return decode_prompt_example(self._ds[int(i) % len(self)])

  def __repr__(self):
    return f"PromptSource({self.name!r}, {len(self)} examples)"


def load_prompts(builder_or_dir, split: str) -> PromptSource:
  """Random-access decoded examples of `split` of a built prompt dataset.

  builder_or_dir: a prepared builder (`build_gsm8k`, `build_jsonl_prompts`) or
  the dataset directory <data_dir>/<name>/<config>/<version>.
  """
  b = _builder(builder_or_dir)
  if "answer" not in b.info.features or "chosen" in b.info.features:
    raise DataError(f"{b.data_dir}: not a prompt dataset (features "
                    f"{sorted(b.info.features)}; expected prompt, answer, solution, source)")
  if split not in b.info.splits:
    raise DataError(f"{b.data_dir}: no split {split!r}; available: {sorted(b.info.splits)}")
  return PromptSource(b.as_data_source(split), f"{b.info.full_name}[{split}]")


def prompt_stats(builder_or_dir) -> dict:
  """Build statistics per split: {"examples", "malformed_skipped", "malformed_examples",
  "sources", "with_answer", ...} (gsm8k adds "annotations_stripped")."""
  return preference_stats(builder_or_dir)


# ----------------------------------------------------------------------------
# Tokenization for the sampler
# ----------------------------------------------------------------------------

def tokenize_prompts(examples: Iterable[dict], tokenizer, max_prompt_len: int,
                     stats: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(tokens_BP int32, mask_BP int32), P = max_prompt_len, rows LEFT-padded with pad_id.

  examples: dicts with "prompt" (str or [messages]); see the module docstring
  for the template and the truncation policy. `stats`, when given, accumulates
  counts: examples, prompt_truncated.
  """
  if max_prompt_len < 1:
    raise ValueError(f"max_prompt_len={max_prompt_len}: must be >= 1")
  rows = []
  truncated = 0
  for ex in examples:
    prompt = ex["prompt"] if isinstance(ex, dict) else ex
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    full = encode_prompt(tokenizer, messages)
    ids = truncate_prompt(full, max_prompt_len, tokenizer.bos_id)
    truncated += int(len(ids) < len(full))
    rows.append(ids)
  if not rows:
    raise DataError("no prompts to tokenize")
  tokens = np.full((len(rows), max_prompt_len), tokenizer.pad_id, np.int32)
  mask = np.zeros((len(rows), max_prompt_len), np.int32)
  for i, ids in enumerate(rows):
    if ids:
      tokens[i, max_prompt_len - len(ids):] = ids
      mask[i, max_prompt_len - len(ids):] = 1
  if stats is not None:
    stats["examples"] = stats.get("examples", 0) + len(rows)
    stats["prompt_truncated"] = stats.get("prompt_truncated", 0) + truncated
  return tokens, mask


# ----------------------------------------------------------------------------
# Synthetic verifiable prompts
# ----------------------------------------------------------------------------

def write_synthetic_prompts(path: str, task: str, n: int, seed: int, **kwargs) -> str:
  """Write `n` jsonl_prompts rows {"prompt", "answer", "solution"} of a synthetic
  verifiable task (atomic); returns path. Tasks and kwargs (digits): see
  `rlhf_jax.data.synthetic.make_verifiable_example`."""
  from rlhf_jax.data.synthetic import make_verifiable_example
  rng = np.random.default_rng(seed)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    for _ in range(n):
      f.write(json.dumps(make_verifiable_example(task, rng, **kwargs)) + "\n")
  os.replace(tmp, path)
  return path


# Builders live in tfds_prompts (importing tensorflow_datasets takes ~1 s); re-exported lazily.
def build_gsm8k(*args, **kwargs):
  """See `rlhf_jax.data.tfds_prompts.build_gsm8k`."""
  from rlhf_jax.data import tfds_prompts
  return tfds_prompts.build_gsm8k(*args, **kwargs)


def build_jsonl_prompts(*args, **kwargs):
  """See `rlhf_jax.data.tfds_prompts.build_jsonl_prompts`."""
  from rlhf_jax.data import tfds_prompts
  return tfds_prompts.build_jsonl_prompts(*args, **kwargs)
