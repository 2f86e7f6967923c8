"""Multi-turn rollouts (issue #21): the turn-by-turn sampler against a full forward pass, the
model-token masks in every loss / advantage, GAE across env gaps against a float64
reference, the config checks. A scripted environment and the tiny byte tokenizer of
conftest keep it fast; the kill-and-resume run is in test_multiturn_train.py."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import CharTokenizer
from rlhf_jax import rollout as rollout_lib
from rlhf_jax import rollout_multiturn as mt
from rlhf_jax.envs.base import EnvStep
from rlhf_jax.losses import advantages as adv_lib
from rlhf_jax.losses import kl as kl_lib
from rlhf_jax.losses.grpo import VARIANTS, grpo_loss
from rlhf_jax.losses.logprobs import token_logprobs
from rlhf_jax.losses.ppo import ppo_loss
from rlhf_jax.models import ModelConfig, init_params, lm_logits
from rlhf_jax.sampling import generate



class AsciiTokenizer(CharTokenizer):
  """conftest's byte tokenizer on ASCII only (every sampled id decodes)."""
  vocab_size = 3 + 128


TOK = AsciiTokenizer()
CFG = ModelConfig(vocab_size=TOK.vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                  head_dim=8, d_ff=64, max_seq_len=96)
LENGTHS = [6, 3, 5, 1]   # real prompt tokens of the left-padded batch
P, C = 6, 64


class ScriptedEnv:
  """Three turns: observations "ab", "wxyz", then done; reward = turn number / 10; a tool
  call counted on turn 2; correct when the last turn's text is non-empty."""
  observation_role = "tool"

  def reset(self, row, seed):
    self.t, self.seed = 0, seed

  def step(self, text):
    self.t += 1
    info = {"turn": self.t, "tool_calls": int(self.t == 2)}
    if self.t == 3:
      return EnvStep(None, 0.3, True, {**info, "correct": bool(text)})
    return EnvStep(("ab", "wxyz")[self.t - 1], self.t / 10, False, info)


def _episode(max_turns=3, per_turn=4, chunk=3, stop_strings=("</tool>",), factory=ScriptedEnv):
  """(One stop string always: the sampler compiles once for all the tests here.)"""
  return mt.EpisodeConfig(env_factory=factory, max_turns=max_turns,
                          max_tokens_per_turn=per_turn, env_chunk=chunk, turn_rewards="sum",
                          stop_strings=stop_strings)


@pytest.fixture(scope="module")
def params():
  p = jax.jit(init_params, static_argnums=0)(CFG, jax.random.PRNGKey(0))
  return jax.tree.map(lambda x: x * 8.0 if x.ndim > 1 else x, p)  # peaked next-token dists


@pytest.fixture(scope="module")
def prompts():
  rng = np.random.default_rng(0)
  mask = (np.arange(P)[None, :] >= P - np.array(LENGTHS)[:, None]).astype(np.int32)
  tokens = np.where(mask > 0, rng.integers(3, CFG.vocab_size, (len(LENGTHS), P)), TOK.pad_id)
  return tokens.astype(np.int32), mask


def _run(params, prompts, episode, greedy=False, seed=1, max_new_tokens=C):
  envs = [episode.env_factory() for _ in LENGTHS]
  for i, e in enumerate(envs):
    e.reset({}, i)
  return mt.run_episodes(
      model_config=CFG, params=params, prompt_tokens_BP=prompts[0], prompt_mask_BP=prompts[1],
      rng=jax.random.PRNGKey(seed), row_offset=0, envs_B=envs, episode=episode, tokenizer=TOK,
      max_new_tokens=max_new_tokens, temperature=0.8, top_k=0, top_p=1.0, greedy=greedy)


@pytest.fixture(scope="module")
def episodes(params, prompts):
  return _run(params, prompts, _episode())


