"""SFT data: JSONL rows -> tokenized, masked, padded (or packed) batches via grain.

File format, one JSON object per line, either
    {"prompt": "...", "completion": "..."}
or  {"messages": [{"role": "user", "content": "..."}, ..., {"role": "assistant", ...}]}
where the last message is the assistant turn to learn. Multi-turn rows (tool use,
feedback): when any message has "weight" (0 or 1, assistant messages only; OpenAI's
fine-tuning format), every assistant message whose weight is not 0 is learned, and the
tool / user messages between them are context (`rlhf_jax.data.conversation`).

Every example becomes
    tokens    = [BOS] + chat_template(prompt) + completion + [EOS]
    loss_mask =   0   +        0 ...          + 1 ...      +   1
so the loss falls on completion tokens (and EOS) only. Batches are fixed-shape
[batch, max_seq_len] (no recompilation): right-padded rows, or with
`packing=True` several examples per row, told apart by `segment_ids`
(attention never crosses a segment; positions restart per segment). The trainer may
cut a batch of right-padded rows shorter (`data.pad_to`, `rlhf_jax.data.lengths`).

Batch order is a pure function of (seed, step) — grain's random-access
`MapDataset` shuffles every epoch anew — so a resumed run sees exactly the
batches an uninterrupted run would.
"""
from __future__ import annotations

import gzip
import json
import os
from typing import Iterator, Sequence

import grain
import numpy as np

from rlhf_jax.data.conversation import (  # noqa: F401 (encode_prompt re-exported)
    encode_prompt, tokenize_conversation)

OVERLENGTH = ("error", "truncate", "drop")


class DataError(ValueError):
  """Bad data: the message names the file:line and what was expected."""


def open_text(path: str):
  """Binary file object of a .jsonl or .jsonl.gz file."""
  return gzip.open(path, "rb") if str(path).endswith(".gz") else open(path, "rb")


def iter_jsonl(path: str, display: str | None = None) -> Iterator[tuple[str, dict | DataError]]:
  """("file:line", row) for every non-empty line; a DataError in place of a bad row.

  The one JSONL reader of every data set. Bad rows (not UTF-8, not JSON, not an
  object) are returned, not raised, so a caller can skip and count them; a file that
  cannot be read at all raises. A UTF-8 byte-order mark on the first line is ignored.
  `display` names the file in messages (default: `path`).
  """
  name = display or str(path)
  if not os.path.exists(path):
    raise DataError(f"data file not found: {path}")
  if os.path.isdir(path):
    raise DataError(f"{path}: is a directory; expected a JSONL file")
  try:
    with open_text(path) as f:
      for lineno, raw in enumerate(f, start=1):
        where = f"{name}:{lineno}"
        if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
          raw = raw[3:]
        try:
          line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
          yield where, DataError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})")
          continue
        if not line.strip():
          continue
        try:
          row = json.loads(line)
        except json.JSONDecodeError as e:
          yield where, DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})")
          continue
        if not isinstance(row, dict):
          yield where, DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
          continue
        yield where, row
  except (OSError, EOFError) as e:  # unreadable, or a corrupt / truncated .gz
    raise DataError(f"{name}: cannot read the file ({type(e).__name__}: {e}); expected "
                    f"UTF-8 JSONL{', gzip-compressed' if str(path).endswith('.gz') else ''}"
                    ) from None


def read_jsonl_rows(path: str, required: Sequence[str] = ()) -> list[tuple[int, dict]]:
  """(line_number, row) for every non-empty line; clear errors for bad rows."""
  rows = []
  for where, row in iter_jsonl(path):
    if isinstance(row, DataError):
      raise row
    for key in required:
      if key not in row:
        raise DataError(f"{where}: missing key {key!r} (keys present: {sorted(row)})")
    rows.append((int(where.rpartition(":")[2]), row))
  if not rows:
    raise DataError(f"{path}: no examples (empty file)")
  return rows


def nonempty_text(where: str, key: str, text: str) -> str:
  """`text` unless it is empty or only whitespace (DataError naming where and key)."""
  if not text.strip():
    raise DataError(f"{where}: {key!r} is empty; expected some text")
  return text


