"""Compute accounting: model FLOPs from the model's shapes, and the cumulative counters
every trainer logs (`Counters`: flops/* and tokens/* in metrics.jsonl).

One formula, from `ModelConfig` (D model width, F MLP width, H / K query / kv heads of
size Dh, L layers, V vocabulary), 2 FLOPs per multiply-add, matmuls only (norms, RoPE,
softmax, activations, the optimizer and the input embedding gather are not counted):

  per token, blocks   M = 2 L (D Dh (H + 2K) + H Dh D + 3 D F)   q, k, v (GQA), o, gated MLP
  per unembedded pos  U = 2 V D                                  (a scalar head: 2 D)
  per (query, key)    A = 4 L H Dh                               QK^T and PV, 2 H Dh each

  forward  F(R rows x T tokens, u unembedded per row)
           = R (T M + u U + A T (T + 1) / 2)      causal: query i sees keys 0..i
  prefill  = F(R x P, u = 1)                      (the sampler unembeds the last position)
  decode   n steps against a cache filled to P:   R sum_k=1..n (M + U + A (P + k))
  update   forward + backward = F + 2F = 3F       (backward: grads of activations + weights)
  remat    recompute of the backward pass, per `ModelConfig.resolved_remat_policy`
           (`remat_flops`, approximate: which matmuls each policy recomputes)
             none           0
             full           the whole block forward: R (T M + A T (T + 1) / 2)
             dots           0 (every matmul output is saved; only elementwise ops rerun)
             dots_no_batch  the attention einsums: R A T (T + 1) / 2
             qkv_proj       all but the q/k/v projections: attention, o and the MLP

FLOPs use padded shapes (what the hardware runs: the rows and lengths of the arrays
passed to the jitted functions; pad tokens and the masked pairs of packed segments are
counted, the masked upper triangle of a dense T x T attention is not; with the offline
trainers' `data.pad_to` = longest / bucket, T is each step's own padded length, so the
counters follow the shapes actually run). tokens/* count real (unpadded) tokens;
samples/completions the sequences learned from (SAMPLE_KEYS). Without the attention
term and with U counted once per token,
3F = 6 N T, the approximation of Kaplan et al. 2020 ("Scaling Laws for Neural Language
Models", C = 6 N per token, N = non-embedding parameters); the attention term is
that of Hoffmann et al. 2022 (Chinchilla, appendix F), there 2 x 2 T D_attn per token
and layer without the causal halving. Decode counts the keys a step attends to (P + k),
not the slots of the allocated cache.

The throughput benchmark (experiments/throughput/spec.py) and the accelerator check
(experiments/accelerator/check.py) compute MFU from these functions too. This module
imports nothing beyond the standard library (spec.py loads it by path in peer venvs).
"""
from __future__ import annotations

import json
import os

# Cumulative counters in every metrics.jsonl row (and flops/total, their FLOPs' sum).
FLOP_KEYS = ("flops/generate", "flops/logprob_passes", "flops/update", "flops/remat")
TOKEN_KEYS = ("tokens/sampled", "tokens/trained")
# Completions (sequences) a step learned from, once per step whatever the epochs: sampled
# (PPO / GRPO: prompts_per_step * group_size), or read from the data (DPO: every side of
# every pair, so 2 per pair; RM: 2 per pair; SFT: examples, packed ones counted apart;
# PRM: rows). The x axis of the report's "equal samples" comparison.
SAMPLE_KEYS = ("samples/completions",)
KEYS = FLOP_KEYS + TOKEN_KEYS + SAMPLE_KEYS
TOTAL = "flops/total"
COUNTERS_FILE = "compute_counters.jsonl"  # the counters at each checkpointed step


def _dims(c):
  return (c.d_model, c.d_ff, c.n_heads, c.n_kv_heads, c.head_dim, c.vocab_size, c.n_layers)


def qkv_flops_per_token(c) -> int:
  D, F, H, K, Dh, V, L = _dims(c)
  return 2 * L * D * Dh * (H + 2 * K)


def block_flops_per_token(c) -> int:
  """M: the block matmuls of one token (q, k, v, o projections and the gated MLP)."""
  D, F, H, K, Dh, V, L = _dims(c)
  return qkv_flops_per_token(c) + 2 * L * (H * Dh * D + 3 * D * F)


def unembed_flops(c) -> int:
  """U: one position's logits (2 V D)."""
  return 2 * c.vocab_size * c.d_model


def attention_flops_per_pair(c) -> int:
  """A: QK^T and PV of one (query, key) pair over all layers and heads."""
  return 4 * c.n_layers * c.n_heads * c.head_dim


def causal_pairs(T: int) -> int:
  return T * (T + 1) // 2


def matmul_params(c, unembed: bool = True) -> int:
  """N: the matmul parameters (blocks [+ unembedding]); 2 N FLOPs per token."""
  return block_flops_per_token(c) // 2 + (unembed_flops(c) // 2 if unembed else 0)


def forward_flops(c, rows: int, seq_len: int, unembed_per_row: int | None = None,
                  head_flops: int | None = None) -> int:
  """F: a forward pass over `rows` rows of `seq_len` tokens (causal), unembedding
  `unembed_per_row` positions of each (None = all); `head_flops` replaces U (e.g. 2 D
  for a scalar reward / value head)."""
  T = seq_len
  u = T if unembed_per_row is None else unembed_per_row
  U = unembed_flops(c) if head_flops is None else head_flops
  return rows * (T * block_flops_per_token(c) + u * U
                 + attention_flops_per_pair(c) * causal_pairs(T))


