"""GRPO-family trainer (online RL without a critic): `run(config, workdir)`.

Per step: draw `rollout.prompts_per_step` prompts, sample `rollout.group_size`
completions each (`rlhf_jax.rollout`), score them (`config.reward.spec`),
turn rewards into advantages, then `grpo.epochs` x `grpo.minibatches`
clipped-policy updates (`rlhf_jax.losses.grpo.grpo_loss`).

`grpo.variant` fills every knob left at "auto" (-1 / ""):

  variant       advantages                     aggregation               clip (low, high)  KL
  grpo          (r - mean_g) / (std_g + eps)    seq_mean_token_mean       0.2, 0.2          k3 loss, beta 0.04
                Shao et al. 2024 (DeepSeekMath)
  dr_grpo       r - mean_g                      seq_mean_token_sum_norm   0.2, 0.2          none
                Liu et al. 2025 (Dr. GRPO)
  dapo          (r - mean_g) / (std_g + eps)    token_mean                0.2, 0.28         none; + dynamic
                Yu et al. 2025 (DAPO)                                                       sampling, overlong
  gspo          (r - mean_g) / (std_g + eps)    seq_mean_token_mean       3e-4, 4e-4        none; sequence-level
                Zheng et al. 2025 (GSPO)                                                    importance ratio
  rloo          r - mean_{j != i} r_j           seq_mean_token_sum        0.2, 0.2          k1 in reward, beta 0.05
                Ahmadian et al. 2024
  reinforce_pp  token rewards -beta*k1 (+score  token_mean                0.2, 0.2          k1 in reward, beta 0.01
                at EOS), returns, global whitening
                Hu 2025 (REINFORCE++)

The resolved knobs are written to WORKDIR/resolved_algorithm.json and logged.
With LoRA (config.lora.rank > 0) only adapters train; rollouts use the merged policy
and the frozen base is the reference.
"""
from __future__ import annotations

import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import allocator
from rlhf_jax import config as config_lib
from rlhf_jax import flops as flops_lib
from rlhf_jax import parallel, rollout
from rlhf_jax import rollout_pipeline as pipe_lib
from rlhf_jax.losses import advantages as adv_lib
from rlhf_jax.losses import is_correction as is_lib
from rlhf_jax.losses import kl as kl_lib
from rlhf_jax.losses.grpo import AUTO, VARIANTS, grpo_loss, resolve  # noqa: F401 (re-exported)
from rlhf_jax.losses.arrays import masked_mean
from rlhf_jax.losses.logprobs import token_logprobs
from rlhf_jax.models import Transformer
from rlhf_jax.models.api import prefix_sharing_saves_flops, window_logits, window_logprobs
from rlhf_jax.data import prompt_sets
from rlhf_jax.trainers import loop
from rlhf_jax.trainers import optim
from rlhf_jax.trainers import setup
from rlhf_jax.trainers import state as state_lib
from rlhf_jax.trainers import step as step_lib


def advantages(algo, ro: rollout.Rollout, group_size: int, per_turn: bool = False) -> np.ndarray:
  """Per-token advantages [B, C] (constant along a sequence except for REINFORCE++).
  Multi-turn rollouts: mask_BC covers model tokens only; per_turn (rollout.turn_rewards)
  pays a token-level estimator each env turn's reward at that turn's last model token
  (the rest of the score at the episode's last model token); sequence-level estimators
  use the episode's summed reward either way."""
  mask_BC = ro.completion_mask_BC
  scores_B = ro.rewards_B
  est = adv_lib.ESTIMATORS[algo["advantage"]]
  if algo["kl_mode"] == "reward" and not est.token_level:  # sequence-level KL penalty
    kl_BC = np.asarray(kl_lib.kl_estimate(ro.old_logps_BC, ro.ref_logps_BC, algo["kl_estimator"]))
    scores_B = scores_B - algo["kl_coef"] * (kl_BC * mask_BC).sum(1)
  if est.token_level:
    per_turn = per_turn and ro.env_rewards_BC is not None
    if per_turn:  # the env's part paid turn by turn
      scores_B = scores_B - ro.reward_parts["env"]
    rewards_BC = kl_lib.kl_penalty_rewards(ro.old_logps_BC, ro.ref_logps_BC, mask_BC,
                                           algo["kl_coef"], algo["kl_estimator"], scores_B=scores_B)
    if per_turn:
      rewards_BC = rewards_BC + ro.env_rewards_BC
    return np.asarray(est.fn(rewards_BC, mask_BC), np.float32)
  adv_B = est.fn(scores_B, group_size, algo["std_eps"])
  return (np.asarray(adv_B, np.float32)[:, None] * mask_BC).astype(np.float32)


