"""Run by tests/test_memory.py in its own process with 8 simulated CPU devices.

Builds the SFT train state on a (8, 1, 1) mesh (pure data parallelism: replicated)
and a (1, 8, 1) mesh (FSDP) and prints JSON: per mesh, the bytes of params and
AdamW state held by device 0.
"""
import json

import jax
import jax.numpy as jnp
from ml_collections import ConfigDict

from rlhf_jax import parallel
from rlhf_jax.models import ModelConfig, Transformer
from rlhf_jax.trainers import optim
from rlhf_jax.trainers import state as state_lib


def main():
  assert jax.device_count() == 8, f"need 8 devices, got {jax.device_count()}"
  cfg = ModelConfig(vocab_size=256, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2,
                    head_dim=32, d_ff=256)
  model = Transformer(cfg)
  opt = ConfigDict(dict(lr=1e-3, warmup_steps=0, final_lr_ratio=1.0, b1=0.9, b2=0.95,
                        eps=1e-8, weight_decay=0.01, grad_clip_norm=1.0))
  tx, _ = optim.make_optimizer(opt, 10)

  dummy = jnp.zeros((1, 2), jnp.int32)
  out = {}
  for shape in [(8, 1, 1), (1, 8, 1)]:
    mesh = parallel.make_mesh(shape)
    state, shardings = state_lib.create_state(lambda r: model.init(r, dummy)["params"], tx,
                                           mesh, jax.random.PRNGKey(0))
    dev0 = jax.devices()[0]

    def on_dev0(tree):
      return sum(s.data.nbytes for leaf in jax.tree.leaves(tree)
                 for s in leaf.addressable_shards if s.device == dev0)

    out[str(shape)] = {
        "params": on_dev0(state["params"]), "opt_state": on_dev0(state["opt_state"]),
        "total_params_bytes": sum(x.nbytes for x in jax.tree.leaves(state["params"]))}
  print(json.dumps(out))


if __name__ == "__main__":
  main()
