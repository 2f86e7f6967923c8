"""Row lengths of the offline trainers' batches (`data.pad_to`): fixed, per batch, buckets.

Every offline data set (SFT rows, preference pairs, PRM rows) is tokenized into
RIGHT-padded [N, T] arrays, T = the configured maximum (data.max_seq_len,
data.max_prompt_len + data.max_completion_len, data.max_len): a row is its real tokens
(segment_ids > 0) followed by padding (token pad_id, segment 0, loss / step masks 0).
A batch can therefore be cut to any length >= its longest row without changing a single
real token, and every loss only sees real tokens (padding is masked), so the loss, the
gradients and the metrics are the same to float tolerance. `data.pad_to` picks the
length each batch is cut to (`Padding`):

  max      T for every batch: one shape, one compilation (the default; batches are
           untouched, results bit for bit those of before the knob).
  longest  the batch's longest row rounded up to a multiple of data.pad_multiple:
           least padding, but every distinct length is one more compilation of the
           step (at most T / pad_multiple of them).
  bucket   the smallest of a few fixed boundaries >= the batch's longest row: a
           bounded number of compilations. data.buckets gives the boundaries; () =
           chosen from the training rows' lengths (`auto_buckets`). T is always the
           last boundary, so any batch fits.

Preference pairs are cut to one length for all their sides (chosen, rejected and
KTO's mismatched rows run as one [sides x B, T] batch): the length of a pair is that
of its longest side, prompt and reply together (prompt and reply are not padded
separately: one dimension to bucket, not two, so the shape count stays the number of
boundaries). The choice is a function of the GLOBAL batch, which every process builds
alike before keeping its own rows (`parallel.shard_batch`), so all processes agree;
micro-batches of a step (grad_accum_steps) are cut from the step's batch and share
its length. Packed SFT rows (data.packing) are full by construction and stay T long.
jax.jit compiles a step once per distinct shape and reuses it from its cache; each
new length is printed once (`Padding.__call__`).
"""
from __future__ import annotations

import dataclasses

import numpy as np

PAD_TO = ("max", "longest", "bucket")
AUTO_BUCKETS = 4  # boundaries chosen for training batches by `auto_buckets` (T added)