def make_update(model, tx, algo, prompt_len: int, temperature: float, max_len: int,
                micro_batches: int = 1, frozen=None, on_policy: bool = False,
                group_size: int = 1, donate: bool = False):
  """update(state, minibatch) -> (state, metrics): one jitted clipped-policy step
  (gradients accumulated exactly over `micro_batches` parts). With LoRA (`frozen`, see
  `state_lib.Frozen`) the frozen base state["base"] is an argument of the compiled step.
  on_policy: the parameters are those that sampled the batch (one update per
  rollout), so log pi_old = stop_gradient(log pi): the ratio is exactly 1 and the
  minibatch's old_logps are not read (no old-log-prob pass is needed; with
  rollout.is_correction the pass runs for the weights, and the ratio stays exactly 1).
  A minibatch with is_weights_BC (rollout.is_correction) weights the per-token surrogate.
  model.config.logits_chunk > 0: log-probs and entropies from the hidden states, that
  many completion positions unembedded at a time (`models.api.window_logprobs`).
  group_size G > 1: every G consecutive rows of a (micro-)batch are one prompt's group
  and run as one packed row, the prompt once (`grpo.share_prompt`).
  donate: the state passed in is donated (its arrays are reused for the new one and
  deleted; `state_lib.jit_step`): only when nothing else reads them meanwhile."""
  use_ref = algo["kl_mode"] == "loss" and algo["kl_coef"] > 0

  chunk = model.config.logits_chunk

  def loss_fn(params, mb):
    B, S = mb["sequences_BS"].shape
    start_B = jnp.full((B,), prompt_len, jnp.int32)
    if chunk:  # model.logits_chunk: `chunk` completion positions unembedded at a time
      logps_BC, entropy_BC, _ = window_logprobs(
          model, params, mb["sequences_BS"], mb["segment_ids_BS"], start_B, group_size=group_size,
          window=S - prompt_len, chunk=chunk, temperature=temperature, entropy=True)
    else:
      logits_BCV, packed = window_logits(
          model, params, mb["sequences_BS"], mb["segment_ids_BS"], start_B,
          group_size=group_size, window=S - prompt_len)  # completion positions only
      logits_BCV = logits_BCV / temperature
      logps_BC = token_logprobs(logits_BCV, packed.targets_BW)
      probs = jax.nn.softmax(logits_BCV)
      entropy_BC = -jnp.sum(probs * jax.nn.log_softmax(logits_BCV), -1)
    old_logps_BC = jax.lax.stop_gradient(logps_BC) if on_policy else mb["old_logps_BC"]
    loss, metrics = grpo_loss(
        logps_BC, old_logps_BC, mb["advantages_BC"], mb["mask_BC"],
        ref_logps_BC=mb["ref_logps_BC"] if use_ref else None, aggregation=algo["aggregation"],
        max_len=max_len, clip_eps_low=algo["clip_eps_low"], clip_eps_high=algo["clip_eps_high"],
        importance=algo["importance"], kl_beta=algo["kl_coef"] if use_ref else 0.0,
        kl_kind=algo["kl_estimator"], is_weights_BC=mb.get("is_weights_BC"))
    metrics["entropy"] = masked_mean(entropy_BC, mb["mask_BC"])
    return loss, metrics

  return state_lib.jit_step(step_lib.make_step(
      loss_fn, tx, micro_batches, step_lib.aggregation_weight(algo["aggregation"]),
      count_step=False, frozen=frozen), donate=donate)


