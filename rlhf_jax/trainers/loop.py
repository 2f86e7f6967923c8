"""The training loop every trainer shares: steps, logging, evaluation, checkpoints,
preemption, the non-finite guard's counters."""
from __future__ import annotations

import os
import time

import jax
import numpy as np

from rlhf_jax import checkpoint as ckpt_lib
from rlhf_jax import flops as flops_lib
from rlhf_jax import metrics as metrics_lib
from rlhf_jax import parallel
from rlhf_jax.trainers import optim
from rlhf_jax.trainers import state as state_lib


class TrainingError(RuntimeError):
  """A run that cannot go on (e.g. config.max_bad_steps non-finite updates in a row)."""


def write_samples(workdir, step, model_config, params, tokenizer, prompts, references, rng,
                  sample_cfg) -> float:
  """Sample completions for chat `prompts` (lists of messages), append them with their
  `references` to WORKDIR/samples.jsonl; returns the exact-match rate."""
  from rlhf_jax import sampling
  from rlhf_jax.data.sft import encode_prompt
  ids = [encode_prompt(tokenizer, p) for p in prompts]
  P = max(len(x) for x in ids)
  tokens = np.full((len(ids), P), tokenizer.pad_id, np.int32)
  mask = np.zeros((len(ids), P), np.int32)
  for i, x in enumerate(ids):
    tokens[i, P - len(x):], mask[i, P - len(x):] = x, 1
  greedy = sample_cfg.temperature <= 0
  out = sampling.generate(model_config, params, tokens, mask, rng,
                          max_new_tokens=sample_cfg.max_new_tokens, greedy=greedy,
                          temperature=1.0 if greedy else sample_cfg.temperature,
                          eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
  toks, m = parallel.to_host(out.tokens_BN), parallel.to_host(out.mask_BN)
  rows = []
  for i, (msgs, ref) in enumerate(zip(prompts, references)):
    text = tokenizer.decode([int(t) for t, k in zip(toks[i], m[i]) if k and t != tokenizer.eos_id])
    rows.append({"prompt": msgs[-1]["content"], "completion": text, "reference": ref,
                 "exact_match": text.strip() == ref.strip()})
  if parallel.is_primary():
    metrics_lib.append_jsonl(os.path.join(workdir, "samples.jsonl"), step, rows)
  return float(np.mean([r["exact_match"] for r in rows]))


def host_metrics(metrics: dict) -> dict:
  return {k: float(v) for k, v in jax.device_get(metrics).items()}


def eval_due(config, step: int) -> bool:
  """Whether step `step` (0 = before the first) evaluates: every config.eval_every steps
  (0 = never), plus step 0 (config.eval_at_start) and the last step (config.eval_at_end)."""
  every = config.eval_every
  if not every:
    return False
  if step == 0:
    return bool(config.get("eval_at_start", True))
  if step == config.num_steps and config.get("eval_at_end", True):
    return True
  return step % every == 0


def train_loop(config, workdir: str, *, state, start: int, train_step, get_batch, mesh,
               checkpointer, schedule, evaluate=None, desc="train", progress_keys=("loss",),
               count_tokens=None, extra_metrics=None, shard_batches=True, updates_per_step=1,
               compute=None):
  """The loop every trainer shares; returns the last logged row plus step/preempted.

  For step = start+1 .. config.num_steps: batch = get_batch(step - 1) (host
  numpy, deterministic in the step), state, m = train_step(state, batch on the
  mesh). Every `log_every` steps a metrics row (train metrics + learning_rate +
  tokens_per_second) goes to metrics.jsonl / TensorBoard; every `eval_every`
  steps (and at step 0 and the last step unless eval_at_start / eval_at_end are off:
  `eval_due`) `evaluate(params, step) -> dict` adds eval metrics. Checkpoints every `checkpoint.every` steps and at the end;
  SIGTERM checkpoints and returns early with preempted=True (`rlhf-jax train` then
  exits with EXIT_PREEMPTED). Non-finite updates: the optimizer's guard
  (`optim.skip_nonfinite`) skips them and counts them in the optimizer state (so in the
  checkpoint: a resumed run logs exactly what an uninterrupted one does); the loop logs
  the count as skipped_updates and stops the run (TrainingError) after
  config.max_bad_steps steps in a row whose every update was skipped
  (`updates_per_step`: the optimizer updates of one training step, e.g. PPO / GRPO
  epochs x minibatches). `extra_metrics`
  (e.g. data statistics) are added to every row. `count_tokens(batch)` gives
  the tokens a batch trains on (tokens_per_second); trainers that measure their
  own throughput pass None. shard_batches=False hands host batches to
  train_step as they are (online RL: the step samples its own batch).
  `compute(batch) -> {counter: increment}` (called after each step, on the host) gives
  the step's FLOPs and tokens (`rlhf_jax.flops.KEYS`); every row then carries the
  cumulative flops/*, flops/total and tokens/* from step 0 (`flops.Counters`: kept
  next to the checkpoints, so a resumed run logs what an uninterrupted one does).
  """
  primary = parallel.is_primary()  # multi-host: process 0 logs, all processes compute
  writer = metrics_lib.MetricsWriter(
      workdir, start, enabled=primary,
      extra_sinks=metrics_lib.config_sinks(config, workdir) if primary else ())
  progress = metrics_lib.Progress(start, config.num_steps, desc=desc, enabled=primary)
  throughput = metrics_lib.Throughput()
  counters = flops_lib.Counters(workdir, start, enabled=primary) if compute else None
  counter_row = (lambda: counters.row()) if counters else dict
  t_start = time.perf_counter()
  elapsed = lambda: writer.prior_elapsed + time.perf_counter() - t_start  # across resumes
  last = {}
  if evaluate is not None and start == 0 and eval_due(config, 0):
    last = writer.write(0, {**evaluate(state["params"], 0), **counter_row(),
                            "elapsed_s": elapsed()})
  preempted, step = False, start
  max_bad = int(config.get("max_bad_steps", 3))
  # All skipped updates of the run (across resumes: they live in the optimizer state).
  skipped_total, _ = optim.guard_counters(state["opt_state"])
  with ckpt_lib.PreemptionGuard() as preemption:
    for step in range(start + 1, config.num_steps + 1):
      batch = get_batch(step - 1)
      state, m = train_step(state, parallel.shard_batch(batch, mesh) if shard_batches else batch)
      skipped_before = skipped_total
      skipped_total, bad_updates = optim.guard_counters(state["opt_state"])
      if skipped_total > skipped_before:  # the numerical guard skipped updates of this step
        bad_run = bad_updates // updates_per_step  # steps in a row, every update skipped
        what = ("update" if updates_per_step == 1 else
                f"{skipped_total - skipped_before} of {updates_per_step} updates")
        if primary:
          progress.write(f"step {step} (batch {step - 1}): non-finite loss/gradients, {what} "
                         f"skipped ({bad_run} in a row, {skipped_total} in this run)")
        if max_bad and bad_run >= max_bad:
          checkpointer.close()
          progress.close()
          writer.close()
          raise TrainingError(
              f"{bad_run} consecutive non-finite updates (steps {step - bad_run + 1}-{step}, "
              f"config.max_bad_steps={max_bad}); parameters were not updated by them, the last "
              f"checkpoint is {checkpointer.latest_step()}. Lower optimizer.lr, check the data "
              f"of those batches, or raise max_bad_steps")
      if count_tokens is not None:
        throughput.add(count_tokens(batch))
      if counters is not None:
        counters.add(compute(batch))
      if step % config.log_every == 0 or step == config.num_steps:
        row = {**host_metrics(m), **(extra_metrics or {}), "skipped_updates": skipped_total}
        row["learning_rate"] = float(schedule(step - 1))
        row.update(counter_row())
        if count_tokens is not None:
          row["tokens_per_second"] = throughput.rate()
        if evaluate is not None and eval_due(config, step):
          row.update(evaluate(state["params"], step))
          throughput.restart()  # eval / sampling time is not training throughput
        row["elapsed_s"] = elapsed()
        last = writer.write(step, row)
        progress.update(0, **{k: row[k] for k in progress_keys if k in row})
      progress.update(1)
      if (checkpointer.maybe_save(step, state_lib.checkpointed(state),
                                  force=step == config.num_steps) and counters is not None):
        counters.saved(step)
      if preemption.any_requested() and step < config.num_steps:
        if checkpointer.maybe_save(step, state_lib.checkpointed(state), force=True) and counters:
          counters.saved(step)
        preempted = True
        print(f"preempted: saved checkpoint at step {step}; rerun the same command to resume",
              flush=True)
        break
    checkpointer.close()  # waits for the last write; a SIGTERM now only sets the flag
  progress.close()
  writer.close()
  return {"step": step, "preempted": preempted, **last}