def _full_logps(params, prompts, tokens_BC, lengths_B, temperature):
  """float64 log-probs [B, C] of the completion tokens by one forward of the whole sequence."""
  seg_c = (np.arange(tokens_BC.shape[1])[None] < lengths_B[:, None]).astype(np.int32)
  seq = np.concatenate([prompts[0], tokens_BC], 1)
  seg = np.concatenate([prompts[1], seg_c], 1)
  logits = lm_logits(CFG, params, seq, seg)[:, P - 1:-1]
  return np.asarray(token_logprobs(logits, jnp.asarray(tokens_BC), temperature), np.float64)


def test_cache_extension_equals_full_forward(params, prompts, episodes):
  """Model tokens sampled after env tokens were appended to the cache (prefill-extend, in
  chunks of 3 at each row's own position) get the log-probs of one forward pass over the
  finished sequence; env tokens sit between the turns, model-token mask 0."""
  ep = episodes
  model, lengths = ep["model_BC"], ep["lengths_B"]
  assert [len(t) for t in ep["turns"]] == [3, 3, 3, 3]
  want = _full_logps(params, prompts, ep["tokens_BC"], lengths, 0.8)
  np.testing.assert_allclose(np.where(model, ep["logprobs_BC"], 0.0), np.where(model, want, 0.0),
                             atol=1e-4)
  assert (ep["logprobs_BC"][~model] == 0).all()
  for b in range(len(LENGTHS)):
    t = ep["turns"][b]
    text = TOK.decode(ep["tokens_BC"][b, :lengths[b]])
    # the env's turns rendered by the chat template between the model turns
    assert text == (t[0]["text"] + "\ntool: ab\nassistant: " + t[1]["text"]
                    + "\ntool: wxyz\nassistant: " + t[2]["text"]), text
    env_tokens = len(TOK.encode("\ntool: ab\nassistant: \ntool: wxyz\nassistant: "))
    assert lengths[b] - model[b].sum() == env_tokens
    assert model[b, :lengths[b]].sum() == sum(len(TOK.encode(s["text"])) for s in t)
    assert not model[b, lengths[b]:].any() and (ep["tokens_BC"][b, lengths[b]:] == TOK.pad_id).all()


def test_one_turn_equals_generate(params, prompts):
  """An episode of one turn samples exactly `sampling.generate`'s tokens (same noise)."""
  N = 12
  ep = _run(params, prompts, _episode(max_turns=1, per_turn=N))
  out = generate(CFG, params, *prompts, jax.random.PRNGKey(1), max_new_tokens=N,
                 temperature=0.8, eos_id=TOK.eos_id, pad_id=TOK.pad_id)
  np.testing.assert_array_equal(ep["tokens_BC"][:, :N], np.asarray(out.tokens_BN))
  np.testing.assert_array_equal(ep["model_BC"][:, :N], np.asarray(out.mask_BN) > 0)
  assert not ep["model_BC"][:, N:].any() and (ep["tokens_BC"][:, N:] == TOK.pad_id).all()
  np.testing.assert_allclose(ep["logprobs_BC"][:, :N], np.asarray(out.logprobs_BN), atol=1e-5)


def test_same_rng_same_episodes(params, prompts, episodes):
  again = _run(params, prompts, _episode())
  np.testing.assert_array_equal(again["tokens_BC"], episodes["tokens_BC"])
  np.testing.assert_array_equal(again["logprobs_BC"], episodes["logprobs_BC"])
  other = _run(params, prompts, _episode(), seed=2)
  assert not np.array_equal(other["tokens_BC"], episodes["tokens_BC"])


def test_stop_sequence_ends_the_turn(params, prompts, episodes):
  """A stop sequence (as the tool-call end "</tool>") ends a model turn in the decode loop:
  with the 2nd-3rd tokens of row 0's first turn as the stop string (same rng) that turn
  ends after its 3rd token; the env receives the text up to the stop string."""
  ids = [int(t) for t in episodes["tokens_BC"][0, :4]]
  stop = TOK.decode(ids[1:3])
  assert stop not in TOK.decode(ids[:2])
  cut = _run(params, prompts, _episode(max_turns=1, stop_strings=(stop,)))
  assert cut["lengths_B"][0] == 3 and cut["turns"][0][0]["text"] == TOK.decode(ids[:3])
  np.testing.assert_array_equal(cut["tokens_BC"][0, :3], ids[:3])


