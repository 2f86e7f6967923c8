"""Attention backends behind one function: `attend(q, k, v, mask, backend=...)`.

Every backend computes the same grouped-query attention (H query heads share K
kv heads, G = H / K):

    out[b, t, h] = sum_s softmax_s(scale * q[b, t, h] . k[b, s, h // G] | visible)[s] v[b, s, h // G]

with one visibility rule for every mask the model uses (`AttentionMask`):

    visible(t, s) = kv_seg[s] > 0  and  kv_idx[s] <= q_idx[t]
                    and (kv_seg[s] == q_seg[t]  or  (shared_prefix and kv_seg[s] == 1))

* kind "causal": causal attention within a segment; segment id 0 is padding (left or
  right), several positive ids in one row are packed sequences.
* kind "shared_prefix": rows packed as [prefix | continuation 1 | continuation 2 ...]
  (`transformer.pack_shared_prefix`): segment 1 is a prefix every later segment sees.
* kind "cached": decoding against a KV cache. The keys are the S cache slots (visible
  iff filled before this call: kv_seg) and then the T new tokens themselves (causal
  among themselves, new_segment_BT marks the real ones). The cache is read, never
  copied (the caller writes the new K/V once after the layers).

A query that sees no key gets the uniform average of the values (dense: softmax of
equal -1e30 logits; chunked reproduces it), never NaN.

Backends (`ModelConfig.attention`):

  dense    the reference: float32 scores [B, K, G, T, S] and a boolean mask; supports
           every kind. Memory O(T S) per head, kept for the backward pass.
  chunked  memory-efficient attention written here in plain JAX (blockwise with an
           online softmax, Rabe & Staats 2021; FlashAttention-2's backward, Dao 2023:
           only the output and the row log-sum-exp are saved, the scores are
           recomputed block by block). Runs on every platform including CPU;
           memory O(T * block). Written by hand because no kernel shipped with JAX runs
           on CPU with segment ids, a shared prefix and a KV cache at O(T) memory
           (jax.nn.dot_product_attention's "xla" path materialises [T, S]).
  cudnn    jax.nn.dot_product_attention(implementation="cudnn") on GPU (cuDNN flash
           attention), with the visibility rule passed as a boolean mask.
  splash   the Pallas splash-attention TPU kernel shipped with JAX
           (jax.experimental.pallas.ops.tpu.splash_attention) with causal + segment ids;
           kind "causal" only (it cannot express a shared prefix or a KV cache).
  auto     the best available on the running platform for the kind (`resolve`).
"""
from __future__ import annotations

BACKENDS = ("auto", "dense", "chunked", "cudnn", "splash")
MASK_KINDS = ("causal", "shared_prefix", "cached")
