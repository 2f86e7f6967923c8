"""rlhf_jax.evaluation against independent references: the sampled KL estimate vs the exact
KL of the next-token distributions (float64 numpy), reward means vs per-prompt decoding,
padding rows excluded, capability NLL vs a per-row float64 log-softmax."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import CharTokenizer
from rlhf_jax import evaluation, sampling
from rlhf_jax.data.sft import encode_prompt
from rlhf_jax.models import ModelConfig, Transformer, init_params
from rlhf_jax.rewards.combine import CombinedReward

CFG = ModelConfig(vocab_size=259, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                  d_ff=64, max_seq_len=48)


class Tok(CharTokenizer):
  def decode(self, ids):  # random models emit arbitrary bytes
    return bytes(i - 3 for i in ids if i >= 3).decode(errors="replace")


TOK = Tok()
_init = jax.jit(init_params, static_argnums=0)  # one compilation, not op-by-op dispatch
_forward = jax.jit(Transformer(CFG).apply)       # (one per sequence length)


def params(seed, scale=1.0):
  p = dict(_init(CFG, jax.random.PRNGKey(seed)))
  p["final_norm"] = {"scale": p["final_norm"]["scale"] * scale}  # peakier next-token dists
  return p


def logsoftmax64(x):
  x = np.asarray(x, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def next_token_logp(p, prompt):
  ids = encode_prompt(TOK, [{"role": "user", "content": prompt}])
  logits, _ = _forward({"params": p}, jnp.asarray([ids]), jnp.ones((1, len(ids)), jnp.int32))
  return logsoftmax64(logits[0, -1])


class Fn:
  def __init__(self, name, f):
    self.name, self.f = name, f

  def __call__(self, prompts, completions, metadata):
    return np.asarray([self.f(c, a) for c, a in zip(completions, metadata["answer"])],
                      np.float32)


def test_eval_kl_matches_exact_kl_of_one_token_completions():
  pol, ref = params(0, 5.0), params(1, 5.0)
  prompt = "ab"
  lp, lq = next_token_logp(pol, prompt), next_token_logp(ref, prompt)
  p = np.exp(lp)
  kl = float((p * (lp - lq)).sum())
  var = float((p * (lp - lq) ** 2).sum()) - kl ** 2
  n = 256  # 64 prompts x 4 samples each
  reward = CombinedReward([("zero", Fn("zero", lambda c, a: 0.0), 1.0)])
  ev = evaluation.make_prompt_eval(
      model_config=CFG, tokenizer=TOK, examples=[{"prompt": prompt, "answer": ""}] * (n // 4),
      max_prompt_len=20, max_new_tokens=1, reward_fn=reward, ref_params=ref, samples=4)
  out = ev(pol, 0, jax.random.PRNGKey(3))
  assert kl > 0.05  # a non-trivial target
  assert abs(out["eval_kl"] - kl) < 4 * np.sqrt(var / n) + 1e-6, (out["eval_kl"], kl)
  same = evaluation.make_prompt_eval(
      model_config=CFG, tokenizer=TOK, examples=[{"prompt": prompt, "answer": ""}] * 8,
      max_prompt_len=20, max_new_tokens=3, reward_fn=reward, ref_params=pol)
  assert abs(same(pol, 0, jax.random.PRNGKey(0))["eval_kl"]) < 1e-4  # pi = pi_ref


def test_prompt_eval_means_match_per_prompt_decoding_with_padding(monkeypatch, tmp_path):
  monkeypatch.setattr(evaluation, "MICRO", 4)  # 6 prompts -> 2 calls, 2 padding rows
  pol = params(0, 5.0)
  prompts = ["a", "bc", "def", "g", "hi", "jkl"]
  texts, reps = [], []
  for pr in prompts:  # independent: one prompt at a time, no padding
    ids = encode_prompt(TOK, [{"role": "user", "content": pr}])
    out = sampling.generate(CFG, pol, np.asarray([ids]), np.ones((1, len(ids)), np.int32),
                            jax.random.PRNGKey(0), max_new_tokens=3, greedy=True,
                            eos_id=TOK.eos_id, pad_id=TOK.pad_id)
    t, m = np.asarray(out.tokens_BN[0]), np.asarray(out.mask_BN[0])
    texts.append(TOK.decode([int(x) for x, k in zip(t, m) if k and x != TOK.eos_id]))
    real = [int(x) for x, k in zip(t, m) if k]
    bigrams = list(zip(real, real[1:]))
    reps.append((len(bigrams) - len(set(bigrams))) / len(bigrams) if bigrams else 0.0)
  # answers: right for prompts 0, 2, 3 only
  answers = [texts[0], "x", texts[2], texts[3], "y", "z"]
  reward = CombinedReward([("gold", Fn("math", lambda c, a: float(c == a)), 1.0),
                           ("len", Fn("len", lambda c, a: float(len(c))), 0.5)])
  ev = evaluation.make_prompt_eval(
      model_config=CFG, tokenizer=TOK,
      examples=[{"prompt": p, "answer": a} for p, a in zip(prompts, answers)],
      max_prompt_len=20, max_new_tokens=3, reward_fn=reward, ref_params=pol,
      workdir=str(tmp_path), num_samples=2)
  out = ev(pol, 7, jax.random.PRNGKey(1))
  assert out["eval_accuracy"] == out["eval_reward/gold"] == pytest.approx(0.5)
  assert out["eval_reward/len"] == pytest.approx(np.mean([len(t) for t in texts]))
  assert out["eval_reward"] == pytest.approx(0.5 + 0.5 * np.mean([len(t) for t in texts]))
  assert {"eval_kl", "eval_sampled_reward/gold", "eval_length", "eval_finished"} <= set(out)
  rows = [json.loads(line) for line in open(tmp_path / "samples.jsonl")]
  assert [r["completion"] for r in rows] == texts[:2] and rows[0]["step"] == 7
  # Hacking monitors: greedy repetition rate; length drift needs the step-0 length, which a
  # resumed run reads from WORKDIR/metrics.jsonl (none here at step 7: no drift logged).
  assert out["eval_repetition_rate"] == pytest.approx(np.mean(reps))
  assert "eval_length_drift" not in out
  with open(tmp_path / "metrics.jsonl", "w") as f:
    f.write(json.dumps({"step": 0, "eval_length": 1.25}) + "\n")
  out = ev(pol, 9, jax.random.PRNGKey(1))
  assert out["eval_length_drift"] == pytest.approx(out["eval_length"] - 1.25)


def test_capability_nll_and_exact_match_match_float64_reference(monkeypatch, tmp_path):
  monkeypatch.setattr(evaluation, "MICRO", 2)  # 3 rows -> padding row excluded
  pol = params(0, 5.0)
  greedy = {}
  for pr in ("ab", "cd"):
    ids = encode_prompt(TOK, [{"role": "user", "content": pr}])
    out = sampling.generate(CFG, pol, np.asarray([ids]), np.ones((1, len(ids)), np.int32),
                            jax.random.PRNGKey(0), max_new_tokens=4, greedy=True,
                            eos_id=TOK.eos_id, pad_id=TOK.pad_id)
    t, m = np.asarray(out.tokens_BN[0]), np.asarray(out.mask_BN[0])
    greedy[pr] = TOK.decode([int(x) for x, k in zip(t, m) if k and x != TOK.eos_id])
  rows = [{"prompt": "ab", "completion": greedy["ab"]}, {"prompt": "cd", "completion": "zz"},
          {"prompt": "efg", "completion": "hello"}]
  path = tmp_path / "cap.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  nll = count = 0.0
  for r in rows:
    p_ids = encode_prompt(TOK, [{"role": "user", "content": r["prompt"]}])
    c_ids = TOK.encode(r["completion"]) + [TOK.eos_id]
    ids = p_ids + c_ids
    logits, _ = _forward({"params": pol}, jnp.asarray([ids]), jnp.ones((1, len(ids)), jnp.int32))
    lp = logsoftmax64(logits[0])
    for j in range(len(p_ids), len(ids)):  # token j predicted from position j - 1
      nll -= lp[j - 1, ids[j]]
      count += 1
  ev = evaluation.make_capability_eval(model_config=CFG, tokenizer=TOK, path=str(path),
                                       num_examples=10, max_new_tokens=4)
  out = ev(pol, jax.random.PRNGKey(0))
  assert out["capability_nll"] == pytest.approx(nll / count, rel=1e-4)
  expected_match = np.mean([greedy["ab"].strip() == greedy["ab"].strip(),
                            greedy["cd"].strip() == "zz", False])
  assert out["capability_exact_match"] == pytest.approx(expected_match)


def test_from_config_is_none_without_eval_sets_and_rejects_bad_prompt_rows(tmp_path):
  from rlhf_jax.config import base_config
  from rlhf_jax.data.sft import DataError
  c = base_config("dpo")
  assert evaluation.from_config(c, model_config=CFG, tokenizer=TOK, ref_params=None,
                                workdir=str(tmp_path)) is None
  assert not evaluation.needs_reference(c)
  bad = tmp_path / "p.jsonl"
  bad.write_text(json.dumps({"prompt": 3}) + "\n")
  with pytest.raises(DataError, match=r"p.jsonl:1: 'prompt' must be a string"):
    evaluation.read_prompt_rows(str(bad), 10)
  c.prompt_eval.path = str(bad)
  assert evaluation.needs_reference(c)
