"""Preference data: (prompt, chosen, rejected, margin) rows -> tokenized pair batches.

Storage. Preference data sets are TFDS datasets in `array_record` files, built
by the builders in `rlhf_jax.data.tfds_builders` (`hh_rlhf`: Anthropic
HH-RLHF; `jsonl_preferences`: any JSONL of preference rows) and read back with
random access, without TensorFlow. Every example has the features

    prompt    str   JSON list of {"role", "content"} chat messages (the whole
                    multi-turn prompt, ending before the reply to compare)
    chosen    str   the preferred final assistant reply
    rejected  str   the other reply
    margin    float32  preference strength (0 when the data has none)
    source    str   "file:line" the row came from (or "url:line")

`load_preferences(builder_or_dir, split)` returns a random-access sequence of
decoded examples ({"prompt": [messages], "chosen": str, ...}).

JSONL rows (`jsonl_preferences`; one object per line, `.jsonl` or `.jsonl.gz`):

    {"prompt": "text" | [{"role", "content"}, ...], "chosen": str, "rejected": str,
     "margin": number (optional)}

A string prompt is one user turn. `chosen` and `rejected` must differ (after stripping
whitespace; one of them may be empty: silence can be the better or the worse reply).
Malformed rows raise `DataError`
naming file:line, or with `skip_malformed=True` are skipped and counted (see
`preference_stats`).

Tokenization (`tokenize_preferences`): for each side (chosen / rejected)

    tokens    = prompt_ids + completion_ids + [EOS]   right-padded to T
    loss_mask =    0 ...   +      1 ...     +   1
    segment_ids = 1 on real tokens, 0 on padding,   T = max_prompt_len + max_completion_len

prompt_ids = `encode_prompt` (chat template with the generation prompt, BOS
when the tokenizer adds one). Truncation: prompts are LEFT-truncated to
max_prompt_len (the most recent turns survive; a leading BOS is kept in front
when the prompt starts with the tokenizer's bos token and that token occurs
nowhere else in it -- chatml's <|im_start|>, which SmolLM2 declares as bos,
marks every turn and is not kept); completions are RIGHT-truncated to
max_completion_len tokens including the EOS, so a truncated completion has no
EOS (its loss covers the kept tokens only). Both sides of a pair share the
same prompt tokens.

Batching reuses `rlhf_jax.data.sft.batched` (grain `MapDataset`, random access
by step, so the order is a pure function of (seed, step)). Every host builds
the same global batch and keeps its own rows with `host_slice`.
"""
from __future__ import annotations

import json
import os
import string
from typing import Any, Iterable, Sequence

import grain
import numpy as np

from rlhf_jax.data.rows import file_digest, parse_preference_row  # noqa: F401 (re-exported)
from rlhf_jax.data.sft import (DataError, batched, encode_prompt, iter_jsonl,  # noqa: F401
                               open_text)  # (re-exported)

PAIR_KEYS = ("tokens", "segment_ids", "loss_mask")
CORRUPTIONS = ("swap", "random")


# ----------------------------------------------------------------------------
# Built datasets: random access without TensorFlow
# ----------------------------------------------------------------------------

def _text(x) -> str:
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def decode_example(ex: dict) -> dict:
  """A stored example (bytes strings, JSON prompt) as Python values."""
  return {"prompt": json.loads(_text(ex["prompt"])), "chosen": _text(ex["chosen"]),
          "rejected": _text(ex["rejected"]), "margin": float(ex["margin"]),
          "source": _text(ex.get("source", b""))}


class PreferenceSource(Sequence):
  """Random-access view of one built split: source[i] -> decoded example dict.

  Wraps a TFDS `ArrayRecordDataSource`; usable as a grain `MapDataset` source.
  Index i is the i-th row of the split in file order (the builders disable
  TFDS's shuffling on write).
  """

  def __init__(self, data_source, name: str = ""):
    self._ds = data_source
    self.name = name

  def __len__(self) -> int:
    return len(self._ds)

  def __getitem__(self, i):
    if isinstance(i, slice):
      return [self[j] for j in range(*i.indices(len(self)))]
    if not -len(self) <= i < len(self):
      raise IndexError(f"{self.name}: index {i} out of range for {len(self)} examples")
    return decode_example(self._ds[int(i) % len(self)])

  def __repr__(self):
    return f"PreferenceSource({self.name!r}, {len(self)} examples)"


def _builder(builder_or_dir):
  import tensorflow_datasets as tfds
  if isinstance(builder_or_dir, (str, os.PathLike)):
    path = os.fspath(builder_or_dir)
    if not os.path.isfile(os.path.join(path, "dataset_info.json")):
      raise DataError(f"{path}: not a built TFDS dataset directory (no dataset_info.json); "
                      f"expected <data_dir>/<name>/<config>/<version>")
    return tfds.builder_from_directory(path)
  return builder_or_dir


