"""One training update: value_and_grad of a loss, optional exact gradient accumulation,
the optimizer update with its non-finite guard."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from rlhf_jax.losses.ppo import AGGREGATION_MODES
from rlhf_jax.trainers.optim import all_finite
from rlhf_jax.trainers.state import BASE, Frozen


def apply_gradients(state, grads, tx, count_step: bool = True):
  """One optimizer update of state {"step", "params", "opt_state", ...} (other keys kept).

  count_step: advance state["step"] (trainers whose step is one update); online-RL
  trainers count rollout steps themselves. Non-finite gradients: `optim.skip_nonfinite`
  (inside every trainer's tx) makes the update zero and keeps its state; callers report
  it as the metric skipped_update = 1 (`skipped_metric`).
  """
  finite = all_finite(grads)
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  # The guard already zeroes a non-finite update; selecting the parameters as well keeps
  # them bit for bit (even -0.0) and keeps p + u one fused multiply-add as before the
  # guard became an optax wrapper (a select between them changes the rounding).
  params = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                        optax.apply_updates(state["params"], updates), state["params"])
  new = {**state, "params": params, "opt_state": opt_state}
  if count_step:
    new["step"] = state["step"] + 1
  return new


def skipped_metric(grads) -> jax.Array:
  """float32 1.0 when `apply_gradients` skipped this update (non-finite gradients)."""
  return 1.0 - all_finite(grads).astype(jnp.float32)


def aggregation_weight(aggregation: str):
  """weight(micro_batch) for `make_step`: the micro-batch's share of a loss
  aggregated with `aggregation`, from its table entry (`losses.ppo.AGGREGATION_MODES`:
  real tokens for token_mean, non-empty sequences for the seq_mean_* modes)."""
  weight = AGGREGATION_MODES[aggregation].micro_batch_weight
  return lambda mb: weight(mb["mask_BC"])


def make_step(loss_fn, tx, micro_batches: int = 1, weight_fn=None, *, count_step: bool = True,
              frozen: "Frozen | None" = None, metric_weights=None, summed_metrics=(),
              normalizer: str | None = None):
  """The one training update of every trainer: step(state, *consts, batch) ->
  (state, metrics) for loss_fn(params, *consts, batch) -> (loss, metrics). Not jitted.

  value_and_grad of the loss, then the optimizer update (`apply_gradients`, with its
  non-finite guard); adds grad_norm and skipped_update to the metrics.

  Exact gradient accumulation (micro_batches = A > 1): the batch (the last argument;
  `consts` such as reference parameters are passed whole to every part) is split into A
  equal parts along axis 0, one in memory at a time (lax.scan), and
    * normalizer=None: the loss is a weighted mean over the batch (rows, tokens or
      sequences: `rows_weight`, `aggregation_weight`) and the parts' gradients are summed
      with weights weight_fn(part) / sum(weights), so the update equals the whole-batch
      one. Metrics are the same weighted means over the parts (so ratio_min/max are
      averages), unless metric_weights(part) -> {name: weight} gives a metric its own
      (unnormalised) weight, e.g. the count its ratio is taken over, so that the combined
      value is the whole-batch one; metrics named in `summed_metrics` (counts) are added.
    * normalizer="num_tokens" (SFT): the loss is a *sum* over the part and
      metrics[normalizer] its count; sums and counts are added over the parts, and the
      gradient and the logged "loss" are divided by max(total count, 1) once at the end.
      (Also used with A = 1.)
  LoRA (`frozen` enabled): the frozen base is state["base"] (jit the step with
  `state.jit_step`, which passes it as an argument, never a constant); loss_fn sees the
  merged parameters and gradients reach only state["params"] (adapters + fully trained
  leaves). LoRA dropout uses one mask for all parts.
  """
  frozen = frozen or Frozen()

  def update(state, *args):
    base = state.get(BASE)
    rng, carry = dropout_rng(state)

    def loss(trained, *a):
      return loss_fn(frozen.merge(base, trained, rng), *a)
    grad_fn = jax.value_and_grad(loss, has_aux=True)
    params = state["params"]
    if micro_batches == 1:
      (value, metrics), grads = grad_fn(params, *args)
    else:
      *consts, batch = args
      parts = jax.tree.map(lambda x: x.reshape(micro_batches, -1, *x.shape[1:]), batch)
      part_grad = lambda part: grad_fn(params, *consts, part)
      if normalizer is not None:
        value, metrics, grads = _summed(part_grad, params, parts)
      else:
        metrics, grads = _weighted(part_grad, params, parts, weight_fn, metric_weights,
                                   summed_metrics)
    if normalizer is not None:
      denom = jnp.maximum(metrics[normalizer], 1.0)
      grads = jax.tree.map(lambda g: g / denom, grads)
      metrics = {**metrics, "loss": value / denom}
    return ({**apply_gradients(state, grads, tx, count_step), **carry},
            {**metrics, "grad_norm": optax.tree.norm(grads),
             "skipped_update": skipped_metric(grads)})
  return update


def _summed(part_grad, params, parts):
  """(summed loss, summed metrics, summed gradients) over the parts (lax.scan)."""
  first = jax.tree.map(lambda x: x[0], parts)
  (_, m_shape), _ = jax.eval_shape(part_grad, first)

  def body(acc, part):
    (v_i, m_i), g_i = part_grad(part)
    g, v, m = acc
    return (jax.tree.map(jnp.add, g, g_i), v + v_i,
            {k: m[k] + m_i[k] for k in m}), None

  zeros = (jax.tree.map(jnp.zeros_like, params), 0.0,
           {k: 0.0 for k in m_shape})
  (grads, value, metrics), _ = jax.lax.scan(body, zeros, parts)
  return value, metrics, grads


def _weighted(part_grad, params, parts, weight_fn, metric_weights, summed_metrics):
  """(metrics, gradients): sum_i w_i g_i with w_i = weight_fn(part_i) / sum_j weight_fn(part_j)."""
  w = jax.vmap(weight_fn)(parts)
  w = w / jnp.maximum(jnp.sum(w), 1e-12)
  first = jax.tree.map(lambda x: x[0], parts)
  (_, m_shape), _ = jax.eval_shape(part_grad, first)
  zeros = (jax.tree.map(jnp.zeros_like, params),
           jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), m_shape))
  if metric_weights is None and not summed_metrics:
    def body(acc, xs):
      part, wi = xs
      (_, m), g = part_grad(part)
      return jax.tree.map(lambda a, b: a + wi * b, acc, (g, m)), None

    (grads, metrics), _ = jax.lax.scan(body, zeros, (parts, w))
    return metrics, grads
  # Per-metric weights: accumulate sum_i w_ik m_ik and sum_i w_ik, divide at the end.
  own = metric_weights or (lambda part: {})

  def weights_of(part, wi):
    mw = own(part)
    return {k: (jnp.float32(1.0) if k in summed_metrics else
                jnp.asarray(mw[k], jnp.float32) if k in mw else wi) for k in m_shape}

  def body(acc, xs):
    part, wi = xs
    (_, m), g = part_grad(part)
    g_acc, m_acc, w_acc = acc
    mw = weights_of(part, wi)
    return (jax.tree.map(lambda a, b: a + wi * b, g_acc, g),
            {k: m_acc[k] + mw[k] * m[k] for k in m_acc},
            {k: w_acc[k] + mw[k] for k in w_acc}), None

  w_zeros = {k: jnp.float32(0.0) for k in m_shape}
  (grads, m_sum, w_sum), _ = jax.lax.scan(body, (*zeros, w_zeros), (parts, w))
  metrics = {k: m_sum[k] if k in summed_metrics else
             jnp.where(w_sum[k] > 0, m_sum[k] / jnp.maximum(w_sum[k], 1e-30), 0.0)
             for k in m_sum}
  return metrics, grads


def rows_weight(part) -> jax.Array:
  """weight_fn of `make_step` for a loss that is a mean over batch rows."""
  return jnp.float32(jax.tree.leaves(part)[0].shape[0])



def dropout_rng(state):
  """(key for this update's LoRA dropout or None, state entries to carry forward).
  LoRA dropout keys live in state["lora_rng"], so a resumed run draws the same masks."""
  if "lora_rng" not in state:
    return None, {}
  carry, key = jax.random.split(state["lora_rng"])
  return key, {"lora_rng": carry}