def test_host_cut_at_stop_string():
  """The host's check: a stop string the token-level check missed (e.g. tokenized
  differently) cuts the turn after the token completing it, the text at its end."""

  class Merged(CharTokenizer):  # token 300 decodes to "l>x": "</tool>" ends inside it
    vocab_size = 301

    def decode(self, ids):
      return "".join("l>x" if i == 300 else super(Merged, self).decode([i]) for i in ids)
  tok = Merged()
  ids = tok.encode("a</too") + [300] + tok.encode("zz")
  assert mt.cut_at_stop(tok, ids, ("</tool>",)) == (7, "a</tool>")
  assert mt.cut_at_stop(tok, tok.encode("plain"), ("</tool>",)) == (5, "plain")
  assert mt.stop_sequences(tok, ("</tool>",)) == [tok.encode("</tool>")]


def test_generate_rollout_with_an_env(params, prompts):
  """The Rollout of a multi-turn batch: completion mask = model tokens, segment ids 1 on
  model and env tokens, old log-probs recomputed equal the sampler's, rewards the summed
  env rewards paid at each turn's last model token, a group of G episodes per prompt
  sharing the env seed, env/* metrics."""
  G = 2
  seeds = []

  class Env(ScriptedEnv):
    def reset(self, row, seed):
      super().reset(row, seed)
      seeds.append((row["answer"], seed))
  import types
  r = types.SimpleNamespace(temperature=0.8, top_k=0, top_p=1.0, max_new_tokens=C,
                            generate_micro_batch=4, logprob_micro_batch=8)
  tokens, mask = prompts[0][:2], prompts[1][:2]
  ro = rollout_lib.generate_rollout(
      model_config=CFG, params=params, ref_params=params, prompt_tokens_NP=tokens,
      prompt_mask_NP=mask, group_size=G, rng=jax.random.PRNGKey(3), rollout_cfg=r,
      tokenizer=TOK, reward_fn=None, metadata={"answer": ["1", "2"],
                                                "prompt_messages": [[], []]},
      need_ref=True, episode=_episode(factory=Env),
      logps_fn=rollout_lib.completion_logps_fn(CFG, P, 0.8, group_size=G))  # packed groups
  B = 4
  assert [s[0] for s in seeds] == ["1", "1", "2", "2"]
  assert seeds[0][1] == seeds[1][1] != seeds[2][1] == seeds[3][1]
  m = ro.completion_mask_BC > 0
  seg_c = ro.segment_ids_BS[:, P:] > 0
  assert (m <= seg_c).all() and (seg_c & ~m).sum(1).min() > 0   # env tokens: seg 1, mask 0
  np.testing.assert_array_equal(ro.lengths_B, m.sum(1))
  np.testing.assert_allclose(ro.old_logps_BC, ro.sample_logps_BC, atol=1e-4)
  np.testing.assert_array_equal(ro.ref_logps_BC, ro.old_logps_BC)  # ref = policy here
  assert (ro.old_logps_BC[~m] == 0).all() and (ro.sample_logps_BC[~m] == 0).all()
  np.testing.assert_allclose(ro.rewards_B, np.full(B, 0.1 + 0.2 + 0.3), rtol=1e-6)
  np.testing.assert_array_equal(ro.reward_parts["env"], ro.rewards_B)
  for b in range(B):  # each turn's reward at its last model token
    ends = np.flatnonzero(ro.env_rewards_BC[b])
    np.testing.assert_allclose(ro.env_rewards_BC[b, ends], [0.1, 0.2, 0.3], rtol=1e-6)
    assert m[b, ends].all() and not m[b, ends[:2] + 1].any()
  stats = rollout_lib.rollout_stats(ro, G, max_turns=3)
  assert stats["env/turns"] == 3 and stats["env/tool_calls"] == 1
  assert stats["env/tool_call_rate"] == 1 and stats["env/success_by_turn_3"] == stats["env/success"]
  assert stats["env/success_by_turn_2"] == 0
  assert stats["env/model_tokens"] == stats["response_length"] == m.sum() / B
  assert stats["env/env_tokens"] == (seg_c & ~m).sum() / B
  counts = rollout_lib.compute_counts(CFG, P, r, G, 1, ro, passes=2)
  assert counts["flops/generate"] == ro.generate_flops > 0


