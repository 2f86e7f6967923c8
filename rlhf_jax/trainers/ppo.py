"""PPO for RLHF (actor-critic): `run(config, workdir)`.

Follows Ziegler et al. 2019 / Ouyang et al. 2022 and "The N Implementation
Details of RLHF with PPO" (Huang et al. 2024); every detail is a knob in
`config.ppo`:

  rollout   G samples per prompt (`rlhf_jax.rollout`), scored by `config.reward.spec`
  values    critic V(s_t) at the state before each completion token (old values)
  rewards   r_t = -beta * k1(logp_old, logp_ref)  (+ score at the last token)
            score optionally whitened over the batch (`whiten_rewards`)
            beta: fixed, or the adaptive controller (target KL, horizon; Ziegler et al.)
  GAE       advantages, returns with (gamma, lam) (`losses.advantages.gae`),
            advantages whitened over the batch (`whiten_advantages`)
  update    `epochs` x `minibatches` steps of the clipped surrogate (+ dual clip),
            clipped value loss (vf_coef), entropy bonus (`losses.ppo.ppo_loss`)

Critic: `ppo.critic="separate"` is its own network (backbone initialised from
the policy, or from a reward model with `ppo.critic_init`); "shared" is a
scalar head on the policy's final hidden states. Params: {"policy", "value"}.
The KL controller's state is part of the checkpointed train state.
With LoRA (config.lora.rank > 0) the policy and a separate critic's backbone get
adapters, the value head is trained fully, and the frozen policy base is the reference.
"""
from __future__ import annotations

import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import checkpoint as ckpt_lib
from rlhf_jax import allocator
from rlhf_jax import config as config_lib
from rlhf_jax import flops as flops_lib
from rlhf_jax import parallel, rollout
from rlhf_jax import rollout_pipeline as pipe_lib
from rlhf_jax.losses import advantages as adv_lib
from rlhf_jax.losses import is_correction as is_lib
from rlhf_jax.losses import kl as kl_lib
from rlhf_jax.losses.ppo import entropy_from_logits, explained_variance, ppo_loss
from rlhf_jax.models import Transformer
from rlhf_jax.models.api import token_logprobs_from_hidden
from rlhf_jax.models.heads import ScalarHead, ScalarModel, backbone_params_from_lm
from rlhf_jax import workdir as workdir_lib
from rlhf_jax.data import prompt_sets
from rlhf_jax.trainers import loop
from rlhf_jax.trainers import optim
from rlhf_jax.trainers import setup
from rlhf_jax.trainers import state as state_lib
from rlhf_jax.trainers import step as step_lib
from rlhf_jax.trainers.grpo import accuracy as grpo_accuracy
from rlhf_jax.trainers.grpo import micro_batches_of


class PolicyValue(nn.Module):
  """Policy logits [B, S, V] and values [B, S] from {"policy", "value"} params.

  output="hidden": the policy's final hidden states [B, S, D] instead of its logits
  (`make_update` unembeds them a chunk at a time when model.logits_chunk > 0)."""
  config: object
  critic: str = "separate"

  @nn.compact
  def __call__(self, tokens_BS, segment_ids_BS, output="logits"):
    lm = Transformer(self.config, name="policy")
    if self.critic == "shared":
      h, _ = lm(tokens_BS, segment_ids_BS, output="hidden")
      return h if output == "hidden" else lm.unembed(h), ScalarHead(name="value")(h)
    out, _ = lm(tokens_BS, segment_ids_BS, output=output)
    return out, ScalarModel(self.config, name="value")(tokens_BS, segment_ids_BS)


def completion_slice(x_BS, P):
  """Entries at the states *before* each completion token: positions P-1 .. S-2."""
  return x_BS[:, P - 1:-1]


