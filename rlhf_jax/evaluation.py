"""Policy evaluation shared by every policy trainer (SFT, DPO, PPO, GRPO).

Two evaluations, run at step 0 and at every eval step, so that a report can
put any two algorithms side by side on the same held-out prompts:

**Held-out prompts** (`make_prompt_eval`): rows `{"prompt", "answer"?}`.

  greedy decoding      eval_reward              total of the eval reward spec
                       eval_reward/<label>      each component (e.g. gold, proxy)
                       eval_accuracy            the `math` component (gold accuracy)
                       eval_length, eval_finished   mean completion tokens, EOS rate
  sampling (T = 1)     eval_sampled_reward/<label>  the same components on `samples`
                                                completions per prompt
                       eval_kl                  KL(pi || pi_ref) per sequence (nats):
                                                mean_x sum_t [log pi(y_t|.) - log pi_ref(y_t|.)],
                                                y ~ pi(.|x) -- the unbiased "k1" estimate
                                                (Schulman 2020, "Approximating KL divergence")

  pi_ref is the policy the run started from (the SFT model for RL and DPO), so
  eval_kl is the x-axis of the reward-vs-KL frontier and of the
  over-optimisation plot (Gao et al. 2022 use d = sqrt(KL)).

**Capability set** (`make_capability_eval`, the alignment tax): rows
`{"prompt", "completion"}` of a skill the optimisation does not target.

  capability_nll           token-mean NLL of completion + EOS given the prompt
  capability_exact_match   greedy completion == reference (stripped)

Every function compiles once: prompts are padded to a multiple of the micro-batch
(padding rows are dropped from the means). The sampling key is a function of
config.eval_seed only -- not of the run's seed nor the step -- so every run, step
and algorithm evaluates with the same random numbers (common random numbers): the
same parameters always get the same eval, runs that start from one checkpoint have
identical step-0 evals, and differences between evals are differences between
policies, not eval noise.
"""
from __future__ import annotations

import os
import types

import jax
import numpy as np

from rlhf_jax import metrics as metrics_lib
from rlhf_jax import parallel, rollout, sampling
from rlhf_jax.data import prompts as prompt_data
from rlhf_jax.data import sft as sft_data
from rlhf_jax.losses.logprobs import shift_for_next_token
from rlhf_jax.losses.sft import sft_loss_sums, sft_loss_sums_from_logps
from rlhf_jax.models import Transformer
from rlhf_jax.models.api import token_logprobs_from_hidden

MICRO = 128  # rows per generate / log-prob call


def _messages(prompt):
  return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def read_prompt_rows(path: str, limit: int) -> list[dict]:
  """The first `limit` rows {"prompt": str | messages, "answer"?: str} of a JSONL file."""
  rows = []
  for lineno, row in sft_data.read_jsonl_rows(path, required=("prompt",)):
    if not isinstance(row["prompt"], (str, list)):
      raise sft_data.DataError(f"{path}:{lineno}: 'prompt' must be a string or a list of "
                               f"messages, got {type(row['prompt']).__name__}")
    rows.append({"prompt": row["prompt"], "answer": str(row.get("answer", ""))})
    if len(rows) >= limit:
      break
  return rows


def _padded(rows: list, micro: int) -> list:
  """rows repeated at the end to a multiple of `micro` (fixed shapes)."""
  return rows + [rows[-1]] * ((-len(rows)) % micro)