# ----------------------------------------------------------------------------
# (a) masks: env tokens reach no loss, KL term, advantage or gradient
# ----------------------------------------------------------------------------

def _gapped(seed, B=6, T=14):
  """A [B, T] model-token mask with env gaps (turns of 2-4 model tokens, gaps of 1-3 env
  tokens, a ragged tail) and its env mask."""
  rng = np.random.default_rng(seed)
  mask = np.zeros((B, T), np.int32)
  env = np.zeros((B, T), bool)
  for b in range(B):
    t = 0
    while t < T - 2:
      n = int(rng.integers(2, 5))
      mask[b, t:t + n] = 1
      t += n
      g = int(rng.integers(1, 4))
      env[b, t:t + g] = t + g < T - 1
      t += g
    env[b] &= mask[b].cumsum() < mask[b].sum()  # env tokens lie between model turns
  return rng, mask, env


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_env_token_logps_change_no_loss_or_gradient(variant):
  """Every GRPO-family variant's loss (surrogate, clip, KL term, aggregation) and its
  gradient are the same when the new / old / reference log-probs of env tokens change
  arbitrarily; the gradient at env tokens is exactly 0."""
  rng, mask, env = _gapped(0)
  B, T = mask.shape
  a = dict(VARIANTS[variant])
  lp = rng.normal(-2.0, 0.3, (B, T)).astype(np.float32)
  old = lp + rng.normal(0, 0.1, (B, T)).astype(np.float32)
  ref = lp + rng.normal(0, 0.1, (B, T)).astype(np.float32)
  adv = rng.normal(size=(B, T)).astype(np.float32) * mask
  noise = lambda: np.where(env, rng.normal(0, 5.0, (B, T)), 0.0).astype(np.float32)

  def loss(lp_, old_, ref_):
    return grpo_loss(lp_, old_, adv, mask, ref_logps_BC=ref_, aggregation=a["aggregation"],
                     max_len=T, clip_eps_low=a["clip_eps_low"], clip_eps_high=a["clip_eps_high"],
                     importance=a["importance"], kl_beta=0.1, kl_kind=a["kl_estimator"])[0]
  grad = jax.jit(jax.value_and_grad(loss))
  v0, g0 = grad(lp, old, ref)
  v1, g1 = grad(lp + noise(), old + noise(), ref + noise())
  assert float(v0) == float(v1)
  np.testing.assert_array_equal(np.asarray(g0), np.asarray(g1))
  assert (np.asarray(g0)[env] == 0).all() and np.abs(np.asarray(g0)[mask > 0]).max() > 0