def round_up(n: int, multiple: int, cap: int) -> int:
  """n rounded up to a multiple of `multiple`, at most `cap`."""
  return int(min(-(-int(n) // multiple) * multiple, cap))


def row_lengths(arrays: dict) -> np.ndarray:
  """int [N]: each row's length (index after its last real token, 0 for an empty row),
  the longest over every `*segment_ids` array of the dict (the sides of a pair)."""
  out = None
  for k, v in arrays.items():
    if not k.endswith("segment_ids"):
      continue
    real = np.asarray(v) > 0
    n = np.where(real.any(1), real.shape[1] - np.argmax(real[:, ::-1], axis=1), 0)
    out = n if out is None else np.maximum(out, n)
  if out is None:
    raise ValueError(f"no *segment_ids array among {sorted(arrays)}")
  return out


def auto_buckets(lengths, batch_size: int, max_len: int, multiple: int = 8,
                 n: int = AUTO_BUCKETS) -> tuple[int, ...]:
  """Bucket boundaries from the rows' length distribution (numpy, deterministic).

  A batch pads to its LONGEST row, whose distribution (batch_size rows drawn from
  lengths with empirical CDF F) is F(L)^batch_size. Boundaries: the k/n quantiles of
  that longest row (k = 1 .. n-1, the (k/n)^(1/batch_size) quantiles of the lengths),
  and the longest row itself, each rounded up to `multiple` (at most max_len), so
  that about 1/n of the batches fall in each; plus max_len, used only by rows longer
  than every one given (eval data). Sorted, without repeats: at most n + 1 values.
  """
  lengths = np.sort(np.asarray(lengths, np.int64).ravel())
  out = {int(max_len)}
  if len(lengths):
    for k in range(1, n):
      p = (k / n) ** (1.0 / max(int(batch_size), 1))
      out.add(round_up(np.quantile(lengths, p, method="higher"), multiple, max_len))
    out.add(round_up(lengths[-1], multiple, max_len))
  return tuple(sorted(b for b in out if b > 0))


def padded_length(longest: int, pad_to: str, max_len: int, boundaries=(),
                  multiple: int = 8) -> int:
  """The length a batch whose longest row is `longest` is cut to (module docstring)."""
  if pad_to == "max":
    return int(max_len)
  if pad_to == "longest":
    return round_up(max(int(longest), 1), multiple, max_len)
  if pad_to == "bucket":
    return int(min([b for b in boundaries if b >= longest] + [max_len]))
  raise ValueError(f"data.pad_to={pad_to!r}: expected one of {'|'.join(PAD_TO)}")


def cut(batch: dict, length: int, max_len: int) -> dict:
  """The batch with every [B, max_len] array cut to [B, length] (others as they are)."""
  if length == max_len:
    return batch
  return {k: np.ascontiguousarray(np.asarray(v)[:, :length])
          if np.ndim(v) == 2 and np.shape(v)[1] == max_len else v for k, v in batch.items()}


@dataclasses.dataclass
class Padding:
  """`padding(batch, what)`: a host batch cut to its `data.pad_to` length.

  seen[what] counts the batches per length; a length a kind of batch (train, eval,
  reference) has not used before is printed once with verbose=True (the primary
  process): a new shape, one more compilation of the function it feeds."""
  pad_to: str = "max"
  max_len: int = 0
  boundaries: tuple = ()
  multiple: int = 8
  verbose: bool = False
  seen: dict = dataclasses.field(default_factory=dict)

  def length(self, batch: dict) -> int:
    if self.pad_to == "max":
      return self.max_len
    return padded_length(int(row_lengths(batch).max(initial=0)), self.pad_to, self.max_len,
                         self.boundaries, self.multiple)

  def __call__(self, batch: dict, what: str = "train") -> dict:
    if self.pad_to == "max":
      return batch
    n = self.length(batch)
    counts = self.seen.setdefault(what, {})
    if n not in counts and self.verbose:
      print(f"data.pad_to={self.pad_to}: {what} batches of {n} tokens (new shape #"
            f"{len(counts) + 1}, compiled once)", flush=True)
    counts[n] = counts.get(n, 0) + 1
    return cut(batch, n, self.max_len)


def from_config(d, lengths, batch_size: int, max_len: int, verbose: bool = False) -> Padding:
  """The `Padding` of data section `d` (pad_to, buckets, pad_multiple; absent = max) for
  rows of at most max_len tokens; `lengths` (`row_lengths` of the training rows) choose
  the buckets when d.buckets is empty. verbose: print the choice (primary process)."""
  pad_to = d.get("pad_to", "max")
  multiple = int(d.get("pad_multiple", 8))
  bounds = ()
  if pad_to == "bucket":
    given = tuple(int(b) for b in d.get("buckets", ()))
    bounds = (tuple(sorted(set(given) | {int(max_len)})) if given else
              auto_buckets(lengths, batch_size, max_len, multiple))
  p = Padding(pad_to, int(max_len), bounds, multiple, verbose)
  if verbose and pad_to != "max":
    lengths = np.asarray(lengths)
    what = (f"boundaries {list(bounds)} ({'data.buckets' if d.get('buckets', ()) else 'from the training lengths'})"
            if pad_to == "bucket" else f"multiples of {multiple}")
    print(f"data.pad_to={pad_to}: {what}; training rows {len(lengths)}, length median "
          f"{int(np.median(lengths))}, max {int(lengths.max())} of {max_len}", flush=True)
  return p


def validate(d, max_len: int | None, check) -> None:
  """The data.pad_to / data.buckets / data.pad_multiple checks (`rlhf_jax.config.Checks`
  `check`; max_len = the rows' configured length when known). ConfigError naming the key."""
  if "pad_to" not in d:
    return
  check.choice("data.pad_to", PAD_TO)
  check.num("data.pad_multiple", 1, integer=True)
  b = d.buckets
  ok = isinstance(b, (tuple, list)) and all(
      isinstance(x, int) and not isinstance(x, bool) for x in b)
  check.need(ok, "data.buckets", f"expected a tuple of token counts, e.g. (256, 512), got {b!r}")
  check.need(all(x >= 1 for x in b), "data.buckets", f"every boundary must be >= 1, got {tuple(b)}")
  check.need(list(b) == sorted(set(b)), "data.buckets",
             f"boundaries must be strictly increasing, got {tuple(b)}")
  if max_len is not None and b:
    check.need(b[-1] <= max_len, "data.buckets",
               f"boundary {b[-1]} exceeds the rows' length {max_len} (the last bucket is "
               f"always that length)")
  check.need(not b or d.pad_to == "bucket", "data.buckets",
             f"set with data.pad_to={d.pad_to!r}; boundaries are used only with pad_to=bucket")


def configured_len(d) -> int | None:
  """The rows' configured length of data section `d`: max_seq_len (SFT), max_prompt_len
  + max_completion_len (pairs), max_len (PRM); None when it is not a number."""
  keys = ((("max_seq_len",), ("max_prompt_len", "max_completion_len"), ("max_len",)))
  for ks in keys:
    if all(k in d for k in ks):
      vals = [d[k] for k in ks]
      if all(isinstance(v, int) and not isinstance(v, bool) for v in vals):
        return sum(vals)
      return None
  return None