def make_prompt_eval(*, model_config, tokenizer, examples, max_prompt_len: int,
                     max_new_tokens: int, reward_fn, ref_params=None, kl: bool = True,
                     workdir: str | None = None, num_samples: int = 0, samples: int = 1,
                     episode=None):
  """evaluate(params, step, rng) -> metrics dict (see the module docstring).

  examples: [{"prompt", "answer"}]; reward_fn: a `CombinedReward` (labels name the
  eval_reward/<label> metrics; None with an episode: the env's rewards alone);
  ref_params: the reference policy (None: no eval_kl); the first `num_samples` greedy
  completions are appended to WORKDIR/samples.jsonl; `samples` completions per prompt are
  drawn for the sampled metrics. episode: a `rollout_multiturn.EpisodeConfig`
  (rollout.env): every eval prompt is an episode; eval_env/* are the greedy episodes'
  metrics (`rollout_multiturn.episode_stats`), eval_sampled_env/* the sampled ones',
  eval_accuracy the greedy success rate when no `math` reward is given, eval_length
  the model tokens.
  """
  n = len(examples)
  if n == 0:
    raise ValueError("prompt eval: no examples")
  micro = min(MICRO, n)
  padded = _padded(list(examples), micro)
  tokens, mask = prompt_data.tokenize_prompts(padded, tokenizer, max_prompt_len)
  P = tokens.shape[1]
  logps_fn = rollout.completion_logps_fn(model_config, P, 1.0)
  meta = {"answer": [ex.get("answer", "") for ex in padded],
          "prompt_messages": [_messages(ex["prompt"]) for ex in padded]}
  math_labels = [label for label, fn, _ in (reward_fn.components if reward_fn else ())
                 if getattr(fn, "name", "") == "math"]
  do_kl = kl and ref_params is not None

  def decode(params, rng, greedy):
    k = 1 if greedy else samples
    cfg = types.SimpleNamespace(temperature=0.0 if greedy else 1.0, top_k=0, top_p=1.0,
                                max_new_tokens=max_new_tokens, generate_micro_batch=micro * k,
                                logprob_micro_batch=micro * k)
    return rollout.generate_rollout(
        model_config=model_config, params=params, ref_params=ref_params,
        prompt_tokens_NP=tokens, prompt_mask_NP=mask, group_size=k, rng=rng, rollout_cfg=cfg,
        tokenizer=tokenizer, reward_fn=reward_fn.score if reward_fn else None, metadata=meta,
        logps_fn=logps_fn, need_ref=not greedy and do_kl,
        progress=f"eval {'greedy' if greedy else 'sampled'} ({n} prompts)", episode=episode)

  initial_length = []  # greedy eval length of the step-0 policy (for eval_length_drift)

  def step0_length(step, length):
    if step == 0:
      initial_length[:] = [length]
    elif not initial_length and workdir:  # resumed run: the step-0 row is in metrics.jsonl
      rows = [r for r in metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
              if r.get("step") == 0 and "eval_length" in r]
      if rows:
        initial_length[:] = [float(rows[0]["eval_length"])]
    return initial_length[0] if initial_length else None

  def evaluate(params, step, rng):
    g = decode(params, rng, greedy=True)
    out = {"eval_reward": float(g.rewards_B[:n].mean()),
           "eval_length": float(g.lengths_B[:n].mean()),
           "eval_finished": float(g.finished_B[:n].mean())}
    # Reward-hacking monitors: length drift from the initial policy, degenerate repetition,
    # and (sampled, below) gold-vs-proxy disagreement and gap.
    first = step0_length(step, out["eval_length"])
    if first is not None:
      out["eval_length_drift"] = out["eval_length"] - first
    out["eval_repetition_rate"] = float(rollout.repetition_rate(
        g.sequences_BS[:n, P:], g.completion_mask_BC[:n]).mean())
    out.update({f"eval_reward/{k}": float(v[:n].mean()) for k, v in g.reward_parts.items()})
    if math_labels:
      out["eval_accuracy"] = out[f"eval_reward/{math_labels[0]}"]
    if g.episodes is not None:  # multi-turn: the greedy episodes' metrics
      from rlhf_jax.rollout_multiturn import episode_stats
      out.update(episode_stats({k: v[:n] for k, v in g.episodes.items()}, episode.max_turns,
                               prefix="eval_env/"))
      out.setdefault("eval_accuracy", out["eval_env/success"])
    if do_kl:
      s = decode(params, jax.random.fold_in(rng, 1), greedy=False)
      real = slice(0, n * samples)  # rows of prompt i are i*samples .. (i+1)*samples - 1
      out["eval_kl"] = float((s.old_logps_BC - s.ref_logps_BC)[real].sum(1).mean())
      out.update({f"eval_sampled_reward/{k}": float(v[real].mean())
                  for k, v in s.reward_parts.items()})
      if s.episodes is not None:  # multi-turn: the sampled episodes' metrics
        from rlhf_jax.rollout_multiturn import episode_stats
        out.update(episode_stats({k: v[real] for k, v in s.episodes.items()},
                                 episode.max_turns, prefix="eval_sampled_env/"))
      real_ro = s._replace(sequences_BS=s.sequences_BS[real],
                           completion_mask_BC=s.completion_mask_BC[real],
                           reward_parts={k: v[real] for k, v in s.reward_parts.items()})
      monitors = rollout.hacking_monitors(real_ro, samples, prefix="eval_sampled_")
      monitors.pop("eval_sampled_repetition_rate")
      out.update(monitors)
    if workdir and num_samples and parallel.is_primary():
      k = min(num_samples, n)
      metrics_lib.append_jsonl(os.path.join(workdir, "samples.jsonl"), step, [
          {"prompt": m[-1]["content"], "completion": c, "reference": a, "reward": float(r)}
          for m, c, a, r in zip(meta["prompt_messages"][:k], g.texts[:k], meta["answer"][:k],
                                g.rewards_B[:k])])
    return out

  return evaluate