def load_preferences(builder_or_dir, split: str) -> PreferenceSource:
  """Random-access decoded examples of `split` of a built preference dataset.

  builder_or_dir: a prepared builder (e.g. from `build_hh_rlhf`) or the dataset
  directory <data_dir>/<name>/<config>/<version> (read with
  `tfds.builder_from_directory`; no builder class or TensorFlow needed).
  """
  b = _builder(builder_or_dir)
  if split not in b.info.splits:
    raise DataError(f"{b.data_dir}: no split {split!r}; available: {sorted(b.info.splits)}")
  return PreferenceSource(b.as_data_source(split), f"{b.info.full_name}[{split}]")


def preference_stats(builder_or_dir) -> dict:
  """Build statistics stored with the dataset (metadata.json), per split:
  {"examples", "malformed_skipped", "malformed_examples": [first messages], ...}
  plus HH-specific counts for hh_rlhf (see `rlhf_jax.data.hh_rlhf`). Log them
  as metrics: e.g. `stats["train"]["malformed_skipped"]`."""
  b = _builder(builder_or_dir)
  meta = b.info.metadata
  return json.loads(json.dumps(dict(meta.get("stats", {})))) if meta is not None else {}


# ----------------------------------------------------------------------------
# Tokenization
# ----------------------------------------------------------------------------

def _as_messages(prompt) -> list[dict]:
  if isinstance(prompt, str):
    return [{"role": "user", "content": prompt}]
  return list(prompt)


def truncate_prompt(ids: list[int], max_len: int, bos_id: int | None) -> list[int]:
  """Keep the last `max_len` ids; a leading BOS (bos_id only at position 0) stays in front."""
  if len(ids) <= max_len:
    return ids
  if bos_id is not None and ids and ids[0] == bos_id and bos_id not in ids[1:]:
    return [ids[0]] + ids[len(ids) - max_len + 1:]
  return ids[len(ids) - max_len:]


def tokenize_preference(example: dict, tokenizer, max_prompt_len: int, max_completion_len: int,
                        stats: dict | None = None) -> dict[str, np.ndarray]:
  """One preference example -> {chosen_,rejected_}{tokens,segment_ids,loss_mask} [T] + margin.

  example: {"prompt": str | [messages], "chosen": str, "rejected": str, "margin"?}.
  See the module docstring for the layout and truncation policy. `stats`, when
  given, accumulates counts: examples, prompt_truncated, chosen_truncated,
  rejected_truncated.
  """
  if max_prompt_len < 1 or max_completion_len < 1:
    raise ValueError(f"max_prompt_len={max_prompt_len}, max_completion_len={max_completion_len}: "
                     f"both must be >= 1")
  T = max_prompt_len + max_completion_len
  full = encode_prompt(tokenizer, _as_messages(example["prompt"]))
  prompt = truncate_prompt(full, max_prompt_len, tokenizer.bos_id)
  out = {}
  counts = {"examples": 1, "prompt_truncated": int(len(prompt) < len(full))}
  for side in ("chosen", "rejected"):
    completion = tokenizer.encode(example[side]) + [tokenizer.eos_id]
    counts[f"{side}_truncated"] = int(len(completion) > max_completion_len)
    completion = completion[:max_completion_len]
    n = len(prompt) + len(completion)
    tokens = np.full((T,), tokenizer.pad_id, np.int32)
    seg = np.zeros((T,), np.int32)
    mask = np.zeros((T,), np.int32)
    tokens[:n] = prompt + completion
    seg[:n] = 1
    mask[len(prompt):n] = 1
    out[f"{side}_tokens"], out[f"{side}_segment_ids"], out[f"{side}_loss_mask"] = tokens, seg, mask
  out["margin"] = np.float32(example.get("margin", 0.0) or 0.0)
  if stats is not None:
    for k, v in counts.items():
      stats[k] = stats.get(k, 0) + v
  return out