def accuracy(ro: rollout.Rollout) -> float:
  """The rollout's accuracy: the mean `math` reward component, else (multi-turn) the
  episodes' success rate, else NaN."""
  if "math" in ro.reward_parts:
    return float(np.mean(ro.reward_parts["math"]))
  if ro.episodes is not None:
    return float(np.mean(ro.episodes["correct"]))
  return float("nan")


def micro_batches_of(rows: int, micro: int) -> int:
  """Number of training micro-batches of `micro` rows in a minibatch (0 = one)."""
  if micro <= 0 or micro >= rows:
    return 1
  if rows % micro:
    raise config_lib.ConfigError(f"config.rollout.train_micro_batch={micro} must divide the "
                                 f"minibatch of {rows} rows")
  return rows // micro


def run(config, workdir: str) -> dict:
  validate(config, jax.device_count())
  os.makedirs(workdir, exist_ok=True)
  algo = resolve(config.grpo)
  rollout_cfg = config.rollout
  G, N = rollout_cfg.group_size, rollout_cfg.prompts_per_step
  mesh, sampler_mesh = pipe_lib.meshes(config)  # rollout.devices: a separate sampler sub-mesh

  # Data, tokenizer, reward.
  train_src, eval_src, data_stats = prompt_sets.load(config, workdir)
  tokenizer = setup.build_tokenizer(config, workdir, lambda: prompt_sets.corpus(train_src))
  train_ds, train_meta = prompt_sets.batches(config, tokenizer, train_src, N, config.seed)
  refill_ds, _ = prompt_sets.batches(config, tokenizer, train_src, N, config.seed + 1)
  reward_fn = setup.reward_fn_from_config(config)  # None: rollout.env's rewards alone
  episode = setup.episode_config(config)  # rollout.env: multi-turn episodes

  # Policy, reference (= the initial policy), optimizer state.
  rng_init, rng_rollout = jax.random.split(jax.random.PRNGKey(config.seed))
  mcfg, init_params = setup.policy_init(config, tokenizer)
  model = Transformer(mcfg)
  updates_per_step = algo["epochs"] * algo["minibatches"]
  tx, schedule = optim.make_optimizer(config.optimizer, config.num_steps * updates_per_step)
  dummy = jnp.zeros((1, 2), jnp.int32)
  # With config.lora.rank > 0 the state trains LoRA adapters and the frozen base (`frozen`)
  # is the reference: no second copy of the weights.
  state, shardings, frozen = state_lib.create_train_state(
      lambda k: model.init(k, dummy)["params"], tx, mesh, rng_init, init_params, config=config,
      workdir=workdir)
  del init_params  # the host copy of the weights (e.g. a dequantised GGUF): on the devices now
  need_ref = algo["kl_mode"] != "none" and algo["kl_coef"] > 0
  ref_params = frozen.initial(state["params"]) if need_ref else None
  eval_ref = ref_params if ref_params is not None or not config.eval_kl else frozen.initial(
      state["params"])  # eval_kl is measured against the initial policy
  policy_eval = setup.policy_eval(config, mcfg, tokenizer, eval_src, workdir, eval_ref)
  checkpointer, start, state = setup.open_run(config, workdir, state, shardings, mcfg,
                                               tokenizer, {"resolved_algorithm.json": algo})

  P = train_ds[0]["tokens"].shape[1]
  temperature = rollout_cfg.temperature if rollout_cfg.temperature > 0 else 1.0
  B = N * G
  # grpo.share_prompt: a group's G completions run as one packed row, the prompt once
  # (update, old and reference log-prob passes); minibatches then hold whole groups. Off
  # when minibatches would split groups or packing costs more FLOPs (long completions).
  share = G if (config.grpo.get("share_prompt", True) and N % algo["minibatches"] == 0
                and prefix_sharing_saves_flops(mcfg, P, rollout_cfg.max_new_tokens, G)) else 1
  mb_rows = B // algo["minibatches"]
  micro_rows = mb_rows // micro_batches_of(mb_rows, rollout_cfg.train_micro_batch)
  lp_rows = min(rollout_cfg.logprob_micro_batch, B)
  logps_fn = rollout.completion_logps_fn(mcfg, P, temperature,
                                         share if lp_rows % share == 0 else 1)
  # One update per rollout: the old policy IS the current one; skip the old-log-prob
  # forward pass (rollouts then carry the sampler's log-probs as old_logps, for stats and
  # KL-in-reward). grpo.old_logps="recompute" always runs the pass.
  on_policy = updates_per_step == 1 and config.grpo.old_logps == "auto"
  # rollout.is_correction: weights pi_old / pi_sampler need the recomputed pi_old (`is_lib`);
  # stale rollouts (rollout.max_staleness > 0) always recompute it and log the is/* metrics.
  k = pipe_lib.staleness(config)
  is_fn = pipe_lib.mismatch_fn(rollout_cfg) if k else is_lib.weights_fn(rollout_cfg)
  need_old = not on_policy or is_fn is not None
  # rollout.max_staleness / rollout.devices: the sampler's part of a step (`collect`) runs
  # in `rlhf_jax.rollout_pipeline` (lagged parameters, a background thread, the sampler's
  # devices); the old / reference log-prob passes then run here with the current ones.
  sync = not pipe_lib.enabled(config)
  # Synchronous rollouts: nothing else holds the state's arrays while the update runs, so
  # it is donated (the new state is written over the old one instead of beside it; the
  # pipeline's sampler thread may still be reading the parameters, so it keeps them).
  update = make_update(model, tx, algo, P, temperature, rollout_cfg.max_new_tokens,
                       micro_batches_of(mb_rows, rollout_cfg.train_micro_batch), frozen,
                       on_policy=on_policy,
                       group_size=share if micro_rows % share == 0 else 1, donate=sync)
  # This step's FLOPs and tokens (`rlhf_jax.flops`), read by train_loop's `compute`.
  counts = {}
  passes = int(need_old) + int(need_ref)
  rollout_counts = functools.partial(
      rollout.compute_counts, mcfg, P, rollout_cfg, G, share if lp_rows % share == 0 else 1)

  def sample(params, batch, key, into):
    ro = rollout.generate_rollout(
        model_config=mcfg, params=params, ref_params=ref_params,
        prompt_tokens_NP=batch["tokens"], prompt_mask_NP=batch["mask"], group_size=G, rng=key,
        rollout_cfg=rollout_cfg, tokenizer=tokenizer,
        reward_fn=reward_fn.score if reward_fn else None, metadata=train_meta(batch["index"]),
        logps_fn=logps_fn, need_ref=need_ref and sync, need_old=need_old and sync,
        episode=episode)
    for name, v in rollout_counts(ro, passes=passes if sync else 0).items():
      into[name] = into.get(name, 0) + v
    return ro

  def collect(params, batch, step, into):
    """The sampler's part of step `step`: sample (+ DAPO refills), counted into `into`."""
    key = jax.random.fold_in(rng_rollout, step)
    ro = sample(params, batch, key, into)
    # before any refill: what the policy produced
    stats = rollout.rollout_stats(ro, G, episode.max_turns if episode else 1)
    if algo["dynamic_sampling"]:
      ro, stats["refill_rounds"] = refill(params, ro, step, key, into)
    return ro, stats

  def job(params, step, batch):  # the pipeline's: the sampler's part, its own counts
    into = {}
    return pipe_lib.Sampled(*collect(params, batch, step, into), into)

  pipe = None if sync else pipe_lib.Pipeline(
      job, k=k, start=start, num_steps=config.num_steps, get_batch=lambda i: train_ds[i],
      to_sampler=pipe_lib.to_sampler_fn(sampler_mesh), workdir=workdir)

  def rl_step(state, batch):
    step = int(state["step"])
    t_start = time.perf_counter()
    counts.clear()
    policy = frozen.full(state["params"])  # LoRA: adapters merged into the base
    if sync:
      ro, stats = collect(policy, batch, step, counts)
    else:
      ro, stats = pipe.next(step, policy, counts, lambda ro: pipe_lib.finish(
          ro, logps_fn, policy, ref_params, lp_rows, need_old=need_old, need_ref=need_ref),
          passes=lambda ro: rollout_counts(ro, passes=passes)["flops/logprob_passes"])
    del policy
    advantages_BC = advantages(algo, ro, G, per_turn=rollout_cfg.get("turn_rewards") == "per_turn")
    if algo["variant"] == "dapo" and algo["overlong_cache"] > 0:
      overlong_from = rollout_cfg.max_new_tokens - algo["overlong_cache"]
      stats["overlong_frac"] = float((ro.lengths_B > overlong_from).mean())
    # The minibatch arrays, named as the rollout and the loss name them.
    arrays = {"sequences_BS": ro.sequences_BS, "segment_ids_BS": ro.segment_ids_BS,
              "mask_BC": ro.completion_mask_BC, "old_logps_BC": ro.old_logps_BC,
              "advantages_BC": advantages_BC,
              "ref_logps_BC": ro.ref_logps_BC if ro.ref_logps_BC is not None
              else np.zeros_like(ro.old_logps_BC)}
    if is_fn is not None:  # rollout.is_correction: sampler-mismatch weights and metrics
      weights_BC, is_metrics = is_fn(ro.old_logps_BC, ro.sample_logps_BC, ro.completion_mask_BC)
      if weights_BC is not None:  # None: k > 0 without a correction (metrics only)
        arrays["is_weights_BC"] = np.asarray(weights_BC)
      stats.update({f"is/{k}": float(v) for k, v in is_metrics.items()})
    # The sampler's and the log-prob passes' temporaries are freed: their pages go back to
    # the OS (`allocator.release_free_memory`), so the update's do not come on top of them
    # in RSS (the tuned malloc keeps freed memory; re-faulting it costs < 1% of a step).
    allocator.release_free_memory()
    t0 = time.perf_counter()
    perm_key = np.random.default_rng([config.seed, step])
    mb_size = B // algo["minibatches"]
    for _ in range(algo["epochs"]):
      perm = (perm_key.permutation(B) if share == 1 else  # whole groups, in random order
              (perm_key.permutation(N)[:, None] * G + np.arange(G)).reshape(-1))
      for i in range(algo["minibatches"]):
        idx = perm[i * mb_size:(i + 1) * mb_size]
        state, m = update(state, parallel.shard_batch({k: v[idx] for k, v in arrays.items()},
                                                      mesh))
    jax.block_until_ready(state["params"])
    t_update = time.perf_counter() - t0
    upd, remat = flops_lib.window_train_flops(mcfg, mb_size, P, rollout_cfg.max_new_tokens,
                                              share if micro_rows % share == 0 else 1)
    n_updates = algo["epochs"] * algo["minibatches"]
    counts.update({"flops/update": n_updates * upd, "flops/remat": n_updates * remat,
                   "tokens/trained": int((ro.segment_ids_BS > 0).sum()) * algo["epochs"]})
    total = time.perf_counter() - t_start
    rollout_tokens = int(ro.lengths_B.sum())
    stats.update({f"time/{k}": v for k, v in ro.timings.items()})
    stats.update({"time/update": t_update, "time/step": total,
                  "rollout_tokens_per_second": rollout_tokens / max(ro.timings["generate"], 1e-9),
                  "train_tokens_per_second": int(ro.segment_ids_BS.sum()) * algo["epochs"]
                  / max(t_update, 1e-9), "accuracy": accuracy(ro)})
    state = {**state, "step": state["step"] + 1}
    return state, {**jax.device_get(m), **stats}

  def refill(params, ro, step, key, into):
    """DAPO dynamic sampling: replace zero-variance groups by fresh ones (same shapes)."""
    rounds = 0
    while rounds < algo["max_refill_rounds"]:
      dead = rollout.zero_variance_groups(ro.rewards_B, G)
      if not dead.any():
        break
      extra = sample(params, refill_ds[step * algo["max_refill_rounds"] + rounds],
                     jax.random.fold_in(key, 1000 + rounds), into)
      ro = rollout.replace_groups(ro, extra, dead, G)
      rounds += 1
    return ro, rounds

  def evaluate(params, step):
    return policy_eval(frozen.full(params), step)

  with pipe_lib.closing(pipe):
    return loop.train_loop(
        config, workdir, state=state, start=start, train_step=rl_step,
        get_batch=lambda i: train_ds[i], mesh=mesh,
        checkpointer=pipe.checkpointer(checkpointer) if pipe else checkpointer,
        schedule=lambda s: schedule(s * updates_per_step), shard_batches=False,
        updates_per_step=updates_per_step,
        evaluate=evaluate if policy_eval is not None else None,
        desc=f"grpo[{algo['variant']}]", progress_keys=("reward_mean", "eval_accuracy"),
        count_tokens=None, extra_metrics={f"data_{k}": v for k, v in data_stats.items()},
        compute=lambda _: dict(counts))