def test_env_tokens_change_no_ppo_loss_or_gradient():
  """PPO: new / old log-probs, values, old values, returns and advantages at env tokens
  change neither the loss nor its gradients (policy and value)."""
  rng, mask, env = _gapped(1)
  B, T = mask.shape
  x = {k: rng.normal(-1.0, 0.3, (B, T)).astype(np.float32)
       for k in ("lp", "old", "v", "old_v", "ret", "adv", "ent")}
  noise = lambda: np.where(env, rng.normal(0, 5.0, (B, T)), 0.0).astype(np.float32)

  def loss(lp, v, old, old_v, ret, adv, ent):
    return ppo_loss(lp, old, adv, v, old_v, ret, mask, clip_eps=0.2, value_clip_eps=0.2,
                    vf_coef=0.5, entropy_BC=ent, entropy_coef=0.01)[0]
  grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  v0, (gl0, gv0) = grad(x["lp"], x["v"], x["old"], x["old_v"], x["ret"], x["adv"], x["ent"])
  v1, (gl1, gv1) = grad(*(x[k] + noise() for k in ("lp", "v", "old", "old_v", "ret", "adv",
                                                    "ent")))
  assert float(v0) == float(v1)
  for a, b in ((gl0, gl1), (gv0, gv1)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert (np.asarray(a)[env] == 0).all()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_env_token_logps_change_no_advantage(variant):
  """The trainer's advantages (KL-in-reward variants read old / ref log-probs) at model
  tokens are the same whatever the env tokens' log-probs; 0 at env tokens."""
  from rlhf_jax.trainers import grpo
  rng, mask, env = _gapped(2, B=8)
  B, T = mask.shape
  algo = grpo.resolve(_grpo_section(variant))
  old = (rng.normal(-2.0, 0.3, (B, T)) * mask).astype(np.float32)
  ref = (old + rng.normal(0, 0.1, (B, T)) * mask).astype(np.float32)
  rewards = rng.normal(size=B).astype(np.float32)

  def ro(o, r):
    return rollout_lib.Rollout(None, None, mask, o, o, r, rewards, {}, mask.sum(1),
                               np.ones(B, bool), 0, [], {})
  noise = lambda: np.where(env, rng.normal(0, 5.0, (B, T)), 0.0).astype(np.float32)
  a0 = grpo.advantages(algo, ro(old, ref), 4)
  a1 = grpo.advantages(algo, ro(old + noise(), ref + noise()), 4)
  np.testing.assert_array_equal(a0, a1)
  assert (a0[env] == 0).all() and np.abs(a0[mask > 0]).max() > 0


def _grpo_section(variant):
  from ml_collections import ConfigDict
  from rlhf_jax.launch import load_config
  g = load_config("configs/grpo.py:tiny").grpo
  return ConfigDict({**g.to_dict(), "variant": variant})


def test_update_ignores_env_token_logps():
  """The GRPO train step (a 1-layer policy, SGD): perturbing the old and reference
  log-probs of env tokens leaves the new parameters bit for bit unchanged; perturbing
  them at a model token changes them (the test can fail)."""
  import optax
  from rlhf_jax.models import Transformer
  from rlhf_jax.trainers import grpo
  rng, mask, env = _gapped(3, B=4, T=10)
  B, T = mask.shape
  Pq = 3
  mcfg = ModelConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1,
                     head_dim=8, d_ff=32)
  params = jax.jit(init_params, static_argnums=0)(mcfg, jax.random.PRNGKey(0))
  state = {"step": jnp.zeros((), jnp.int32), "params": params,
           "opt_state": optax.sgd(1.0).init(params)}
  seg_c = ((mask > 0) | env).astype(np.int32)
  old = (rng.normal(-3.0, 0.1, (B, T)) * mask).astype(np.float32)
  mb = {"sequences_BS": rng.integers(0, 32, (B, Pq + T)).astype(np.int32),
        "segment_ids_BS": np.concatenate([np.ones((B, Pq), np.int32), seg_c], 1),
        "mask_BC": mask, "old_logps_BC": old,
        "advantages_BC": (rng.normal(size=(B, 1)) * mask).astype(np.float32),
        "ref_logps_BC": (old - 0.1 * mask).astype(np.float32)}
  update = grpo.make_update(Transformer(mcfg), optax.sgd(1.0), dict(VARIANTS["grpo"]), Pq, 1.0,
                            T)
  noise = np.where(env, 3.0, 0.0).astype(np.float32)
  base = update(state, mb)[0]["params"]
  same = update(state, {**mb, "old_logps_BC": old + noise,
                        "ref_logps_BC": mb["ref_logps_BC"] - noise})[0]["params"]
  at_model = np.zeros_like(noise)
  at_model[0, np.flatnonzero(mask[0])[0]] = 0.5
  moved = update(state, {**mb, "ref_logps_BC": mb["ref_logps_BC"] + at_model})[0]["params"]
  leaves = lambda t: [np.asarray(x) for x in jax.tree.leaves(t)]
  for a, b in zip(leaves(base), leaves(same)):
    np.testing.assert_array_equal(a, b)
  assert max(float(np.abs(a - b).max()) for a, b in zip(leaves(base), leaves(moved))) > 0