def tokenize_preferences(examples: Iterable[dict], tokenizer, max_prompt_len: int,
                         max_completion_len: int, stats: dict | None = None
                         ) -> dict[str, np.ndarray]:
  """All examples tokenized and stacked: {chosen_,rejected_}{tokens,segment_ids,loss_mask}
  int32 [N, T] and margin float32 [N], T = max_prompt_len + max_completion_len."""
  rows = [tokenize_preference(ex, tokenizer, max_prompt_len, max_completion_len, stats)
          for ex in examples]
  if not rows:
    raise DataError("no preference examples to tokenize")
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def preference_dataset(source: Sequence[dict], tokenizer, max_prompt_len: int,
                       max_completion_len: int, batch_size: int, seed: int,
                       shuffle: bool = True):
  """Lazy alternative to tokenize_preferences + batched for splits too big to hold
  tokenized in memory: infinite grain MapDataset, dataset[step] -> batch dict of
  [batch_size, T] arrays (margin [batch_size]), tokenized on access."""
  if len(source) < batch_size:
    raise DataError(f"only {len(source)} preference examples but batch_size={batch_size}")
  ds = grain.MapDataset.source(source)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(None).map(
      lambda ex: tokenize_preference(ex, tokenizer, max_prompt_len, max_completion_len))
  return ds.batch(batch_size, drop_remainder=True)


def host_slice(batch: dict[str, Any], process_index: int, process_count: int) -> dict:
  """This host's rows of a global batch: rows [i*B/P, (i+1)*B/P) of every array.

  All hosts build the same global batch (same seed, same step) and keep
  disjoint slices; feed them to `jax.make_array_from_process_local_data`.
  """
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in [0, {process_count})")
  sizes = {len(v) for v in batch.values()}
  if len(sizes) != 1:
    raise ValueError(f"batch arrays disagree on the batch size: {sorted(sizes)}")
  (b,) = sizes
  if b % process_count:
    raise ValueError(f"global batch size {b} is not divisible by process_count={process_count}")
  per = b // process_count
  return {k: v[process_index * per:(process_index + 1) * per] for k, v in batch.items()}


# ----------------------------------------------------------------------------
# Synthetic preference tasks
# ----------------------------------------------------------------------------

def corrupt(answer: str, rng: np.random.Generator, how: str = "swap",
            alphabet: str | None = None) -> str:
  """A wrong answer of the same length, always != answer.

  swap:   two positions holding different characters exchanged ("abcd" -> "adcb");
          when all characters are equal, one is replaced instead.
  random: a uniformly random string over the alphabet (default: the characters
          the task uses: a-l for reverse/sort, digits for add), redrawn until
          it differs.
  """
  if how not in CORRUPTIONS:
    raise ValueError(f"corruption {how!r}: expected one of {CORRUPTIONS}")
  if alphabet is None:
    alphabet = string.digits if answer.isdigit() else string.ascii_lowercase[:12]
  if not answer:
    raise ValueError("cannot corrupt an empty answer")
  if how == "swap":
    pairs = [(i, j) for i in range(len(answer)) for j in range(i + 1, len(answer))
             if answer[i] != answer[j]]
    if pairs:
      i, j = pairs[int(rng.integers(len(pairs)))]
      s = list(answer)
      s[i], s[j] = s[j], s[i]
      return "".join(s)
    i = int(rng.integers(len(answer)))
    others = [c for c in alphabet if c != answer[i]]
    return answer[:i] + others[int(rng.integers(len(others)))] + answer[i + 1:]
  while True:
    s = "".join(rng.choice(list(alphabet), size=len(answer)))
    if s != answer:
      return s


def write_synthetic_preferences(path: str, task: str, n: int, seed: int,
                                corruption: str = "swap", **kwargs) -> str:
  """Write `n` jsonl_preferences rows of a synthetic task (atomic); returns path.

  Each row: {"prompt": "<task>: <input>", "chosen": correct answer,
  "rejected": corrupt(answer, corruption)} with the prompt and answer from
  `rlhf_jax.data.synthetic.make_example(task, rng, **kwargs)`.
  """
  from rlhf_jax.data.synthetic import make_example
  rng = np.random.default_rng(seed)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    for _ in range(n):
      ex = make_example(task, rng, **kwargs)
      row = {"prompt": ex["prompt"], "chosen": ex["completion"],
             "rejected": corrupt(ex["completion"], rng, corruption)}
      f.write(json.dumps(row) + "\n")
  os.replace(tmp, path)
  return path


# Builders live in tfds_builders (importing tensorflow_datasets takes ~1 s); re-exported lazily.
def build_hh_rlhf(*args, **kwargs):
  """See `rlhf_jax.data.tfds_builders.build_hh_rlhf`."""
  from rlhf_jax.data import tfds_builders
  return tfds_builders.build_hh_rlhf(*args, **kwargs)


def build_jsonl_preferences(*args, **kwargs):
  """See `rlhf_jax.data.tfds_builders.build_jsonl_preferences`."""
  from rlhf_jax.data import tfds_builders
  return tfds_builders.build_jsonl_preferences(*args, **kwargs)
