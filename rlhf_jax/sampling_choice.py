"""Next-token choice from float32 logits: temperature, top-k / top-p, Gumbel-max sampling.

`_choose` is one decode step's token choice in `rlhf_jax.sampling.generate`: greedy
argmax, or a sample from softmax(filtered logits / temperature) by the Gumbel-max trick
on uniform random bits (`gumbel_from_bits`); top-k / top-p (`filter_logits`) only
restrict which token is sampled, the reported log-prob is over the full vocabulary
(the convention in `rlhf_jax.sampling`'s module docstring).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def filter_logits(scaled_BV: Array, top_k: int = 0, top_p: Array | float | None = None) -> Array:
  """Logits with everything outside the top-k / top-p nucleus set to -inf.

  top-k (Fan et al. 2018): keep the k largest logits (ties at the k-th value
  are all kept). top-p / nucleus (Holtzman et al. 2020): keep the smallest set
  of most-likely tokens whose probability mass reaches p, i.e. token i (in
  descending order) is kept iff the mass strictly before it is < p; the top
  token is always kept. Applied after top-k, on the temperature-scaled logits.
  """
  V = scaled_BV.shape[-1]
  out = scaled_BV
  if 0 < top_k < V:
    kth_B1 = jax.lax.top_k(scaled_BV, top_k)[0][:, -1:]
    out = jnp.where(scaled_BV < kth_B1, -jnp.inf, out)
  if top_p is not None:
    sorted_BV = -jnp.sort(-out, axis=-1)                       # descending
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
    keep_BV = mass_before_BV < top_p
    n_keep_B1 = jnp.maximum(jnp.sum(keep_BV, axis=-1, keepdims=True), 1)
    threshold_B1 = jnp.take_along_axis(sorted_BV, n_keep_B1 - 1, axis=-1)
    out = jnp.where(out < threshold_B1, -jnp.inf, out)
  return out


def gumbel_from_bits(bits_BV: Array) -> Array:
  """Standard Gumbel noise -log(-log u) from uniform uint32 bits (u in [2^-23, 1): the
  23 high bits as a float32 mantissa, as `jax.random.uniform` does)."""
  one = jnp.array(1.0, jnp.float32).view(jnp.uint32)
  u = jax.lax.bitcast_convert_type((bits_BV >> 9) | one, jnp.float32) - 1.0
  u = jnp.maximum(u, jnp.float32(2.0 ** -23))
  return -jnp.log(-jnp.log(u))


def _choose(logits_BV, bits_BV, temperature, top_p, *, greedy, top_k, use_top_p):
  """(token_B int32, logprob_B float32) from float32 next-token logits and uint32 random
  bits of the same shape: the Gumbel-max trick, argmax(filtered logits + Gumbel noise),
  samples from softmax(filtered logits) (Gumbel 1954; as `jax.random.categorical`)."""
  logits_BV = logits_BV.astype(jnp.float32)
  if greedy:
    token_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logp_BV = jax.nn.log_softmax(logits_BV, axis=-1)
  else:
    scaled_BV = logits_BV / temperature
    logp_BV = jax.nn.log_softmax(scaled_BV, axis=-1)
    filtered_BV = filter_logits(scaled_BV, top_k, top_p if use_top_p else None)
    token_B = jnp.argmax(filtered_BV + gumbel_from_bits(bits_BV), axis=-1).astype(jnp.int32)
  logprob_B = jnp.take_along_axis(logp_BV, token_B[:, None], axis=-1)[:, 0]
  return token_B, logprob_B


# ----------------------------------------------------------------------------
# Per-row sampling noise: a function of (rng, row id, step) only
# ----------------------------------------------------------------------------

def _rotl(x, r: int):
  return (x << jnp.uint32(r)) | (x >> jnp.uint32(32 - r))


def threefry2x32(k0, k1, x0, x1):
  """The Threefry-2x32 block cipher, 20 rounds (Salmon et al. 2011; bit-equal to JAX's
  `threefry_2x32`), elementwise on broadcastable uint32 arrays, unrolled: XLA fuses it
  into one elementwise loop (JAX's own CPU lowering rolls the rounds into a loop, which
  inside every decode step cost more than the step's sampling work)."""
  ks = (k0, k1, k0 ^ k1 ^ jnp.uint32(0x1BD11BDA))
  rotations = ((13, 15, 26, 6), (17, 29, 16, 24))
  x0, x1 = x0 + ks[0], x1 + ks[1]
  for i in range(5):
    for r in rotations[i % 2]:
      x0 = x0 + x1
      x1 = _rotl(x1, r) ^ x0
    x0 = x0 + ks[(i + 1) % 3]
    x1 = x1 + ks[(i + 2) % 3] + jnp.uint32(i + 1)
  return x0, x1


def row_keys(rng, row_ids_B: Array) -> Array:
  """uint32 [B, 2]: row b's noise key, 2 random words of fold_in(rng, row_ids_B[b])."""
  return jax.vmap(lambda i: jax.random.bits(jax.random.fold_in(rng, i), (2,), jnp.uint32))(
      row_ids_B)


def row_bits(keys_B2: Array, step_B: Array, vocab_size: int) -> Array:
  """uint32 [B, V] uniform bits for sampling token `step_B[b]` of row b: Threefry-2x32 of
  the counter (step, j) under the row's key, j < ceil(V / 2), both output words used
  (word 0 for tokens j, word 1 for tokens ceil(V / 2) + j). A function of (key, step)
  alone: the same for a row whatever the batch it is decoded in (`sampling` module doc)."""
  B, H = keys_B2.shape[0], (vocab_size + 1) // 2
  j_BH = jnp.broadcast_to(jnp.arange(H, dtype=jnp.uint32)[None], (B, H))
  t_BH = jnp.broadcast_to(step_B.astype(jnp.uint32)[:, None], (B, H))
  y0, y1 = threefry2x32(keys_B2[:, :1], keys_B2[:, 1:], t_BH, j_BH)
  return jnp.concatenate([y0, y1], axis=1)[:, :vocab_size]