def make_capability_eval(*, model_config, tokenizer, path: str, num_examples: int,
                         max_new_tokens: int, max_seq_len: int | None = None):
  """evaluate(params, rng) -> {capability_nll, capability_exact_match} on the first
  `num_examples` rows {"prompt", "completion"} of `path` (see the module docstring)."""
  rows = sft_data.read_jsonl_rows(path)[:num_examples]
  pairs = [sft_data.row_to_messages(path, lineno, row) for lineno, row in rows]
  n = len(pairs)
  micro = min(MICRO, n)
  T = max_seq_len or model_config.max_seq_len
  tmp = [(sft_data.encode_prompt(tokenizer, m), tokenizer.encode(c) + [tokenizer.eos_id])
         for m, c in pairs]
  examples = []
  for (p_ids, c_ids), (lineno, _) in zip(tmp, rows):
    if len(p_ids) + len(c_ids) > T:
      raise sft_data.DataError(f"{path}:{lineno}: capability example is "
                               f"{len(p_ids) + len(c_ids)} tokens, longer than {T}")
    examples.append((np.asarray(p_ids + c_ids, np.int32),
                     np.asarray([0] * len(p_ids) + [1] * len(c_ids), np.int32)))
  arrays = sft_data.pad_examples(_padded(examples, micro), T, tokenizer.pad_id)
  model = Transformer(model_config)

  chunk = model_config.logits_chunk

  @jax.jit
  def nll_sums(params, tokens, seg, loss_mask):
    if chunk:  # model.logits_chunk: no [B, T, V] logits (`token_logprobs_from_hidden`)
      h, _ = model.apply({"params": params}, tokens, seg, output="hidden")
      h, targets, mask = shift_for_next_token(h, tokens, loss_mask)
      return sft_loss_sums_from_logps(
          token_logprobs_from_hidden(model, params, h, targets, chunk=chunk), mask)
    logits, _ = model.apply({"params": params}, tokens, seg)
    return sft_loss_sums(*shift_for_next_token(logits, tokens, loss_mask))

  prompts = _padded([{"prompt": m} for m, _ in pairs], micro)
  p_tokens, p_mask = prompt_data.tokenize_prompts(prompts, tokenizer,
                                                  max(len(p) for p, _ in tmp))
  refs = [c.strip() for _, c in pairs]

  def evaluate(params, rng):
    nll = count = 0.0
    for i in range(0, n, micro):  # padding rows (beyond n) are excluded below
      sl = slice(i, i + micro)
      w = (np.arange(i, i + micro) < n).astype(np.int32)[:, None]
      s, c = nll_sums(params, arrays["tokens"][sl], arrays["segment_ids"][sl],
                      arrays["loss_mask"][sl] * w)
      nll, count = nll + float(s), count + float(c)
    hits = []
    for i in range(0, len(prompts), micro):
      out = sampling.generate(model_config, params, p_tokens[i:i + micro], p_mask[i:i + micro],
                              rng, max_new_tokens=max_new_tokens, greedy=True,
                              eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
      toks, m = np.asarray(out.tokens_BN), np.asarray(out.mask_BN)
      hits += [tokenizer.decode([int(t) for t, k in zip(row, mm) if k and t != tokenizer.eos_id]
                                ).strip() for row, mm in zip(toks, m)]
    return {"capability_nll": nll / max(count, 1.0),
            "capability_exact_match": float(np.mean([h == r for h, r in zip(hits[:n], refs)]))}

  return evaluate


def from_config(config, *, model_config, tokenizer, ref_params, workdir, prompt_examples=None,
                max_prompt_len=None, max_new_tokens=None, reward_spec=None, episode=None):
  """The trainer-facing wrapper: evaluate(params, step) -> dict combining the prompt
  eval (when prompt examples are given or config.prompt_eval.path is set) and the
  capability eval (config.capability.path); None when neither is configured.

  RL trainers pass their held-out prompts and reward spec; SFT/DPO read
  config.prompt_eval (path, num_prompts, max_prompt_len, max_new_tokens).
  """
  from rlhf_jax.rewards import make_reward_fn
  parts = []
  num_samples = config.sample.num_prompts if prompt_examples and "sample" in config else 0
  pe = config.get("prompt_eval")
  if prompt_examples is None and pe is not None and pe.path:
    prompt_examples = read_prompt_rows(pe.path, pe.num_prompts)
    max_prompt_len, max_new_tokens = pe.max_prompt_len, pe.max_new_tokens
  if prompt_examples:
    # multi-turn (episode): the env's rewards, plus eval_reward_spec / reward.spec if set
    spec = config.get("eval_reward_spec", "") or reward_spec or (None if episode else "math")
    parts.append(make_prompt_eval(
        model_config=model_config, tokenizer=tokenizer, examples=prompt_examples,
        max_prompt_len=max_prompt_len, max_new_tokens=max_new_tokens,
        reward_fn=make_reward_fn(spec) if spec else None, ref_params=ref_params,
        kl=config.get("eval_kl", True), workdir=workdir, num_samples=num_samples,
        samples=config.get("eval_samples", 1), episode=episode))
  cap = config.get("capability")
  if cap is not None and cap.path:
    c = make_capability_eval(model_config=model_config, tokenizer=tokenizer, path=cap.path,
                             num_examples=cap.num_examples, max_new_tokens=cap.max_new_tokens)
    parts.append(lambda params, step, rng: c(params, rng))
  if not parts:
    return None

  key = jax.random.PRNGKey(config.get("eval_seed", 0))

  def evaluate(params, step):
    rng = key  # the same at every step: evals differ only through the policy
    out = {}
    for i, f in enumerate(parts):
      out.update(f(params, step, jax.random.fold_in(rng, i)))
    return out
  return evaluate


def needs_reference(config) -> bool:
  """Whether SFT/DPO must keep a copy of the initial policy (for eval_kl on prompt_eval)."""
  pe = config.get("prompt_eval")
  return bool(config.get("eval_kl", True) and pe is not None and pe.path)
