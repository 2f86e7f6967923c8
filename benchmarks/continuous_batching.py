"""Rollout throughput: continuous vs static batching on a long tail of lengths (a benchmark).

B rows are sampled by a tiny random model, as `rollout.generate_rollout` does:

    static       `sampling.generate` on micro-batches of --slots rows (row_offset = first
                 row): each call decodes until its longest row has stopped
    continuous   `sampling_continuous.generate_continuous` with --slots decode slots,
                 each refilled with the next row as soon as its row stops

Lengths are forced by a synthetic stopping rule, a per-row budget (`max_new_tokens_B`,
no stop id): --long_frac of the rows (random positions, seeded) run to max_new_tokens,
the others stop after a uniform 1..--short_max tokens. Both samplers produce the same
tokens (checked); the figure is generated tokens (the sum of the lengths) per second of
wall time after a compile warm-up, the median of --repeats runs, the two samplers run
alternately in one process.

    .venv/bin/python benchmarks/continuous_batching.py [--rows=128 --slots=16]
"""
import argparse
import datetime
import os
import platform
import statistics
import time

import jax
import numpy as np

from rlhf_jax.models import ModelConfig, init_params
from rlhf_jax.sampling import generate
from rlhf_jax.sampling_continuous import generate_continuous


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--rows", type=int, default=128)
  ap.add_argument("--slots", type=int, default=16)
  ap.add_argument("--prompt_len", type=int, default=16)
  ap.add_argument("--max_new_tokens", type=int, default=256)
  ap.add_argument("--short_max", type=int, default=32)
  ap.add_argument("--long_frac", type=float, default=0.1)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--d_model", type=int, default=128)
  ap.add_argument("--layers", type=int, default=4)
  ap.add_argument("--vocab", type=int, default=1024)
  ap.add_argument("--seed", type=int, default=0)
  a = ap.parse_args()
  B, S, P, N = a.rows, a.slots, a.prompt_len, a.max_new_tokens
  if B % S:
    raise SystemExit(f"--rows={B} must be a multiple of --slots={S}")
  cfg = ModelConfig(vocab_size=a.vocab, d_model=a.d_model, n_layers=a.layers, n_heads=4,
                    n_kv_heads=2, head_dim=a.d_model // 4, d_ff=4 * a.d_model,
                    max_seq_len=P + N)
  params = jax.jit(init_params, static_argnums=0)(cfg, jax.random.PRNGKey(a.seed))
  rng = np.random.default_rng(a.seed)
  n_B = rng.integers(1, P + 1, B)                              # ragged prompts
  mask = (np.arange(P)[None] >= P - n_B[:, None]).astype(np.int32)
  tokens = np.where(mask > 0, rng.integers(1, a.vocab, (B, P)), 0).astype(np.int32)
  budget = rng.integers(1, a.short_max + 1, B)
  budget[rng.permutation(B)[:max(1, round(a.long_frac * B))]] = N
  key = jax.random.PRNGKey(a.seed + 1)
  kw = dict(max_new_tokens=N, temperature=1.0, eos_id=None, pad_id=0)

  def static():
    outs = [generate(cfg, params, tokens[i:i + S], mask[i:i + S], key, row_offset=i,
                     max_new_tokens_B=budget[i:i + S], **kw) for i in range(0, B, S)]
    return np.concatenate([np.asarray(o.tokens_BN) for o in outs])

  def continuous():
    out = generate_continuous(cfg, params, tokens, mask, key, num_slots=S,
                              max_new_tokens_B=budget, **kw)
    return np.asarray(out.tokens_BN)

  runs = {"static": static, "continuous": continuous}
  t0 = time.perf_counter()
  first = {name: fn() for name, fn in runs.items()}             # compile + warm up
  same = np.array_equal(first["static"], first["continuous"])
  warm = time.perf_counter() - t0
  times = {name: [] for name in runs}
  for _ in range(a.repeats):
    for name, fn in runs.items():
      t = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t)
  gen = int(budget.sum())
  static_steps = sum(int(budget[i:i + S].max()) for i in range(0, B, S))
  print(f"# {datetime.date.today()}  {platform.node()}  {platform.processor() or platform.machine()}"
        f"  {os.cpu_count()} CPUs  jax {jax.__version__} {jax.default_backend()}")
  print(f"# model d={a.d_model} L={a.layers} V={a.vocab}; rows={B} slots={S} P={P} "
        f"N={N}; {int((budget == N).sum())} rows of {N} tokens, the others 1..{a.short_max}; "
        f"{gen} generated tokens (static decodes {static_steps * S} row-steps)")
  print(f"# same tokens: {same}; compile + first runs {warm:.1f} s; {a.repeats} repeats")
  print(f"{'sampler':<12} {'median s':>9} {'tokens/s':>10}   runs (s)")
  med = {n: statistics.median(t) for n, t in times.items()}
  for n, t in times.items():
    print(f"{n:<12} {med[n]:9.3f} {gen / med[n]:10.0f}   {' '.join(f'{x:.3f}' for x in t)}")
  print(f"speedup continuous / static: {med['static'] / med['continuous']:.2f}x")


if __name__ == "__main__":
  main()