# ----------------------------------------------------------------------------
# (d) GAE and token rewards across env gaps vs float64 numpy references
# ----------------------------------------------------------------------------

def _gae_reference(rewards, values, mask, gamma, lam):
  """float64 GAE over each row's model tokens only (env tokens removed, then put back):
  the value of the next model token bootstraps across an env gap."""
  adv = np.zeros(rewards.shape, np.float64)
  for b in range(rewards.shape[0]):
    idx = np.flatnonzero(mask[b])
    r, v = rewards[b, idx].astype(np.float64), values[b, idx].astype(np.float64)
    a, nxt_v, nxt_a = np.zeros(len(idx)), 0.0, 0.0
    for i in reversed(range(len(idx))):
      delta = r[i] + gamma * nxt_v - v[i]
      a[i] = nxt_a = delta + gamma * lam * nxt_a
      nxt_v = v[i]
    adv[b, idx] = a
  return adv, np.where(mask > 0, adv + values, 0.0)


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8)])
def test_gae_bootstraps_across_env_gaps(gamma, lam):
  """PPO's advantages and returns with env gaps in the mask equal GAE over the model
  tokens alone (float64 reference): env tokens are transparent, not terminal, not steps;
  PPO's rewards put the score on the episode's last model token, not the env tail."""
  rng, mask, env = _gapped(4, B=6, T=16)
  B, T = mask.shape
  values = rng.normal(size=(B, T)).astype(np.float32)
  old = rng.normal(-2, 0.3, (B, T)).astype(np.float32)
  ref = old + rng.normal(0, 0.2, (B, T)).astype(np.float32)
  scores = rng.normal(size=B).astype(np.float32)
  rewards = np.asarray(kl_lib.kl_penalty_rewards(old, ref, mask, 0.1, "k1", scores_B=scores))
  last = np.array([np.flatnonzero(m)[-1] for m in mask])
  want_r = np.where(mask > 0, -0.1 * (old.astype(np.float64) - ref), 0.0)
  want_r[np.arange(B), last] += scores
  np.testing.assert_allclose(rewards, want_r, rtol=1e-5, atol=1e-6)
  adv, ret = adv_lib.gae(rewards, values, mask, gamma, lam)
  want_adv, want_ret = _gae_reference(rewards, values, mask, gamma, lam)
  np.testing.assert_allclose(np.asarray(adv), want_adv, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(ret), want_ret, rtol=1e-5, atol=1e-5)
  # not vacuous: treating the env tokens as steps gives other advantages
  steps, _ = adv_lib.gae(rewards, values, np.maximum(mask, env), gamma, lam)
  assert np.abs(np.asarray(steps) - want_adv)[mask > 0].max() > 1e-3


def test_reinforce_pp_per_turn_rewards():
  """REINFORCE++ with rollout.turn_rewards=per_turn: the KL penalty on model tokens, each
  env turn's reward at its turn's last model token, the remaining score at the end;
  returns over model tokens, whitened over them (float64 reference)."""
  from rlhf_jax.trainers import grpo
  rng, mask, env = _gapped(5, B=5, T=16)
  B, T = mask.shape
  old = (rng.normal(-2, 0.3, (B, T)) * mask).astype(np.float32)
  ref = (old + rng.normal(0, 0.2, (B, T)) * mask).astype(np.float32)
  turn = np.zeros((B, T), np.float32)
  for b in range(B):  # a reward at the last token of every turn
    m = mask[b]
    ends = np.flatnonzero((m > 0) & (np.append(m[1:], 0) == 0))
    turn[b, ends] = rng.normal(size=len(ends))
  extra = rng.normal(size=B).astype(np.float32)  # e.g. reward.spec on the final answer
  env_sum = turn.sum(1)
  ro = rollout_lib.Rollout(None, None, mask, old, old, ref, (env_sum + extra).astype(np.float32),
                           {"env": env_sum.astype(np.float32)}, mask.sum(1), np.ones(B, bool),
                           0, [], {}, env_rewards_BC=turn)
  algo = grpo.resolve(_grpo_section("reinforce_pp"))
  got = grpo.advantages(algo, ro, 1, per_turn=True)
  beta = algo["kl_coef"]
  r = np.where(mask > 0, -beta * (old.astype(np.float64) - ref), 0.0) + turn
  last = np.array([np.flatnonzero(m)[-1] for m in mask])
  r[np.arange(B), last] += (env_sum + extra).astype(np.float32) - env_sum.astype(np.float32)
  ret = np.where(mask > 0, np.cumsum(r[:, ::-1], 1)[:, ::-1], 0.0)
  real = ret[mask > 0]
  want = np.where(mask > 0, (ret - real.mean()) / np.sqrt(real.var() + 1e-8), 0.0)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  summed = grpo.advantages(algo, ro, 1, per_turn=False)  # all of it at the end: differs
  assert np.abs(summed - got).max() > 1e-3