def make_update(model, tx, p, P, temperature, max_len, micro_batches=1, frozen=None,
                donate=False):
  """update(state, minibatch) -> (state, metrics): one jitted PPO step (policy + critic);
  with LoRA (`frozen`, `state_lib.Frozen`) the frozen base state["base"] is an argument of
  the compiled step.
  model.config.logits_chunk > 0: the policy's log-probs and entropies come from its
  hidden states, that many completion positions unembedded at a time
  (`models.api.token_logprobs_from_hidden`); the value head is unchanged.
  A minibatch with is_weights_BC (rollout.is_correction) weights the per-token surrogate.
  donate: the state passed in is donated (`state_lib.jit_step`; see `grpo.make_update`)."""
  chunk = model.config.logits_chunk
  lm = Transformer(model.config)

  def loss_fn(params, mb):
    if chunk:  # model.logits_chunk: `chunk` completion positions unembedded at a time
      h, values = model.apply({"params": params}, mb["sequences_BS"], mb["segment_ids_BS"],
                              output="hidden")
      logps_BC, entropy_BC = token_logprobs_from_hidden(
          lm, params["policy"], completion_slice(h, P), mb["sequences_BS"][:, P:], chunk=chunk,
          temperature=temperature, entropy=True)
    else:
      logits, values = model.apply({"params": params}, mb["sequences_BS"], mb["segment_ids_BS"])
      logits = completion_slice(logits, P) / temperature
      logps_BC = jnp.take_along_axis(jax.nn.log_softmax(logits), mb["sequences_BS"][:, P:, None],
                                 axis=-1)[..., 0]
      entropy_BC = entropy_from_logits(logits)  # logged always; in the loss when entropy_coef > 0
    return ppo_loss(logps_BC, mb["old_logps_BC"], mb["advantages_BC"], completion_slice(values, P),
                    mb["old_values_BC"], mb["returns_BC"], mb["mask_BC"], clip_eps=p.clip_eps,
                    clip_eps_high=p.clip_eps_high if p.clip_eps_high > 0 else None,
                    dual_clip=p.dual_clip if p.dual_clip > 0 else None,
                    value_clip_eps=p.value_clip_eps if p.value_clip_eps > 0 else None,
                    vf_coef=p.vf_coef, entropy_BC=entropy_BC, entropy_coef=p.entropy_coef,
                    aggregation=p.aggregation, max_len=max_len,
                    is_weights_BC=mb.get("is_weights_BC"))

  return state_lib.jit_step(step_lib.make_step(
      loss_fn, tx, micro_batches, step_lib.aggregation_weight(p.aggregation), count_step=False,
      frozen=frozen), donate=donate)


def initial_params(model: PolicyValue, p, config, lm_params, rng):
  """{"policy", "value"} to start from (None without pretrained `lm_params`): the policy
  is `lm_params`; a separate critic's backbone is the policy's (or ppo.critic_init's
  reward model, backbone and head), a shared critic's head and a fresh critic head are
  PolicyValue's random init under `rng` (only that subtree is computed: jit drops the
  rest of the init, the same numbers as the whole init's)."""
  if lm_params is None:
    return None
  dummy = jnp.zeros((1, 2), jnp.int32)
  fresh_value = lambda *path: state_lib.unboxed_init(model, rng, dummy, dummy + 1,
                                                     path=("value", *path))
  if p.critic != "separate":
    return {"policy": lm_params, "value": fresh_value()}
  if p.critic_init:  # e.g. a reward model's workdir: its backbone and head
    try:
      _, critic = workdir_lib.load_init(p.critic_init, config.model.dtype, config.model.remat,
                                        families=workdir_lib.LM_OR_RM[1:])
    except (ckpt_lib.CheckpointError, FileNotFoundError, ValueError) as e:
      raise ckpt_lib.CheckpointError(f"config.ppo.critic_init={p.critic_init}: {e}") from None
    return {"policy": lm_params, "value": {"backbone": critic["backbone"], "head": critic["head"]}}
  return {"policy": lm_params, "value": {"backbone": backbone_params_from_lm(lm_params),
                                         "head": fresh_value("head")}}


