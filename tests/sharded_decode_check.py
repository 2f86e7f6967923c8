"""Run by tests/test_sampling_scale.py in its own process with 8 simulated CPU devices.

Usage: sharded_decode_check.py MESH... (e.g. 2,2,2 4,1,2).
Samples from a tiny model on one device (the reference), then for each MESH with the
parameters sharded by `parallel.LOGICAL_RULES` (so `generate` shards the KV cache
over the parameters' mesh), per-row prefill (G = 1) and shared prefill (G = 4).
Prints JSON: per mesh and G, whether the tokens equal the reference, the max
|logprob difference|, the KV-cache shapes in the partitioned (compiled) HLO of
`generate` (per-device shards: a sharded cache never appears whole) and the
sharding spec `parallel.kv_cache_sharding` gives the cache.
"""
import json
import re
import sys

import jax
import numpy as np

from rlhf_jax import parallel, sampling
from rlhf_jax.models import ModelConfig, init_params

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                  d_ff=64, max_seq_len=64)
LENGTHS = [7, 3]           # two prompts ...
G = 4                      # ... of four samples each: B = 8 rows
MAX_NEW = 6


def _prompts():
  rng = np.random.default_rng(0)
  P = max(LENGTHS)
  mask = (np.arange(P)[None, :] >= P - np.array(LENGTHS)[:, None]).astype(np.int32)
  tokens = np.where(mask > 0, rng.integers(1, CFG.vocab_size, (len(LENGTHS), P)), 0)
  return np.repeat(tokens.astype(np.int32), G, 0), np.repeat(mask, G, 0)


def _sample_args(tokens, mask, group_size, mesh):
  kw = dict(max_new_tokens=MAX_NEW, temperature=1.0, eos_id=None, pad_id=0,
            group_size=group_size)
  if mesh is not None:
    kw["mesh"] = mesh
  return (tokens, mask, jax.random.PRNGKey(1)), kw


def _cache_shapes(hlo: str, B: int, S: int):
  """Distinct shapes f32[L, b, S, k, Dh] in partitioned HLO text (the KV-cache buffers and
  their per-device shards), as [L, b, S, k, Dh] lists."""
  L, Dh = CFG.n_layers, CFG.head_dim
  pat = re.compile(rf"f32\[{L},(\d+),{S},(\d+),{Dh}\]")
  return sorted({(L, int(b), S, int(k), Dh) for b, k in pat.findall(hlo)})


def main():
  assert jax.device_count() == 8, f"need 8 devices, got {jax.device_count()}"
  params = jax.jit(init_params, static_argnums=0)(CFG, jax.random.PRNGKey(0))
  params = jax.tree.map(lambda x: x * 20.0 if x.ndim > 1 else x, params)  # peaked
  tokens, mask = _prompts()
  B, P = tokens.shape
  S = P + MAX_NEW - 1
  args, kw = _sample_args(tokens, mask, 1, None)
  ref = sampling.generate(CFG, params, *args, **kw)
  ref_tokens, ref_logps = np.asarray(ref.tokens_BN), np.asarray(ref.logprobs_BN)
  results = {"ref_distinct_rows_in_group": int(len({tuple(r) for r in ref_tokens[:G]}))}
  for arg in sys.argv[1:]:
    shape = tuple(int(x) for x in arg.split(","))
    mesh = parallel.make_mesh(shape, jax.devices()[:int(np.prod(shape))])
    shardings = parallel.boxed_shardings(
        lambda: init_params(CFG, jax.random.PRNGKey(0), boxed=True), mesh)
    sharded = jax.device_put(params, shardings)
    assert parallel.mesh_of(sharded) is mesh
    for group_size in (1, G):
      args, kw = _sample_args(tokens, mask, group_size, None)
      out = sampling.generate(CFG, sharded, *args, **kw)        # mesh="auto": params' mesh
      # The same call, compiled: the partitioned HLO of the whole generate.
      dtype = sampling.resolve_kv_cache_dtype(CFG)
      hlo = sampling._generate.lower(
          CFG, sharded, tokens, mask, args[2], np.float32(1.0), np.float32(1.0),
          max_new_tokens=MAX_NEW, top_k=0, use_top_p=False, greedy=False, eos_ids=(),
          pad_id=0, group_size=group_size, kv_cache_dtype=dtype, mesh=mesh).compile().as_text()
      results[f"{shape} G={group_size}"] = {
          "tokens_equal": bool(np.array_equal(np.asarray(out.tokens_BN), ref_tokens)),
          "max_logprob_diff": float(np.abs(np.asarray(out.logprobs_BN) - ref_logps).max()),
          "cache_shapes": _cache_shapes(hlo, B, S),
          "cache_spec": [None if a is None else a if isinstance(a, str) else list(a)
                         for a in parallel.kv_cache_sharding(mesh, (2, B, S, 2, 8)).spec],
          "prefill_spec": [None if a is None else a if isinstance(a, str) else list(a)
                           for a in parallel.kv_cache_sharding(
                               mesh, (2, B // group_size, S, 2, 8)).spec],
      }
    # The unconstrained program on the same sharded params (mesh=None), for comparison.
    hlo = sampling._generate.lower(
        CFG, sharded, tokens, mask, jax.random.PRNGKey(1), np.float32(1.0), np.float32(1.0),
        max_new_tokens=MAX_NEW, top_k=0, use_top_p=False, greedy=False, eos_ids=(), pad_id=0,
        group_size=1, kv_cache_dtype="float32", mesh=None).compile().as_text()
    results[f"{shape} unconstrained"] = {"cache_shapes": _cache_shapes(hlo, B, S)}
  print(json.dumps(results))


if __name__ == "__main__":
  main()
