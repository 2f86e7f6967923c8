"""The accelerator attention backends: kernels shipped with JAX, adapted to `AttentionMask`.

  cudnn   jax.nn.dot_product_attention(implementation="cudnn") on GPU (cuDNN flash
          attention), with the visibility rule passed as a boolean mask.
  splash  the Pallas splash-attention TPU kernel (causal + segment ids; no decode mode,
          no shared-prefix mask).

Selected through `rlhf_jax.models.attention.attend` (module docstring there).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

# ----------------------------------------------------------------------------
# cudnn (GPU) and splash (TPU): kernels shipped with JAX
# ----------------------------------------------------------------------------

def _sees_any(vis_BTS):
  return jnp.any(vis_BTS, axis=-1)[:, :, None, None]


def _cudnn(q_BTHd, k_BSKd, v_BSKd, mask, scale, new_k_BTKd=None, new_v_BTKd=None,
           implementation: str | None = "cudnn"):
  """jax.nn.dot_product_attention (cuDNN flash attention on GPU) with the visibility rule
  as its boolean mask [B, 1, T, S] (cuDNN takes it as an additive bias; the kernel
  still never keeps the [T, S] probabilities for the backward pass). For a KV cache the
  new keys are appended to the cache's (one copy per layer). Rows that see no key give
  0 (cuDNN's softmax of an all-masked row is not defined). `implementation=None` runs
  the same call through XLA, which is how the adapter is tested on CPU."""
  vis = mask.dense_matrix()
  if mask.kind == "cached":
    old, new = vis
    vis = jnp.concatenate([old, new], axis=-1)
    k_BSKd = jnp.concatenate([k_BSKd, new_k_BTKd], axis=1)
    v_BSKd = jnp.concatenate([v_BSKd, new_v_BTKd], axis=1)
  dt = v_BSKd.dtype
  out = jax.nn.dot_product_attention(q_BTHd.astype(dt), k_BSKd.astype(dt), v_BSKd,
                                     mask=vis[:, None], scale=scale,
                                     implementation=implementation)
  return jnp.where(_sees_any(vis), out, 0).astype(dt)


def _splash(q_BTHd, k_BSKd, v_BSKd, mask, scale, interpret: bool = False):
  """The Pallas splash-attention TPU kernel (jax.experimental.pallas.ops.tpu), causal
  with segment ids; one kernel per kv head over its G query heads (`make_splash_mqa`),
  vmapped over the batch and the kv heads. T is padded to the kernel's block size
  (padding is segment 0, which no real query sees). `interpret=True` runs the kernel
  in the Pallas interpreter (CPU tests)."""
  from jax.experimental.pallas.ops.tpu.splash_attention import (  # pylint: disable=g-import-not-at-top
      splash_attention_kernel as sk, splash_attention_mask as sm)
  B, T, H, Dh = q_BTHd.shape
  K = k_BSKd.shape[2]
  G = H // K
  block = 128
  L = -(-T // block) * block
  pad = lambda x: jnp.pad(x, [(0, 0), (0, L - T)] + [(0, 0)] * (x.ndim - 2))
  seg = pad(mask.q_segment_BT)
  dt = v_BSKd.dtype
  q = pad(q_BTHd * jnp.asarray(scale, q_BTHd.dtype)).reshape(B, L, K, G, Dh)
  q_BKGLd = jnp.transpose(q, (0, 2, 3, 1, 4))
  k_BKLd = jnp.transpose(pad(k_BSKd), (0, 2, 1, 3))
  v_BKLd = jnp.transpose(pad(v_BSKd), (0, 2, 1, 3))
  sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                        block_q_dq=block, block_kv_dq=block)
  heads = sm.MultiHeadMask([sm.CausalMask((L, L)) for _ in range(G)])
  kernel = sk.make_splash_mqa(heads, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                              interpret=interpret)
  def one(q_GLd, k_Ld, v_Ld, seg_L):
    return kernel(q_GLd, k_Ld, v_Ld, segment_ids=sk.SegmentIds(q=seg_L, kv=seg_L))
  per_head = jax.vmap(one, in_axes=(0, 0, 0, None))                # over kv heads
  out_BKGLd = jax.vmap(per_head)(q_BKGLd, k_BKLd, v_BKLd, seg)
  out = jnp.transpose(out_BKGLd, (0, 3, 1, 2, 4)).reshape(B, L, H, Dh)[:, :T]
  sees = (mask.q_segment_BT > 0)[:, :, None, None]
  return jnp.where(sees, out, 0).astype(dt)