# ----------------------------------------------------------------------------
# Config checks
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("over,expect", [
    ({"rollout.env": "nosuch"}, "config.rollout.env"),
    ({"rollout.env": "guess_number", "rollout.sampler": "continuous"}, "config.rollout.sampler"),
    ({"rollout.env": "guess_number", "rollout.max_staleness": 1}, "config.rollout.max_staleness"),
    ({"rollout.env": "guess_number", "rollout.stop_at_eos": False}, "config.rollout.stop_at_eos"),
    ({"rollout.env": "guess_number", "rollout.max_turns": 0}, "config.rollout.max_turns"),
    ({"rollout.env": "guess_number", "rollout.max_tokens_per_turn": 9},
     "config.rollout.max_tokens_per_turn"),
    ({"rollout.env": "guess_number", "rollout.env_tokens_per_call": 0},
     "config.rollout.env_tokens_per_call"),
    ({"rollout.env": "guess_number", "rollout.turn_rewards": "each"}, "config.rollout.turn_rewards"),
    ({"reward.spec": ""}, "config.reward.spec"),
])
def test_config_checks(over, expect):
  from conftest import override
  from rlhf_jax.config import ConfigError
  from rlhf_jax.launch import load_config
  from rlhf_jax.trainers import grpo
  c = override(load_config("configs/grpo.py:tiny"), **over)
  with pytest.raises(ConfigError, match=expect.replace(".", r"\.")):
    grpo.validate(c)


def test_config_accepts_env_with_empty_reward_spec():
  from conftest import override
  from rlhf_jax.launch import load_config
  from rlhf_jax.trainers import grpo, ppo
  for algo, mod in (("grpo", grpo), ("ppo", ppo)):
    mod.validate(override(load_config(f"configs/{algo}.py:tiny"),
                          **{"rollout.env": "guess_number", "reward.spec": ""}))


# ----------------------------------------------------------------------------
# SFT on episodes: written as the rollouts write them
# ----------------------------------------------------------------------------

def test_sft_episode_rows_are_written_like_rollouts(tmp_path):
  """Multi-turn SFT rows (messages with weights) are tokenized as the rollout writes an
  episode: every assistant turn learned and ended with EOS (none after a tool call's
  "</tool>": the rollout's turn stops there), the turns in between tokenized as the
  rollout tokenizes env observations (`rollout_multiturn.Renderer`)."""
  import json
  from rlhf_jax.data.sft import encode_prompt, tokenize_sft_file
  msgs = [{"role": "user", "content": "guess 1-8"}, {"role": "assistant", "content": "4"},
          {"role": "user", "content": "higher"},
          {"role": "assistant", "content": "<tool>calculator: 4+2</tool>"},
          {"role": "tool", "content": "6"}, {"role": "assistant", "content": "6"}]
  path = tmp_path / "ep.jsonl"
  path.write_text(json.dumps({"messages": [dict(m, weight=1) if m["role"] == "assistant"
                                           else m for m in msgs]}) + "\n")
  (tokens, mask), = tokenize_sft_file(str(path), TOK, 200)
  r = mt.Renderer(TOK)
  p = encode_prompt(TOK, msgs[:1])
  parts = [(p, 0), (TOK.encode("4") + [TOK.eos_id], 1), (r.tokens("user", "higher", True), 0),
           (TOK.encode("<tool>calculator: 4+2</tool>"), 1), (r.tokens("tool", "6", False), 0),
           (TOK.encode("6") + [TOK.eos_id], 1)]
  np.testing.assert_array_equal(tokens, [t for ids, _ in parts for t in ids])
  np.testing.assert_array_equal(mask, [m for ids, m in parts for _ in ids])
  assert TOK.decode(tokens[len(p):]) == ("4\nuser: higher\nassistant: <tool>calculator: 4+2</tool>"
                                         "\ntool: 6\nassistant: 6")


