"""DPO-family trainer (offline preference optimisation): `run(config, workdir)`.

`config.dpo.loss_type` picks the variant (`rlhf_jax.losses.dpo.LOSS_TYPES`):
sigmoid (DPO; cDPO with label_smoothing), robust, ipo, hinge (SLiC), simpo,
orpo, kto. Each variant's formula and paper are in `rlhf_jax/losses/dpo.py`.

Per step: policy log-probs log pi(y|x) (sums over completion tokens) of the
chosen and rejected replies in one [2B, T] forward pass; reference log-probs
log pi_ref(y|x) either precomputed once over the data set and cached in
WORKDIR/reference_logps_<split>.npz (`dpo.precompute_reference=True`, the
reference parameters are then dropped) or computed on the fly with the frozen
reference parameters. The reference policy is the initial policy (init_from,
or the random init of the same seed). KTO's reference point z0 uses
mismatched pairs (prompt of row i with the chosen reply of row i+1) built
once for the whole data set. simpo / orpo / reference_free need no reference.
With LoRA (config.lora.rank > 0) only adapters train and the frozen base *is* the
reference (the initial adapted model equals it exactly): no second copy of the weights.
"""
from __future__ import annotations

import hashlib
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import config as config_lib
from rlhf_jax import evaluation
from rlhf_jax import flops as flops_lib
from rlhf_jax import metrics as metrics_lib
from rlhf_jax import parallel
from rlhf_jax.data import lengths
from rlhf_jax.data import sft as sft_data
from rlhf_jax.losses.dpo import kto_reference_point, preference_loss, variant
from rlhf_jax.losses.logprobs import (sequence_logprobs, sequence_logprobs_from_token_logps,
                                      shift_for_next_token)
from rlhf_jax.models import Transformer
from rlhf_jax.models.api import (prefix_sharing_saves_flops, token_logprobs_from_hidden,
                                 window_logprobs)
from rlhf_jax.data import pairs
from rlhf_jax.trainers import loop
from rlhf_jax.trainers import optim
from rlhf_jax.trainers import setup
from rlhf_jax.trainers import state as state_lib
from rlhf_jax.trainers import step as step_lib

REF_KEYS = ("ref_chosen_logps", "ref_rejected_logps", "ref_kl_logps")


def uses_reference(d) -> bool:
  return not d.reference_free and variant(d.loss_type).uses_reference


def sides(d) -> tuple[str, ...]:
  """The rows scored per pair (`LossVariant.sides`; "kl": KTO's mismatched rows)."""
  return variant(d.loss_type).sides


def shares_prompt(d) -> bool:
  """Chosen and rejected run as one packed row (prompt once; `dpo.share_prompt`)."""
  return bool(d.get("share_prompt", True)) and sides(d) == ("chosen", "rejected")