def write_jsonl_rows(path: str, rows) -> str:
  """Write dicts as JSONL to `path` atomically (tmp file + rename); returns path."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
  os.replace(tmp, path)
  return path


def row_to_messages(path: str, lineno: int, row: dict) -> tuple[list[dict], str]:
  """(prompt messages, completion text) of one SFT row."""
  where = f"{path}:{lineno}"
  if "messages" in row:
    msgs = row["messages"]
    if (not isinstance(msgs, list) or len(msgs) < 2 or
        not all(isinstance(m, dict) and isinstance(m.get("role"), str) and
                isinstance(m.get("content"), str) for m in msgs)):
      raise DataError(f"{where}: 'messages' must be a list of >= 2 objects with string "
                      f"'role' and 'content'")
    if msgs[-1]["role"] != "assistant":
      raise DataError(f"{where}: the last message must have role 'assistant', "
                      f"got {msgs[-1]['role']!r}")
    return msgs[:-1], msgs[-1]["content"]
  for key in ("prompt", "completion"):
    if key not in row:
      raise DataError(f"{where}: missing key {key!r}; expected {{'prompt': str, "
                      f"'completion': str}} or {{'messages': [...]}} (keys present: {sorted(row)})")
    if not isinstance(row[key], str):
      raise DataError(f"{where}: {key!r} must be a string, got {type(row[key]).__name__}")
  return [{"role": "user", "content": row["prompt"]}], row["completion"]


def message_weights(where: str, row: dict) -> list[bool] | None:
  """Which messages of a multi-turn row are trained, or None for the single-turn rule
  (the last message only). A row where any message has "weight" (OpenAI's fine-tuning
  format) trains every assistant message whose weight is not 0; "weight" must be 0 or 1
  and only assistant messages may have it."""
  msgs = row.get("messages")
  if not isinstance(msgs, list) or not any(isinstance(m, dict) and "weight" in m for m in msgs):
    return None
  out = []
  for i, m in enumerate(msgs):
    w = m.get("weight", 1)
    if "weight" in m and m["role"] != "assistant":
      raise DataError(f"{where}: messages[{i}] has role {m['role']!r} and a 'weight'; only "
                      f"assistant messages are trained (tool / user messages never are)")
    if isinstance(w, bool) or w not in (0, 1):
      raise DataError(f"{where}: messages[{i}]['weight']={w!r}: expected 0 or 1")
    out.append(m["role"] == "assistant" and w == 1)
  if not out[-1]:
    raise DataError(f"{where}: the last message has weight 0; nothing after it is trained, "
                    f"drop it instead")
  return out


def tokenize_sft_file(path: str, tokenizer, max_seq_len: int, overlength: str = "error",
                      loss_on_prompt: bool = False):
  """List of (tokens int32[n], loss_mask int32[n]) for every row of `path`.

  loss_on_prompt=True puts the loss on every token after BOS (language-model
  pre-training on the rendered text) instead of the completion only."""
  if overlength not in OVERLENGTH:
    raise ValueError(f"data.overlength={overlength!r}: expected one of {OVERLENGTH}")
  examples = []
  for lineno, row in read_jsonl_rows(path):
    prompt_msgs, completion = row_to_messages(path, lineno, row)
    nonempty_text(f"{path}:{lineno}", "completion", completion)  # nothing to learn but EOS
    weights = message_weights(f"{path}:{lineno}", row)
    if weights is not None:  # multi-turn: every assistant turn of weight 1 is trained
      try:
        ids, loss = tokenize_conversation(tokenizer, row["messages"], weights)
      except ValueError as e:
        raise DataError(f"{path}:{lineno}: {e}") from None
      tokens, mask = np.asarray(ids, np.int32), np.asarray(loss, np.int32)
    else:
      prompt_ids = encode_prompt(tokenizer, prompt_msgs)
      completion_ids = tokenizer.encode(completion) + [tokenizer.eos_id]
      tokens = np.asarray(prompt_ids + completion_ids, np.int32)
      mask = np.asarray([0] * len(prompt_ids) + [1] * len(completion_ids), np.int32)
    if loss_on_prompt:
      mask[1 if tokens[0] == tokenizer.bos_id else 0:] = 1
    if len(tokens) > max_seq_len:
      if overlength == "error":
        raise DataError(f"{path}:{lineno}: example is {len(tokens)} tokens, longer than "
                        f"data.max_seq_len={max_seq_len} (raise it, or set "
                        f"data.overlength='truncate' or 'drop')")
      if overlength == "drop":
        continue
      tokens, mask = tokens[:max_seq_len], mask[:max_seq_len]
      if mask.sum() == 0:
        continue
    examples.append((tokens, mask))
  if not examples:
    raise DataError(f"{path}: no usable examples (all longer than max_seq_len={max_seq_len}?)")
  return examples


def pad_examples(examples, max_seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
  """One example per row, right-padded: tokens/segment_ids/loss_mask [N, T]."""
  n = len(examples)
  tokens = np.full((n, max_seq_len), pad_id, np.int32)
  seg = np.zeros((n, max_seq_len), np.int32)
  mask = np.zeros((n, max_seq_len), np.int32)
  for i, (t, m) in enumerate(examples):
    tokens[i, :len(t)], seg[i, :len(t)], mask[i, :len(t)] = t, 1, m
  return {"tokens": tokens, "segment_ids": seg, "loss_mask": mask}


def pack_examples(examples, max_seq_len: int, pad_id: int, seed: int) -> dict[str, np.ndarray]:
  """Greedy first-fit packing (in a seeded random order) into rows of max_seq_len.

  Segment ids count 1, 2, ... within a row; 0 is padding.
  """
  order = np.random.default_rng(seed).permutation(len(examples))
  rows: list[list[int]] = []
  free: list[int] = []
  for i in order:
    n = len(examples[i][0])
    for r, space in enumerate(free):
      if n <= space:
        rows[r].append(i)
        free[r] -= n
        break
    else:
      rows.append([i])
      free.append(max_seq_len - n)
  out = pad_examples([examples[r[0]] for r in rows], max_seq_len, pad_id)
  for r, members in enumerate(rows):
    pos = 0
    for s, i in enumerate(members, start=1):
      t, m = examples[i]
      out["tokens"][r, pos:pos + len(t)] = t
      out["segment_ids"][r, pos:pos + len(t)] = s
      out["loss_mask"][r, pos:pos + len(t)] = m
      pos += len(t)
  return out


def require_rows(n: int, batch_size: int, what: str = "rows of data") -> None:
  """DataError unless there are at least `batch_size` rows (a batch never repeats a row)."""
  if n < batch_size:
    raise DataError(f"only {n} {what} but batch_size={batch_size}")


def batched(arrays: dict[str, np.ndarray], batch_size: int, seed: int, shuffle: bool = True):
  """Infinite grain MapDataset of batches: dataset[step] -> dict of [batch, T] arrays.

  Random access by step makes the data order reproducible across restarts.
  """
  n = len(next(iter(arrays.values())))
  require_rows(n, batch_size)
  ds = grain.MapDataset.source([{k: v[i] for k, v in arrays.items()} for i in range(n)])
  if shuffle:
    ds = ds.shuffle(seed=seed)
  return ds.repeat(None).batch(batch_size, drop_remainder=True)
