"""Supervised fine-tuning loss."""
from __future__ import annotations

import jax.numpy as jnp

from rlhf_jax.losses.logprobs import token_logprobs


def sft_loss_sums(logits_BTV, targets_BT, loss_mask_BT):
  """Summed next-token negative log-likelihood and token count.

      nll_sum = - sum_{b,t} m_bt log p(y_bt | y_<bt),   n = sum_{b,t} m_bt

  Inputs are already shifted (logits at t predict targets at t). loss_mask_BT
  is 1 on completion tokens only (prompt and padding masked). Returned as sums
  so that gradient accumulation over micro-batches gives exactly the
  token-mean of the whole batch.
  """
  mask = loss_mask_BT.astype(jnp.float32)
  logp_BT = token_logprobs(logits_BTV, targets_BT)
  nll_sum = -jnp.sum(logp_BT * mask)
  return nll_sum, jnp.sum(mask)


def sft_loss_sums_from_logps(logp_BT, loss_mask_BT):
  """`sft_loss_sums` from the target log-probs log p(y_bt | y_<bt) instead of the logits
  (e.g. chunked ones, `models.api.token_logprobs_from_hidden`): (nll_sum, n)."""
  mask = loss_mask_BT.astype(jnp.float32)
  return -jnp.sum(logp_BT * mask), jnp.sum(mask)


def sft_loss(logits_BTV, targets_BT, loss_mask_BT):
  """Token-mean NLL over completion tokens: (loss, metrics)."""
  nll_sum, n = sft_loss_sums(logits_BTV, targets_BT, loss_mask_BT)
  loss = nll_sum / jnp.maximum(n, 1.0)
  return loss, {"loss": loss, "num_tokens": n}
