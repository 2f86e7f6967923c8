"""Attention backends side by side: seconds per forward+backward and XLA's compiled
scratch, per sequence length (one process, interleaved, medians).

    .venv/bin/python benchmarks/attention.py [--lengths=512,2048,8192] [--backends=dense,chunked]
        [--heads=8] [--kv_heads=2] [--head_dim=64] [--block=512] [--repeats=5] [--dtype=float32]

The `auto` rule's CPU threshold (attention.AUTO_DENSE_MAX_KEYS) comes from this table:
dense is the faster path on XLA:CPU at short lengths, chunked keeps memory linear.
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.models import attention as A
from rlhf_jax.models.attention_mask import causal_mask


def bench(backend, T, args):
  dt = jnp.dtype(args.dtype)
  H, K, Dh = args.heads, args.kv_heads, args.head_dim
  mask = causal_mask(jnp.ones((1, T), jnp.int32))
  loss = lambda q, k, v: jnp.sum(A.attend(q, k, v, mask, backend=backend, block_q=args.block,
                                          block_k=args.block).astype(jnp.float32))
  f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(1, T, H, Dh)), dt)
  k = jnp.asarray(rng.normal(size=(1, T, K, Dh)), dt)
  v = jnp.asarray(rng.normal(size=(1, T, K, Dh)), dt)
  compiled = f.lower(q, k, v).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  jax.block_until_ready(compiled(q, k, v))
  times = []
  for _ in range(args.repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(q, k, v))
    times.append(time.perf_counter() - t0)
  return statistics.median(times), temp


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--lengths", default="512,1024,2048,4096")
  ap.add_argument("--backends", default="dense,chunked")
  ap.add_argument("--heads", type=int, default=8)
  ap.add_argument("--kv_heads", type=int, default=2)
  ap.add_argument("--head_dim", type=int, default=64)
  ap.add_argument("--block", type=int, default=A.DEFAULT_BLOCK_Q)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--dtype", default="float32")
  args = ap.parse_args(argv)
  backends = args.backends.split(",")
  print(f"{jax.default_backend()} {jax.devices()[0].device_kind}, H={args.heads} "
        f"K={args.kv_heads} Dh={args.head_dim} block={args.block} {args.dtype}; "
        f"forward+backward of one causal row, median of {args.repeats}")
  print("| T | " + " | ".join(f"{b} s | {b} scratch MiB" for b in backends)
        + " | chunked / dense time |")
  print("|---" * (2 * len(backends) + 2) + "|")
  for T in map(int, args.lengths.split(",")):
    res = {b: bench(b, T, args) for b in backends}
    ratio = (f"{res['chunked'][0] / res['dense'][0]:.2f}"
             if "chunked" in res and "dense" in res else "-")
    print(f"| {T} | " + " | ".join(f"{res[b][0]:.4f} | {res[b][1] / 2**20:,.1f}"
                                   for b in backends) + f" | {ratio} |", flush=True)


if __name__ == "__main__":
  main()