def remat_flops(c, rows: int, seq_len: int, policy: str | None = None) -> int:
  """The backward pass's recompute of one update over rows x seq_len (module docstring);
  policy None = c.resolved_remat_policy."""
  policy = c.resolved_remat_policy if policy is None else policy
  T = seq_len
  attn = rows * attention_flops_per_pair(c) * causal_pairs(T)
  blocks = rows * T * block_flops_per_token(c)
  if policy == "full":
    return blocks + attn
  if policy == "dots_no_batch":
    return attn
  if policy == "qkv_proj":
    return blocks - rows * T * qkv_flops_per_token(c) + attn
  return 0  # none, dots


def train_flops(c, rows: int, seq_len: int, unembed_per_row: int | None = None,
                head_flops: int | None = None) -> tuple[int, int]:
  """(update = 3F, remat recompute) of one forward + backward pass."""
  f = forward_flops(c, rows, seq_len, unembed_per_row, head_flops)
  return 3 * f, remat_flops(c, rows, seq_len)


def generate_flops(c, rows: int, prompt_len: int, decode_steps: int,
                   prefill_rows: int | None = None) -> int:
  """One sampler call (`sampling.generate`): prefill of `prefill_rows` (default rows;
  rows / G with a shared group prefill) prompts of prompt_len, then `decode_steps` steps
  of all rows (the while loop runs until every row stopped: max length - 1 steps),
  step k attending to P + k keys."""
  P, n = prompt_len, decode_steps
  pre = forward_flops(c, rows if prefill_rows is None else prefill_rows, P, 1)
  M, U, A = block_flops_per_token(c), unembed_flops(c), attention_flops_per_pair(c)
  return pre + rows * (n * (M + U) + A * (n * P + n * (n + 1) // 2))


def rollout_generate_flops(c, lengths_B, prompt_len: int, micro: int, prefill_group: int = 1) -> int:
  """`rollout.generate_rollout`'s sampler calls: the rows in chunks of `micro`, each
  decoding max(lengths) - 1 steps; prefill_group = the sampler's group_size."""
  lengths = [int(x) for x in lengths_B]
  total = 0
  for i in range(0, len(lengths), micro):
    chunk = lengths[i:i + micro]
    total += generate_flops(c, len(chunk), prompt_len, max(max(chunk) - 1, 0),
                            len(chunk) // prefill_group)
  return total


def window_flops(c, rows: int, prompt_len: int, window: int, group_size: int = 1) -> int:
  """A log-prob pass over the completion window (`models.api.window_logprobs`): rows of
  prompt_len + window tokens, `window` positions unembedded; group_size G > 1: every G
  rows packed into one of P + G W tokens, the prompt once."""
  G = group_size
  if G > 1:
    return forward_flops(c, rows // G, prompt_len + G * window, G * window)
  return forward_flops(c, rows, prompt_len + window, window)


def window_train_flops(c, rows: int, prompt_len: int, window: int,
                       group_size: int = 1) -> tuple[int, int]:
  """(update, remat) of a forward + backward over the window (as `window_flops`)."""
  G = group_size
  R, T = (rows // G, prompt_len + G * window) if G > 1 else (rows, prompt_len + window)
  return 3 * window_flops(c, rows, prompt_len, window, G), remat_flops(c, R, T)


def mfu_train_flops(c, rows: int, seq_len: int) -> tuple[float, float]:
  """(model FLOPs, remat-full recompute) of one LM training step over rows x seq_len:
  what the MFU / HFU of the benchmarks use (every position unembedded)."""
  update, _ = train_flops(c, rows, seq_len)
  return float(update), float(remat_flops(c, rows, seq_len, "full"))


# ----------------------------------------------------------------------------
# Cumulative counters
# ----------------------------------------------------------------------------

class Counters:
  """The cumulative compute counters of a run (KEYS, from step 0).

  `add(increments)` after each step; `row()` the metrics.jsonl keys (floats, plus
  flops/total). Resume-safe without touching the checkpoint: `saved(step)` appends the
  counters to WORKDIR/compute_counters.jsonl whenever a checkpoint is written, and a
  run resumed from step s starts from that file's row of step s, so it logs exactly
  what an uninterrupted run does. A resumed run without that row (started before the
  counters existed) logs none (`valid` False)."""

  def __init__(self, workdir: str, start: int = 0, enabled: bool = True):
    self.path = os.path.join(workdir, COUNTERS_FILE)
    self.enabled, self.valid = enabled, True
    self.totals = dict.fromkeys(KEYS, 0)
    if not start:
      if enabled and os.path.exists(self.path):
        os.remove(self.path)
      return
    rows = {}
    if os.path.exists(self.path):
      with open(self.path) as f:
        for line in f:
          try:
            r = json.loads(line)
          except json.JSONDecodeError:
            continue  # a line cut by a kill mid-write
          rows[r["step"]] = r
    if start in rows:
      self.totals = {k: int(rows[start].get(k, 0)) for k in KEYS}
    else:
      self.valid = False
      if enabled:
        print(f"compute counters: no row for step {start} in {self.path}; flops/* and "
              f"tokens/* are not logged by this resumed run", flush=True)

  def add(self, increments: dict) -> None:
    for k, v in increments.items():
      if k not in self.totals:
        raise KeyError(f"unknown compute counter {k!r}; expected one of {KEYS}")
      self.totals[k] += int(v)

  def row(self) -> dict:
    if not self.valid:
      return {}
    out = {k: float(v) for k, v in self.totals.items()}
    out[TOTAL] = float(sum(self.totals[k] for k in FLOP_KEYS))
    return out

  def saved(self, step: int) -> None:
    if self.enabled and self.valid:
      with open(self.path, "a") as f:
        f.write(json.dumps({"step": int(step), **self.totals}) + "\n")