def validate(config, num_devices: int | None = None) -> None:
  """The checks of a GRPO config that need no files: the shared sections
  (`rlhf_jax.config.validate`), the rollout section, and the grpo section with the
  variant's values for knobs left at auto (each checked against its registry), and the
  minibatch split (num_devices=None: the config alone). ConfigError naming the key."""
  from rlhf_jax.losses.advantages import ESTIMATORS
  from rlhf_jax.losses.grpo import IMPORTANCE_LEVELS, KL_MODES, resolve
  from rlhf_jax.losses.kl import KL_ESTIMATORS
  from rlhf_jax.losses.ppo import AGGREGATION_MODES
  from rlhf_jax.trainers import online_rl_config
  config_lib.validate(config, online_rl_config.trainer_devices(config, num_devices))
  online_rl_config.validate_rollout(config, num_devices)
  if "grpo" not in config:
    return
  check = config_lib.Checks(config)
  need, num = check.need, check.num
  r, g = config.rollout, config.grpo
  try:
    algo = resolve(g)  # the variant's values for knobs left at auto
  except ValueError as e:
    raise config_lib.ConfigError(str(e)) from None
  for key, options in (("advantage", tuple(ESTIMATORS)),
                       ("aggregation", tuple(AGGREGATION_MODES)),
                       ("importance", IMPORTANCE_LEVELS), ("kl_mode", KL_MODES),
                       ("kl_estimator", tuple(KL_ESTIMATORS))):
    if algo[key] not in options:
      raise config_lib.ConfigError(f"config.grpo.{key}={algo[key]!r}: expected one of "
                                   f"{'|'.join(options)}")
  for key, lo, hi in (("clip_eps_low", 0.0, 1.0), ("clip_eps_high", 0.0, None),
                      ("kl_coef", 0.0, None)):
    need(config_lib.is_num(algo[key]) and algo[key] >= lo and (hi is None or algo[key] < hi),
         f"grpo.{key}", f"must be >= {lo}" + (f" and < {hi}" if hi else "")
         + f" (or -1 = the variant's value), got {algo[key]}")
  need(algo["dynamic_sampling"] in (0, 1), "grpo.dynamic_sampling",
       f"expected 0 or 1 (or -1 = the variant's value), got {algo['dynamic_sampling']}")
  need(g.get("old_logps", "auto") in ("auto", "recompute"), "grpo.old_logps",
       f"expected auto or recompute, got {g.get('old_logps')!r}")
  need(isinstance(g.get("share_prompt", True), bool), "grpo.share_prompt",
       f"expected True or False, got {g.get('share_prompt')!r}")
  num("grpo.epochs", 1, integer=True)
  num("grpo.minibatches", 1, integer=True)
  num("grpo.std_eps", 0.0)
  num("grpo.max_refill_rounds", 0, integer=True)
  num("grpo.overlong_cache", 0, integer=True)
  need(g.overlong_cache <= r.max_new_tokens, f"grpo.overlong_cache={g.overlong_cache}",
       f"the overlong window must fit in rollout.max_new_tokens={r.max_new_tokens}")
  adv = algo["advantage"]
  if ESTIMATORS[adv].needs_groups:
    if r.group_size < 2:
      raise config_lib.ConfigError(
          f"config.rollout.group_size={r.group_size}: grpo.advantage={adv!r} (variant "
          f"{g.variant!r}) compares the completions of a prompt with each other and needs "
          f"group_size >= 2")
    if r.temperature <= 0:
      raise config_lib.ConfigError(
          f"config.rollout.temperature={r.temperature}: greedy decoding gives every "
          f"completion of a prompt the same text, so grpo.advantage={adv!r} would be 0; "
          f"sample with temperature > 0")
  online_rl_config.check_minibatches(config, "grpo", num_devices)