def test_renderer_drops_the_eos_text_after_eos():
  """chatml with <|im_end|> as EOS: after a turn ended by EOS the observation tokens start
  with "\n" (EOS wrote <|im_end|>); after a turn cut without EOS they close it first."""
  from rlhf_jax.chat_format import render_chat

  class ChatmlTok(AsciiTokenizer):
    def decode(self, ids):
      return "".join("<|im_end|>" if i == self.eos_id else super(ChatmlTok, self).decode([i])
                     for i in ids)

    def apply_chat_template(self, messages, add_generation_prompt=True):
      return render_chat(messages, "chatml", add_generation_prompt)
  tok = ChatmlTok()
  r = mt.Renderer(tok)
  after = "\n<|im_start|>user\nhigher<|im_end|>\n<|im_start|>assistant\n"
  assert tok.decode(r.tokens("user", "higher", True)) == after
  assert tok.decode(r.tokens("user", "higher", False)) == "<|im_end|>" + after


def test_packed_group_update_equals_unpacked_on_episodes(params, prompts):
  """grpo.share_prompt on multi-turn rows: the update with a group's G episodes packed
  behind one prompt equals the unpacked update (env tokens are context in both)."""
  import types
  import optax
  from rlhf_jax.models import Transformer
  from rlhf_jax.trainers import grpo
  G = 2
  r = types.SimpleNamespace(temperature=0.8, top_k=0, top_p=1.0, max_new_tokens=C,
                            generate_micro_batch=4, logprob_micro_batch=4)
  ro = rollout_lib.generate_rollout(
      model_config=CFG, params=params, ref_params=params, prompt_tokens_NP=prompts[0][:2],
      prompt_mask_NP=prompts[1][:2], group_size=G, rng=jax.random.PRNGKey(5), rollout_cfg=r,
      tokenizer=TOK, reward_fn=None, metadata={"answer": ["1", "2"], "prompt_messages": [[], []]},
      need_ref=True, episode=_episode())
  adv = np.array([1.0, -1.0, 0.5, -0.5], np.float32)[:, None] * ro.completion_mask_BC
  mb = {"sequences_BS": ro.sequences_BS, "segment_ids_BS": ro.segment_ids_BS,
        "mask_BC": ro.completion_mask_BC, "old_logps_BC": ro.old_logps_BC,
        "advantages_BC": adv.astype(np.float32), "ref_logps_BC": ro.ref_logps_BC}
  p32 = jax.tree.map(lambda x: x / 8.0 if x.ndim > 1 else x, params)  # unscaled: no overflow
  state = {"step": jnp.zeros((), jnp.int32), "params": p32,
           "opt_state": optax.sgd(1.0).init(p32)}
  algo = dict(VARIANTS["grpo"])
  new = [grpo.make_update(Transformer(CFG), optax.sgd(1.0), algo, P, 0.8, C, group_size=g)(
      state, mb)[0]["params"] for g in (1, G)]
  grads = [jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), p32, n) for n in new]
  for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
    np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-6)
  assert max(float(np.abs(x).max()) for x in jax.tree.leaves(grads[0])) > 1e-4
