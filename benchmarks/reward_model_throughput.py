"""Reward-model training throughput (a benchmark, not a test).

Builds the `configs/rm.py:<preset>` model and its synthetic preference batches,
compiles the jitted train step once, then times `--steps` steps (blocking on
each), repeated `--repeats` times. Prints tokens/s (real, non-pad tokens of both
replies) and pairs/s as medians with the spread, plus the setup.

    .venv/bin/python benchmarks/reward_model_throughput.py [--preset=tiny]
"""
import argparse
import os
import platform
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--preset", default="tiny")
  ap.add_argument("--steps", type=int, default=20)
  ap.add_argument("--repeats", type=int, default=5)
  args = ap.parse_args()

  from rlhf_jax import parallel
  from rlhf_jax.config import model_config
  from rlhf_jax.data.sft import batched
  from rlhf_jax.launch import load_config
  from rlhf_jax.models.heads import ScalarModel
  from rlhf_jax.data import pairs
  from rlhf_jax.trainers import optim, reward_model, setup
  from rlhf_jax.trainers import state as state_lib

  config = load_config(f"configs/rm.py:{args.preset}")
  with tempfile.TemporaryDirectory() as wd:
    train_src, _, _ = pairs.load_pairs(config, wd)
    tok = setup.build_tokenizer(config, wd, lambda: pairs.corpus(train_src))
    arrays, _ = pairs.tokenize(config, tok, train_src)
  ds = batched(arrays, config.batch_size, config.seed)
  mesh = parallel.make_mesh(config.mesh.shape)
  mcfg = model_config(config, vocab_size=tok.vocab_size)
  model = ScalarModel(mcfg)
  tx, _ = optim.make_optimizer(config.optimizer, config.num_steps)
  dummy = jnp.zeros((1, 2), jnp.int32)
  state, shardings = state_lib.create_state(lambda r: model.init(r, dummy)["params"], tx, mesh,
                                         jax.random.PRNGKey(0))
  step = jax.jit(reward_model.make_train_step(model, tx, 0.0, True),
                 in_shardings=(shardings, parallel.batch_sharding(mesh)),
                 out_shardings=(shardings, parallel.replicated(mesh)), donate_argnums=0)
  batches = [parallel.shard_batch(ds[i], mesh) for i in range(args.steps)]
  tokens = sum(int(ds[i]["chosen_segment_ids"].sum() + ds[i]["rejected_segment_ids"].sum())
               for i in range(args.steps))
  t0 = time.perf_counter()
  state, m = step(state, batches[0])
  jax.block_until_ready(m)
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(args.repeats):
    t0 = time.perf_counter()
    for b in batches:
      state, m = step(state, b)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t0)
  med = statistics.median(times)
  T = arrays["chosen_tokens"].shape[1]
  print(f"reward model [{args.preset}] {mcfg.num_params() / 1e6:.2f}M params, batch "
        f"{config.batch_size} pairs x T={T}, {jax.device_count()}x{jax.devices()[0].platform} "
        f"({platform.processor() or platform.machine()}, {os.cpu_count()} cores)")
  print(f"compile + first step: {compile_s:.1f} s")
  print(f"train tokens/s (non-pad, both replies): median {tokens / med:,.0f} "
        f"(min {tokens / max(times):,.0f}, max {tokens / min(times):,.0f}) over {args.repeats} "
        f"x {args.steps} steps")
  print(f"pairs/s: median {config.batch_size * args.steps / med:,.1f}; "
        f"step time median {1e3 * med / args.steps:.1f} ms")


if __name__ == "__main__":
  main()