def run(config, workdir: str) -> dict:
  validate(config, jax.device_count())
  os.makedirs(workdir, exist_ok=True)
  p, rollout_cfg = config.ppo, config.rollout
  G, N = rollout_cfg.group_size, rollout_cfg.prompts_per_step
  B = N * G
  mesh, sampler_mesh = pipe_lib.meshes(config)  # rollout.devices: a separate sampler sub-mesh

  # Data, tokenizer, reward.
  train_src, eval_src, data_stats = prompt_sets.load(config, workdir)
  tokenizer = setup.build_tokenizer(config, workdir, lambda: prompt_sets.corpus(train_src))
  train_ds, train_meta = prompt_sets.batches(config, tokenizer, train_src, N, config.seed)
  reward_fn = setup.reward_fn_from_config(config)  # None: rollout.env's rewards alone
  episode = setup.episode_config(config)  # rollout.env: multi-turn episodes

  # Policy + critic; the reference is the initial policy.
  rng_init, rng_rollout = jax.random.split(jax.random.PRNGKey(config.seed))
  mcfg, lm_params = setup.policy_init(config, tokenizer)
  model = PolicyValue(mcfg, p.critic)
  dummy = jnp.zeros((1, 2), jnp.int32)
  init_params = initial_params(model, p, config, lm_params, rng_init)
  updates_per_step = p.epochs * p.minibatches
  tx, schedule = optim.make_optimizer(config.optimizer, config.num_steps * updates_per_step)
  # With config.lora.rank > 0: LoRA adapters on the policy (and a separate critic's
  # backbone), the value head trained fully; the frozen policy base is the reference.
  state, shardings, frozen = state_lib.create_train_state(
      lambda k: model.init(k, dummy, dummy + 1)["params"], tx, mesh, rng_init, init_params,
      config=config, always_trained=("head",) if p.critic == "separate" else ("value",),
      workdir=workdir)
  del init_params, lm_params  # the host copies of the weights: on the devices now
  kl_ctl = kl_lib.kl_controller_init(p.kl_coef)
  shardings["kl_ctl"] = jax.tree.map(lambda _: parallel.replicated(mesh), kl_ctl)
  # on the mesh from the start, as the update returns it: one compilation of the update
  state["kl_ctl"] = jax.device_put(kl_ctl, shardings["kl_ctl"])
  ref_params = frozen.initial(state["params"], "policy")
  policy_eval = setup.policy_eval(config, mcfg, tokenizer, eval_src, workdir, ref_params)
  checkpointer, start, state = setup.open_run(config, workdir, state, shardings, mcfg,
                                               tokenizer)

  P = train_ds[0]["tokens"].shape[1]
  temperature = rollout_cfg.temperature if rollout_cfg.temperature > 0 else 1.0
  logps_fn = rollout.completion_logps_fn(mcfg, P, temperature)
  values_fn = jax.jit(lambda params, s, g: completion_slice(
      model.apply({"params": params}, s, g)[1], P))
  # rollout.max_staleness / rollout.devices: sampling and reward run in
  # `rlhf_jax.rollout_pipeline` (lagged policy, a background thread, the sampler's devices);
  # the old-policy, reference and value passes run here with the current parameters.
  sync = not pipe_lib.enabled(config)
  # Synchronous rollouts: the update's state is donated (`grpo.run` says why only then).
  update = make_update(model, tx, p, P, temperature, rollout_cfg.max_new_tokens,
                       micro_batches_of(B // p.minibatches, rollout_cfg.train_micro_batch), frozen,
                       donate=sync)
  # rollout.is_correction (None = off); stale rollouts (rollout.max_staleness > 0) log is/*.
  k = pipe_lib.staleness(config)
  is_fn = pipe_lib.mismatch_fn(rollout_cfg) if k else is_lib.weights_fn(rollout_cfg)

  counts = {}  # this step's FLOPs and tokens, read by train_loop's `compute`

  def sample(policy, step, batch):
    return rollout.generate_rollout(
        model_config=mcfg, params=policy, ref_params=ref_params,
        prompt_tokens_NP=batch["tokens"], prompt_mask_NP=batch["mask"], group_size=G,
        rng=jax.random.fold_in(rng_rollout, step), rollout_cfg=rollout_cfg, tokenizer=tokenizer,
        reward_fn=reward_fn.score if reward_fn else None, metadata=train_meta(batch["index"]),
        logps_fn=logps_fn, need_ref=sync, need_old=sync, episode=episode)

  def job(policy, step, batch):
    ro = sample(policy, step, batch)
    return pipe_lib.Sampled(ro, rollout.rollout_stats(ro, G), rollout.compute_counts(
        mcfg, P, rollout_cfg, G, 1, ro, passes=0))

  pipe = None if sync else pipe_lib.Pipeline(
      job, k=k, start=start, num_steps=config.num_steps, get_batch=lambda i: train_ds[i],
      to_sampler=pipe_lib.to_sampler_fn(sampler_mesh), workdir=workdir)

  def rl_step(state, batch):
    step = int(state["step"])
    t_start = time.perf_counter()
    params = frozen.full(state["params"])  # LoRA: adapters merged into the base
    counts.clear()
    if sync:
      ro = sample(params["policy"], step, batch)
      stats = rollout.rollout_stats(ro, G, episode.max_turns if episode else 1)
      counts.update(rollout.compute_counts(mcfg, P, rollout_cfg, G, 1, ro, passes=2))
    else:
      ro, stats = pipe.next(step, params["policy"], counts, lambda ro: pipe_lib.finish(
          ro, logps_fn, params["policy"], ref_params, rollout_cfg.logprob_micro_batch,
          need_old=True, need_ref=True), passes=lambda ro: rollout.compute_counts(
              mcfg, P, rollout_cfg, G, 1, ro, passes=2)["flops/logprob_passes"])
    for k, v in compute_counts(mcfg, p, B, ro.sequences_BS.shape[1], P, ro).items():
      counts[k] = counts.get(k, 0) + v
    t0 = time.perf_counter()
    mask_BC = ro.completion_mask_BC
    old_values_BC = rollout.micro_batched(lambda s, g: values_fn(params, s, g),
                                          rollout_cfg.logprob_micro_batch, ro.sequences_BS,
                                          ro.segment_ids_BS) * mask_BC
    scores_B = ro.rewards_B
    if p.whiten_rewards:
      scores_B = np.asarray(adv_lib.whiten(scores_B, np.ones_like(scores_B), shift_mean=False))
    beta = float(state["kl_ctl"]["beta"])
    per_turn = rollout_cfg.get("turn_rewards") == "per_turn" and ro.env_rewards_BC is not None
    if per_turn:  # multi-turn: each env turn's reward at its last model token (rest at the end)
      scores_B = scores_B - ro.reward_parts["env"]
    rewards_BC = kl_lib.kl_penalty_rewards(ro.old_logps_BC, ro.ref_logps_BC, mask_BC, beta,
                                           p.kl_estimator, scores_B=scores_B)
    if per_turn:
      rewards_BC = rewards_BC + ro.env_rewards_BC
    # Multi-turn: mask_BC is 0 on env tokens, which GAE passes through (the next model
    # token's value bootstraps across the gap, `adv_lib.gae`).
    advantages_BC, returns_BC = adv_lib.gae(rewards_BC, old_values_BC, mask_BC, p.gamma, p.lam)
    if p.whiten_advantages:
      advantages_BC = adv_lib.whiten(advantages_BC, mask_BC)
    stats["time/advantages"] = time.perf_counter() - t0
    del params
    # The minibatch arrays, named as the rollout and the loss name them.
    arrays = {"sequences_BS": ro.sequences_BS, "segment_ids_BS": ro.segment_ids_BS,
              "mask_BC": mask_BC,
              "old_logps_BC": ro.old_logps_BC, "old_values_BC": old_values_BC.astype(np.float32),
              "advantages_BC": np.asarray(advantages_BC, np.float32),
              "returns_BC": np.asarray(returns_BC, np.float32)}
    if is_fn is not None:  # rollout.is_correction: sampler-mismatch weights and metrics
      weights_BC, is_metrics = is_fn(ro.old_logps_BC, ro.sample_logps_BC, mask_BC)
      if weights_BC is not None:  # None: k > 0 without a correction (metrics only)
        arrays["is_weights_BC"] = np.asarray(weights_BC)
      stats.update({f"is/{k}": float(v) for k, v in is_metrics.items()})
    # The sampler's and the log-prob passes' temporaries are freed: their pages go back to
    # the OS (`allocator.release_free_memory`), so the update's do not come on top of them
    # in RSS (the tuned malloc keeps freed memory; re-faulting it costs < 1% of a step).
    allocator.release_free_memory()
    t0 = time.perf_counter()
    perm_rng = np.random.default_rng([config.seed, step])
    mb = B // p.minibatches
    for _ in range(p.epochs):
      perm = perm_rng.permutation(B)
      for i in range(p.minibatches):
        idx = perm[i * mb:(i + 1) * mb]
        state, m = update(state, parallel.shard_batch({k: v[idx] for k, v in arrays.items()},
                                                      mesh))
    jax.block_until_ready(state["params"])
    t_update = time.perf_counter() - t0
    # KL to the reference of this rollout (per sequence, summed over tokens) -> controller.
    seq_kl = float((np.asarray(kl_lib.kl_estimate(ro.old_logps_BC, ro.ref_logps_BC, "k1"))
                    * mask_BC).sum(1).mean())
    kl_ctl = kl_lib.kl_controller_update(state["kl_ctl"], seq_kl, B,
                                         p.kl_target if p.adaptive_kl else None, p.kl_horizon)
    state = {**state, "step": state["step"] + 1, "kl_ctl": kl_ctl}
    stats.update({f"time/{k}": v for k, v in ro.timings.items()})
    stats.update({"time/update": t_update, "time/step": time.perf_counter() - t_start,
                  "kl_coef": beta, "kl_seq": seq_kl,
                  "rollout_values_explained_variance": float(explained_variance(
                      old_values_BC, np.asarray(returns_BC), mask_BC)),
                  "rollout_tokens_per_second": float(ro.lengths_B.sum())
                  / max(ro.timings["generate"], 1e-9),
                  "train_tokens_per_second": float(ro.segment_ids_BS.sum()) * p.epochs
                  / max(t_update, 1e-9)})
    if "math" in ro.reward_parts or ro.episodes is not None:
      stats["accuracy"] = grpo_accuracy(ro)
    return state, {**jax.device_get(m), **stats}

  def evaluate(params, step):
    return policy_eval(frozen.full(params)["policy"], step)

  with pipe_lib.closing(pipe):
    return loop.train_loop(
        config, workdir, state=state, start=start, train_step=rl_step,
        get_batch=lambda i: train_ds[i], mesh=mesh,
        checkpointer=pipe.checkpointer(checkpointer) if pipe else checkpointer,
        schedule=lambda s: schedule(s * updates_per_step), shard_batches=False,
        updates_per_step=updates_per_step,
        evaluate=evaluate if policy_eval is not None else None, desc="ppo",
        progress_keys=("reward_mean", "eval_accuracy"), count_tokens=None,
        extra_metrics={f"data_{k}": v for k, v in data_stats.items()},
        compute=lambda _: dict(counts))


def policy_value_flops(mcfg, critic: str, rows: int, S: int, unembed: int) -> int:
  """A forward of `PolicyValue` over rows x S: the policy (`unembed` positions per row)
  plus the scalar value head (2 D a position) on the shared trunk, or plus a separate
  critic network of the same shape."""
  f = flops_lib.forward_flops(mcfg, rows, S, unembed) + rows * S * 2 * mcfg.d_model
  if critic == "separate":
    f += flops_lib.forward_flops(mcfg, rows, S, 0)
  return f


def compute_counts(mcfg, p, B: int, S: int, P: int, ro) -> dict:
  """The PPO-specific part of a step's FLOPs and tokens (`rlhf_jax.flops`), the rollout's
  in `rollout.compute_counts` (sampling, old and reference log-prob passes): the value pass
  (the whole `PolicyValue` forward over [B, S], every position unembedded) and
  ppo.epochs forward + backward passes of policy and critic over the B rows (completion
  positions unembedded with model.logits_chunk, else all); tokens/trained = the real
  tokens of the trained rows x epochs."""
  value_pass = policy_value_flops(mcfg, p.critic, B, S, S)
  unembed = S - P if mcfg.logits_chunk else S
  nets = 2 if p.critic == "separate" else 1
  return {"flops/logprob_passes": value_pass,
          "flops/update": p.epochs * 3 * policy_value_flops(mcfg, p.critic, B, S, unembed),
          "flops/remat": p.epochs * nets * flops_lib.remat_flops(mcfg, B, S),
          "tokens/trained": int((ro.segment_ids_BS > 0).sum()) * p.epochs}


def validate(config, num_devices: int | None = None) -> None:
  """The checks of a PPO config that need no files: the shared sections
  (`rlhf_jax.config.validate`), the rollout section, the ppo section (aggregation and KL
  estimator from their registries) and the minibatch split (num_devices=None: the config
  alone). ConfigError naming the key."""
  from rlhf_jax.losses.kl import KL_ESTIMATORS
  from rlhf_jax.losses.ppo import AGGREGATION_MODES
  from rlhf_jax.trainers import online_rl_config
  config_lib.validate(config, online_rl_config.trainer_devices(config, num_devices))
  online_rl_config.validate_rollout(config, num_devices)
  if "ppo" not in config:
    return
  check = config_lib.Checks(config)
  need, num, is_num = check.need, check.num, config_lib.is_num
  p = config.ppo
  check.choice("ppo.critic", ("separate", "shared"))
  need(not (p.critic_init and p.critic == "shared"), "ppo.critic_init",
       "a reward model to initialise the critic needs ppo.critic='separate' (a shared "
       "critic is a head on the policy)")
  num("ppo.gamma", 0.0, 1.0)
  num("ppo.lam", 0.0, 1.0)
  num("ppo.clip_eps", 0.0, 1.0, lo_open=True, hi_open=True)
  need(p.clip_eps_high == -1 or (is_num(p.clip_eps_high) and p.clip_eps_high >= 0),
       "ppo.clip_eps_high", f"must be >= 0 (or -1 = clip_eps), got {p.clip_eps_high}")
  need(p.dual_clip == -1 or (is_num(p.dual_clip) and p.dual_clip > 1), "ppo.dual_clip",
       f"must be > 1 (or -1 = off), got {p.dual_clip}")
  need(p.value_clip_eps == -1 or (is_num(p.value_clip_eps) and p.value_clip_eps > 0),
       "ppo.value_clip_eps", f"must be > 0 (or -1 = off), got {p.value_clip_eps}")
  num("ppo.vf_coef", 0.0)
  num("ppo.entropy_coef", 0.0)
  num("ppo.kl_coef", 0.0)
  check.choice("ppo.aggregation", tuple(AGGREGATION_MODES))
  check.choice("ppo.kl_estimator", tuple(KL_ESTIMATORS))
  need(not (p.whiten_rewards and config.rollout.get("env") and
             config.rollout.get("turn_rewards") == "per_turn"), "ppo.whiten_rewards",
       "whitens the episode scores, which rollout.turn_rewards=per_turn spreads over the "
       "turns; set one of them off (ppo.whiten_rewards=False or rollout.turn_rewards=sum)")
  if p.adaptive_kl:
    num("ppo.kl_target", 0.0, lo_open=True)
    num("ppo.kl_horizon", 0, lo_open=True)
  num("ppo.epochs", 1, integer=True)
  num("ppo.minibatches", 1, integer=True)
  online_rl_config.check_minibatches(config, "ppo", num_devices)