def make_sequence_logps(model, names, window: int = 0):
  """f(params, batch) -> (logps, lengths), each a tuple over `names` of [B] arrays.

  window > 0 (`dpo.share_prompt`, names = chosen, rejected): each pair runs as one
  packed row [prompt | chosen reply | rejected reply] (`models.api.window_logits`:
  the shared prompt once, only reply positions unembedded); the replies must fit in
  `window` tokens (data.max_completion_len) -- `check_shared_prompts`. Otherwise the
  2B rows run separately. Same log-probs to float tolerance (tests/test_dpo_train.py).
  model.config.logits_chunk > 0: the log-probs come from the hidden states, that many
  positions unembedded at a time (`models.api.window_logprobs` /
  `token_logprobs_from_hidden`), never the whole [rows, T, V] logits.
  """
  chunk = model.config.logits_chunk
  if window:
    def packed(params, batch):
      inter = lambda key: jnp.stack([batch[f"{n}_{key}"] for n in names], 1).reshape(
          -1, batch[f"{names[0]}_{key}"].shape[1])                 # rows: c0 r0 c1 r1 ...
      mask_BT = inter("loss_mask")
      start_B = jnp.argmax(mask_BT > 0, axis=1)                    # first reply token
      logps_BW, _, pk = window_logprobs(model, params, inter("tokens"), inter("segment_ids"),
                                        start_B, group_size=len(names), window=window,
                                        chunk=chunk)
      m_BW = jnp.take_along_axis(mask_BT, pk.slots_BW, axis=1) * pk.valid_BW
      total = jnp.sum(jnp.where(m_BW > 0, logps_BW, 0.0), axis=1).reshape(-1, len(names))
      count = jnp.sum(m_BW, axis=1).astype(jnp.float32).reshape(-1, len(names))
      return tuple(total.T), tuple(count.T)
    return packed

  def f(params, batch):
    cat = lambda key: jnp.concatenate([batch[f"{n}_{key}"] for n in names])
    if chunk:
      h_BTD, _ = model.apply({"params": params}, cat("tokens"), cat("segment_ids"),
                             output="hidden")
      h_BSD, targets_BS, mask_BS = shift_for_next_token(h_BTD, cat("tokens"), cat("loss_mask"))
      logps_BS = token_logprobs_from_hidden(model, params, h_BSD, targets_BS, chunk=chunk)
      total, _, count = sequence_logprobs_from_token_logps(logps_BS, mask_BS)
    else:
      logits, _ = model.apply({"params": params}, cat("tokens"), cat("segment_ids"))
      total, _, count = sequence_logprobs(logits, cat("tokens"), cat("loss_mask"))
    return jnp.split(total, len(names)), jnp.split(count, len(names))
  return f


def check_shared_prompts(arrays, window: int, where: str) -> None:
  """Packed pairs need chosen and rejected to share the prompt tokens before the first
  reply token and every reply to fit in `window` tokens (true of `pairs.tokenize`)."""
  cm, rm = arrays["chosen_loss_mask"] > 0, arrays["rejected_loss_mask"] > 0
  T = cm.shape[1]
  start_c, start_r = cm.argmax(1), rm.argmax(1)
  slot = np.arange(T)[None]
  bad = start_c != start_r
  bad |= ((slot < start_c[:, None]) & (arrays["chosen_tokens"] != arrays["rejected_tokens"])).any(1)
  for m, s in ((cm, start_c), (rm, start_r)):
    bad |= (m & (slot >= s[:, None] + window)).any(1)
  if bad.any():
    i = int(np.flatnonzero(bad)[0])
    raise sft_data.DataError(
        f"{where} pair {i}: chosen and rejected do not share their prompt tokens or a reply "
        f"is longer than data.max_completion_len={window}; set dpo.share_prompt=False to "
        f"score them as separate rows")


def make_loss_fn(model, d, window: int = 0):
  names = sides(d)
  logps_fn = make_sequence_logps(model, names, window)
  # the config.dpo knobs the loss type's registry entry reads (`losses.dpo.LOSSES`)
  knobs = {"beta": d.beta, **{n: d[n] for n in variant(d.loss_type).knobs}}

  def loss_fn(params, ref_params, batch):
    (pc, pr, *pk), (nc, nr, *_) = logps_fn(params, batch)
    rc = rr = None
    rk = [jnp.zeros_like(pc)]
    if uses_reference(d):
      if "ref_chosen_logps" in batch:
        rc, rr = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        rk = [batch.get("ref_kl_logps", jnp.zeros_like(pc))]
      else:
        (rc, rr, *rk), _ = logps_fn(jax.lax.stop_gradient(ref_params), batch)
    z0 = kto_reference_point(pk[0], rk[0]) if "kl" in names else None
    return preference_loss(
        d.loss_type, policy_chosen_logps_B=pc, policy_rejected_logps_B=pr,
        ref_chosen_logps_B=rc, ref_rejected_logps_B=rr, chosen_lengths_B=nc,
        rejected_lengths_B=nr, kto_z0=z0, reference_free=d.reference_free, **knobs)

  return loss_fn


