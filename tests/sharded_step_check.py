"""Run by tests/test_sharding.py in its own process with 8 simulated CPU devices.

Usage: sharded_step_check.py ACCUM MESH... [+ ACCUM MESH...]
(e.g. 1 8,1,1 2,4,1 2,2,2 + 2 2,2,2: several groups in one process).
Per group, one SFT train step (AdamW lr 1e-3, grad clipping) with ACCUM gradient-accumulation
micro-batches on (1,1,1) and each MESH; prints JSON {ACCUM: results}: per mesh, the max
|difference| of loss and of
every parameter after the step versus the single-device step, and the mesh
axes of a few parameters' shardings (to prove they really are sharded).
"""
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from rlhf_jax import parallel
from rlhf_jax.models import ModelConfig, Transformer
from rlhf_jax.trainers import optim, sft
from rlhf_jax.trainers import state as state_lib


def main():
  assert jax.device_count() == 8, f"need 8 devices, got {jax.device_count()}"
  out, group = {}, []
  for arg in sys.argv[1:] + ["+"]:
    if arg != "+":
      group.append(arg)
      continue
    out[group[0]] = run(int(group[0]), group[1:])
    group = []
  print(json.dumps(out))


def run(accum, mesh_args):
  cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                    head_dim=8, d_ff=64, tie_embeddings=False)
  model = Transformer(cfg)
  opt = ConfigDict(dict(lr=1e-3, warmup_steps=0, final_lr_ratio=1.0, b1=0.9, b2=0.95,
                        eps=1e-8, weight_decay=0.01, grad_clip_norm=1.0))
  tx, _ = optim.make_optimizer(opt, 10)
  rng = np.random.default_rng(0)
  B, T = 8, 16
  lengths = rng.integers(4, T + 1, size=B)
  seg = (np.arange(T)[None] < lengths[:, None]).astype(np.int32)
  batch = {"tokens": (rng.integers(0, 64, size=(B, T)) * seg).astype(np.int32),
           "segment_ids": seg,
           "loss_mask": (seg * (np.arange(T)[None] >= 2)).astype(np.int32)}
  dummy = jnp.zeros((1, 2), jnp.int32)
  results = {}
  ref = None
  meshes = [(1, 1, 1)] + [tuple(int(x) for x in m.split(",")) for m in mesh_args]
  for shape in meshes:
    devices = jax.devices()[:int(np.prod(shape))]
    mesh = parallel.make_mesh(shape, devices)
    state, shardings = state_lib.create_state(lambda r: model.init(r, dummy)["params"], tx, mesh,
                                           jax.random.PRNGKey(0))
    step = jax.jit(sft.make_train_step(model, tx, accum),
                   in_shardings=(shardings, parallel.batch_sharding(mesh)),
                   out_shardings=(shardings, parallel.replicated(mesh)))
    new_state, metrics = step(state, parallel.shard_batch(batch, mesh))
    params = jax.tree.map(np.asarray, jax.device_get(new_state["params"]))
    loss = float(metrics["loss"])
    q_spec = new_state["params"]["layers"]["q"]["kernel"].sharding.spec
    emb_spec = new_state["params"]["embed"]["embedding"].sharding.spec
    mu_spec = jax.tree.leaves(new_state["opt_state"].inner[1][0].mu)[0].sharding.spec
    if ref is None:
      ref = (loss, params)
    diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))),
                                         params, ref[1]))
    results[str(shape)] = {"loss": loss, "loss_diff": abs(loss - ref[0]),
                           "max_param_diff": max(diffs),
                           "param_change": max(jax.tree.leaves(jax.tree.map(
                               lambda a, b: float(np.max(np.abs(a - np.asarray(b)))), params,
                               jax.device_get(state["params"])))),
                           "q_kernel_spec": [str(s) for s in q_spec],
                           "q_kernel_replicated":
                               new_state["params"]["layers"]["q"]["kernel"].sharding.is_fully_replicated,
                           "grad_norm": float(metrics["grad_norm"]),
                           "embed_spec": [str(s) for s in emb_spec],
                           "adam_mu_first_leaf_spec": [str(s) for s in mu_spec]}
  return results


if __name__ == "__main__":
  main()