def make_train_step(model, tx, d, frozen=None, window: int = 0, grad_accum_steps: int = 1):
  """train_step(state, ref_params, batch) -> (state, metrics); with LoRA the model is
  state["base"] merged with the adapters (`state_lib.Frozen`). With grad_accum_steps = A > 1
  the pairs are split into A equal micro-batches whose gradients and metrics are
  averaged: every loss type but kto is a mean over pairs, so the update is the
  whole-batch one (kto's reference point z0 is a whole-batch statistic: refused by
  config validation)."""
  return step_lib.make_step(make_loss_fn(model, d, window), tx, grad_accum_steps,
                            step_lib.rows_weight, frozen=frozen)


def reference_logps(model, names, ref_params, arrays, batch_size, mesh, cache_path, fingerprint,
                    window: int = 0, split: str = "train", pad=None):
  """{ref_<side>_logps: [N]} for every row, cached in `cache_path` under `fingerprint`.
  The pass over the rows shows a progress bar with ETA and ends with one summary line
  (primary process; also when the cache is reused). `pad` (`data.lengths.Padding`) cuts
  each batch to its data.pad_to length."""
  pad = pad or (lambda b, what=None: b)
  primary = parallel.is_primary()
  n = len(arrays["margin"])
  if os.path.exists(cache_path):
    cached = np.load(cache_path, allow_pickle=False)  # our own cache: arrays only
    if str(cached["fingerprint"]) == fingerprint:
      if primary:
        print(f"reference log-probs ({split}): {n} pairs reused from {cache_path}", flush=True)
      return {k: cached[k] for k in cached.files if k != "fingerprint"}
  t0 = time.perf_counter()
  f = jax.jit(make_sequence_logps(model, names, window))
  out = {n_: np.zeros((n,), np.float32) for n_ in names}
  keys = [k for k in arrays if k.split("_")[0] in names]
  batches = -(-n // batch_size)
  bar = metrics_lib.Progress(0, batches, desc=f"reference log-probs ({split})",
                             enabled=primary, unit="batch")
  for i in range(0, n, batch_size):
    idx = np.arange(i, i + batch_size) % n  # last batch wraps around (fixed shapes)
    b = parallel.shard_batch(pad({k: arrays[k][idx] for k in keys}, "reference"), mesh)
    logps, _ = f(ref_params, b)
    for name, lp in zip(names, logps):
      out[name][idx[:min(batch_size, n - i)]] = np.asarray(lp)[:min(batch_size, n - i)]
    bar.update(1)
  bar.close()
  result = {f"ref_{k}_logps": v for k, v in out.items()}
  tmp = cache_path + ".tmp.npz"
  np.savez(tmp, fingerprint=fingerprint, **result)
  os.replace(tmp, cache_path)
  if primary:
    print(f"reference log-probs ({split}): {n} pairs in {batches} batches of {batch_size}, "
          f"{time.perf_counter() - t0:.1f}s (dpo.precompute_reference; cached in "
          f"{cache_path})", flush=True)
  return result


def run(config, workdir: str) -> dict:
  validate(config, jax.device_count())
  d = config.dpo
  os.makedirs(workdir, exist_ok=True)
  mesh = parallel.make_mesh(config.mesh.shape)
  B = config.batch_size

  # Data and tokenizer (KTO also gets mismatched "kl" rows).
  train_src, eval_src, data_stats = pairs.load_pairs(config, workdir)
  tokenizer = setup.build_tokenizer(config, workdir, lambda: pairs.corpus(train_src))
  train_arrays, tok_stats = pairs.tokenize(config, tokenizer, train_src)
  sft_data.require_rows(len(train_arrays["margin"]), B, "preference pairs")
  eval_arrays = pairs.tokenize(config, tokenizer, eval_src)[0] if eval_src is not None else None
  if "kl" in sides(d):
    train_arrays.update(pairs.mismatched_rows(train_arrays, tokenizer.pad_id))
    if eval_arrays is not None:
      eval_arrays.update(pairs.mismatched_rows(eval_arrays, tokenizer.pad_id))
  # data.pad_to: each batch (train, eval, reference pass) cut to its length (`data.lengths`).
  pad = lengths.from_config(config.data, lengths.row_lengths(train_arrays), B,
                            train_arrays["chosen_tokens"].shape[1], verbose=parallel.is_primary())

  # Policy (and reference = the initial policy).
  rng_init, rng_sample = jax.random.split(jax.random.PRNGKey(config.seed))
  mcfg, init_params = setup.policy_init(config, tokenizer)

  # Pairs as packed rows [prompt | chosen | rejected] (dpo.share_prompt), when that saves
  # FLOPs at these lengths.
  window = config.data.max_completion_len if shares_prompt(d) and prefix_sharing_saves_flops(
      mcfg, config.data.max_prompt_len, config.data.max_completion_len, 2) else 0
  if window:
    check_shared_prompts(train_arrays, window, "training data")
    if eval_arrays is not None:
      check_shared_prompts(eval_arrays, window, "eval data")
  model = Transformer(mcfg)
  dummy = jnp.zeros((1, 2), jnp.int32)
  tx, schedule = optim.make_optimizer(config.optimizer, config.num_steps)
  # With config.lora.rank > 0 the state trains LoRA adapters and the frozen base (`frozen`)
  # is the reference: no second copy of the weights.
  state, shardings, frozen = state_lib.create_train_state(
      lambda r: model.init(r, dummy)["params"], tx, mesh, rng_init, init_params, config=config,
      workdir=workdir)
  del init_params  # the host copy of the weights (e.g. a dequantised GGUF): on the devices now
  eval_ref = (frozen.initial(state["params"]) if evaluation.needs_reference(config)
              else None)  # the initial policy, for eval_kl
  ref_params = None
  if uses_reference(d):
    ref_params = frozen.initial(state["params"])  # before any update / restore
    if d.precompute_reference:
      fp = hashlib.sha256(f"{config.init_from}|{config.seed}|{mcfg}".encode()
                          + b"".join(np.ascontiguousarray(v).tobytes()
                                     for v in train_arrays.values())
                          + (b"" if pad.pad_to == "max" else  # the padded shapes round alike
                             f"|{pad.pad_to}|{pad.boundaries}|{pad.multiple}".encode())
                          ).hexdigest()
      names = sides(d)
      train_arrays.update(reference_logps(model, names, ref_params, train_arrays, B, mesh,
                                          os.path.join(workdir, "reference_logps_train.npz"), fp,
                                          window, pad=pad))
      if eval_arrays is not None:
        eval_arrays.update(reference_logps(model, names, ref_params, eval_arrays, B, mesh,
                                           os.path.join(workdir, "reference_logps_eval.npz"),
                                           fp, window, split="eval", pad=pad))
      ref_params = None  # no longer needed: free the memory
  train_ds = sft_data.batched(train_arrays, B, config.seed)

  policy_eval = evaluation.from_config(config, model_config=mcfg, tokenizer=tokenizer,
                                       ref_params=eval_ref, workdir=workdir)

  checkpointer, start, state = setup.open_run(config, workdir, state, shardings, mcfg,
                                               tokenizer)

  batch_sharding = parallel.batch_sharding(mesh)
  model_sharding = frozen.model_shardings(shardings)
  ref_sharding = model_sharding if ref_params is not None else None
  step_fn = state_lib.jit_step(
      make_train_step(model, tx, d, frozen, window, config.grad_accum_steps),
      shardings, ref_sharding, batch_sharding, metrics_sharding=parallel.replicated(mesh),
      donate=True)
  eval_fn = jax.jit(make_loss_fn(model, d, window),
                    in_shardings=(model_sharding, ref_sharding, batch_sharding))

  def evaluate(params, step):
    params = frozen.full(params)  # LoRA: adapters merged into the base
    out = {}
    if policy_eval is not None:
      out.update(policy_eval(params, step))
    if eval_arrays is None:
      return out
    n = len(eval_arrays["margin"])
    eb = min(B, n)
    sums = {}
    for i in range(0, n - n % eb, eb):
      _, m = eval_fn(params, ref_params,
                     parallel.shard_batch(pad({k: v[i:i + eb] for k, v in eval_arrays.items()},
                                              "eval"), mesh))
      for k, v in m.items():
        sums[k] = sums.get(k, 0.0) + float(v)
    out.update({f"eval_{k}": v / max(n // eb, 1) for k, v in sums.items()})
    if step and config.sample.every and (step % config.sample.every == 0
                                         or step == config.num_steps):
      rows = [eval_src[i] for i in range(min(config.sample.num_prompts, n))]
      out["sample_match_chosen"] = loop.write_samples(
          workdir, step, mcfg, params, tokenizer,
          [pairs.messages(r["prompt"]) for r in rows], [r["chosen"] for r in rows],
          jax.random.fold_in(rng_sample, step), config.sample)
    return out

  return loop.train_loop(
      config, workdir, state=state, start=start,
      train_step=lambda s, b: step_fn(s, ref_params, b),
      get_batch=lambda i: pad(train_ds[i]),
      mesh=mesh, checkpointer=checkpointer, schedule=schedule,
      evaluate=evaluate if eval_arrays is not None or policy_eval is not None else None,
      desc=f"dpo[{d.loss_type}]",
      progress_keys=("loss", "reward_accuracy", "eval_reward_accuracy"),
      count_tokens=lambda b: sum(b[f"{n}_segment_ids"].sum() for n in sides(d)),
      extra_metrics={f"data_{k}": v for k, v in {**data_stats, **tok_stats}.items()},
      compute=lambda b: compute_counts(mcfg, d, b))


def compute_counts(mcfg, d, batch) -> dict:
  """One step's FLOPs and tokens (`rlhf_jax.flops`): forward + backward of the policy
  over the padded rows of every side ([sides x B, T], every position unembedded: the
  unpacked layout, an upper bound when dpo.share_prompt packs pairs; T is this step's
  padded length under data.pad_to), plus, for losses
  with a reference, one reference forward of the same rows (flops/logprob_passes; with
  dpo.precompute_reference the cached pass is counted for the batch that uses it, so
  runs compare whatever the caching); tokens/trained = the real tokens of every side."""
  names = sides(d)
  B, T = batch[f"{names[0]}_tokens"].shape
  rows = len(names) * B
  update, remat = flops_lib.train_flops(mcfg, rows, T)
  ref = flops_lib.forward_flops(mcfg, rows, T) if uses_reference(d) else 0
  seg = sum(int((batch[f"{n}_segment_ids"] > 0).sum()) for n in names)
  return {"flops/update": update, "flops/remat": remat, "flops/logprob_passes": ref,
          "tokens/trained": seg, "samples/completions": rows}


def validate(config, num_devices: int | None = None) -> None:
  """The checks of a DPO config that need no files: the shared sections
  (`rlhf_jax.config.validate`), the dpo section (the loss_type's knobs, from the
  rlhf_jax.losses.dpo registry), and batch_size split over the data-parallel devices
  (num_devices=None: the config alone). ConfigError naming the key."""
  from rlhf_jax.losses.dpo import LOSSES, label_smoothing_error, variant
  config_lib.validate(config, num_devices)
  if "dpo" in config:
    check = config_lib.Checks(config)
    need, num = check.need, check.num
    p = config.dpo
    check.choice("dpo.loss_type", tuple(LOSSES))
    v = variant(p.loss_type)
    if "beta" in v.knobs:
      num("dpo.beta", 0.0, lo_open=True)
    ls = num("dpo.label_smoothing", 0.0)
    why = label_smoothing_error(p.loss_type, ls)
    need(why is None, "dpo.label_smoothing", why)
    num("dpo.orpo_lambda", 0.0)
    num("dpo.kto_desirable_weight", 0.0)
    num("dpo.kto_undesirable_weight", 0.0)
    num("dpo.simpo_gamma")
    need(not v.whole_batch or config.get("grad_accum_steps", 1) == 1, "grad_accum_steps",
         f"must be 1 with dpo.loss_type {p.loss_type!r} (its loss uses a statistic of the "
         f"whole batch, which micro-batches would change), got {config.get('grad_accum_steps')}")
    need(isinstance(p.get("share_prompt", True), bool), "dpo.share_prompt",
         f"expected True or False, got {p.get('share_prompt')!r}")
  config_lib.check_batch_split(config, num_devices)
