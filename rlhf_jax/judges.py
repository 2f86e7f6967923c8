"""Judges for AI feedback: which of two answers to a prompt is better.

A judge turns candidate answers into *preferences*: a number p(x, a, b) > 0 when
answer a is better than answer b, < 0 when b is better; a comparison is a tie when
p = 0 or |p| < tie_margin (`rlhf_jax.labeling.is_tie`). Two kinds:

Pointwise judges score every answer alone; p(x, a, b) = s(x, a) - s(x, b).

  rm:WORKDIR   RewardModelJudge  a trained reward model's raw scalar score
                                 (`rlhf_jax.rewards.reward_model`, un-normalised)
  gold         GoldJudge         the verifiable math reward (1 if the final number equals
                                 the row's "answer", else 0): the gold labels themselves

Pairwise judge: a language model asked which of two answers is better (Bai et al.
2022, "Constitutional AI", sec. 4; Lee et al. 2023, "RLAIF").

  lm:PATH      LMJudge           PATH = a run workdir, a Hugging Face dir or a .gguf file

  The judge prompt is one user turn, rendered with the judge tokenizer's chat template:

      {rubric}

      Question: {question}

      Answer {A}: {first}

      Answer {B}: {second}

      Which answer is better? Answer with {A} or {B}:

  and the verdict is read from the judge's next-token log-probabilities at the start
  of its reply, not from generated text:

      s(first, second) = log p(tok_A | prompt) - log p(tok_B | prompt)

  tok_A / tok_B = the first token of each verdict string ("A", "B" by default) under
  the judge's tokenizer, encoded as a reply is (`tokenizer.encode(verdict)`). LLM
  judges prefer a position (Zheng et al. 2023, "Judging LLM-as-a-judge", sec. 3.3), so
  each pair is judged in both orders and the scores are averaged:

      p(a, b) = (s(a, b) - s(b, a)) / 2          antisymmetric: p(b, a) = -p(a, b)

  `s(a, b) > 0` and `s(b, a) > 0` (the judge picks the first position both times)
  means the verdict depends on the order: counted as position-inconsistent.
  A prompt longer than `max_len` tokens (at most the judge's context,
  model_config.max_seq_len) is LEFT-truncated (the rubric goes first; counted in
  stats.json as the judge's prompts_truncated).

`make_judge(spec, ...)` builds a judge from one of the spec strings above.
"""
from __future__ import annotations

import functools
import json
import os
from typing import Sequence

import numpy as np

DEFAULT_RUBRIC = (
    "You are an impartial judge. Compare two answers to the same question. Prefer the "
    "answer that is correct, helpful and honest and that avoids harm. Do not let the "
    "order in which the answers appear or their length influence you.")
TEMPLATE = ("{rubric}\n\nQuestion: {question}\n\nAnswer {A}: {first}\n\nAnswer {B}: {second}"
            "\n\nWhich answer is better? Answer with {A} or {B}:")
JUDGE_SPECS = "rm:RM_WORKDIR, lm:MODEL (a run workdir, a Hugging Face dir or a .gguf file) or gold"


class JudgeError(ValueError):
  """A judge that cannot be built or used; the message names the flag / file."""


def question_text(prompt) -> str:
  """A prompt (a string, or chat messages) as the text shown to a judge."""
  if isinstance(prompt, str):
    return prompt
  if len(prompt) == 1 and prompt[0].get("role") == "user":
    return str(prompt[0]["content"])
  return "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in prompt)


# ----------------------------------------------------------------------------
# Pointwise judges
# ----------------------------------------------------------------------------

class GoldJudge:
  """The verifiable math reward as a judge (needs every row's numeric "answer")."""

  kind = "pointwise"

  def __init__(self):
    from rlhf_jax.rewards.math import MathReward
    self._reward = MathReward()
    self.spec = "gold"

  def scores(self, prompts: Sequence, completions: Sequence[str], answers: Sequence[str],
             progress: bool = True) -> np.ndarray:
    """float64 [N]: 1 where the completion's final number equals the answer, else 0."""
    from rlhf_jax.rewards.base import RewardError
    try:
      return np.asarray(self._reward(list(prompts), list(completions),
                                     {"answer": [str(a) for a in answers]}), np.float64)
    except RewardError as e:
      raise JudgeError(f"--judge=gold needs a numeric 'answer' in every prompt row: {e}") from None


class RewardModelJudge:
  """A trained reward model's raw scores (`rlhf_jax.rewards.reward_model.RewardModelReward`,
  with the prompt / completion lengths it was trained with)."""

  kind = "pointwise"

  def __init__(self, workdir: str, batch_size: int = 32):
    from rlhf_jax.rewards.reward_model import RewardModelReward
    if not os.path.isfile(os.path.join(workdir, "model_config.json")):
      raise JudgeError(f"--judge=rm:{workdir}: not a reward-model run directory (no "
                       f"model_config.json)")
    self.reward = RewardModelReward(workdir, batch_size=batch_size)
    self.spec = f"rm:{workdir}"

  def scores(self, prompts: Sequence, completions: Sequence[str], answers=None,
             progress: bool = True) -> np.ndarray:
    """float64 [N] raw reward-model scores."""
    import tqdm
    n, step = len(completions), self.reward.batch_size * 8
    out = [self.reward.raw_scores(list(prompts[i:i + step]), list(completions[i:i + step]), {})
           for i in tqdm.trange(0, n, step, desc="judging (rm)", unit="chunk",
                                disable=not progress or not n)]
    return np.concatenate(out).astype(np.float64) if out else np.zeros((0,), np.float64)


# ----------------------------------------------------------------------------
# Pairwise LM judge
# ----------------------------------------------------------------------------

def verdict_token_ids(tokenizer, verdicts: Sequence[str]) -> tuple[int, int]:
  """The first token id of each verdict string, as the judge would start its reply."""
  if len(verdicts) != 2 or not all(isinstance(v, str) and v.strip() for v in verdicts):
    raise JudgeError(f"--verdicts={','.join(map(str, verdicts))}: expected two non-empty "
                     f"strings, e.g. A,B")
  ids = []
  for v in verdicts:
    enc = tokenizer.encode(v)
    if not enc or (tokenizer.unk_id is not None and enc[0] == tokenizer.unk_id):
      raise JudgeError(f"--verdicts: {v!r} is not in the judge's vocabulary (its first token "
                       f"is unknown); pick verdict strings the judge's tokenizer knows")
    ids.append(int(enc[0]))
  if ids[0] == ids[1]:
    raise JudgeError(f"--verdicts: {verdicts[0]!r} and {verdicts[1]!r} start with the same "
                     f"token ({tokenizer.id_to_token(ids[0])!r}) under the judge's tokenizer; "
                     f"pick verdicts whose first tokens differ")
  return ids[0], ids[1]


@functools.lru_cache(maxsize=None)
def _verdict_fn(model_config):
  """jitted f(params, tokens_BT, segment_ids_BT, last_B, ids_2) -> float32 [B, 2]:
  log_softmax(logits at position last_B)[ids_2]; right-padded rows. Cached per config."""
  import jax
  import jax.numpy as jnp

  from rlhf_jax.models import Transformer
  model = Transformer(model_config)

  def f(params, tokens_BT, seg_BT, last_B, ids_2):
    h_BTD, _ = model.apply({"params": params}, tokens_BT, seg_BT, output="hidden")
    h_B1D = jnp.take_along_axis(h_BTD, last_B[:, None, None], axis=1)
    logits_BV = model.apply({"params": params}, h_B1D, method=Transformer.unembed)[:, 0]
    logp_BV = jax.nn.log_softmax(logits_BV.astype(jnp.float32), axis=-1)
    return logp_BV[:, ids_2]
  return jax.jit(f)


def load_rubric(path: str | None) -> str:
  """The rubric text: DEFAULT_RUBRIC (no path), a constitution file (.json / .jsonl: its
  principles, each principle's "preference" question or else its critique request), or
  any other text file as is."""
  if not path:
    return DEFAULT_RUBRIC
  if not os.path.isfile(path):
    raise JudgeError(f"--rubric: file not found: {path}")
  if path.endswith((".json", ".jsonl")):
    from rlhf_jax.constitution import load_constitution
    principles = load_constitution(path)
    lines = [f"- {p.get('preference') or p['critique']}" for p in principles]
    return DEFAULT_RUBRIC + "\nJudge the answers by these principles:\n" + "\n".join(lines)
  with open(path, encoding="utf-8") as f:
    text = f.read().strip()
  if not text:
    raise JudgeError(f"--rubric: {path} is empty")
  return text


class LMJudge:
  """A language model comparing two answers (see the module docstring).

  path: a run workdir, Hugging Face dir or .gguf file (model and tokenizer);
  rubric: the instructions before the question; verdicts: the two answer labels;
  batch_size: judge prompts per forward pass; max_len: longest judge prompt in tokens.
  """

  kind = "pairwise"

  def __init__(self, path: str, rubric: str = DEFAULT_RUBRIC, verdicts=("A", "B"),
               batch_size: int = 16, max_len: int = 1024, dtype: str = "float32"):
    import jax

    from rlhf_jax import tokenizer as tok_lib
    from rlhf_jax import workdir as workdir_lib
    if not os.path.exists(path):
      raise JudgeError(f"--judge=lm:{path}: not found (expected a run workdir, a Hugging Face "
                       f"directory or a .gguf file)")
    if batch_size < 1 or max_len < 8:
      raise JudgeError(f"--judge_batch_size={batch_size} must be >= 1 and "
                       f"--judge_max_len={max_len} >= 8")
    self.model_config, params = workdir_lib.load_init(path, dtype, False)
    self.params = jax.device_put(params)
    self.tokenizer = tok_lib.load_tokenizer(path)
    self.rubric, self.verdicts = rubric, tuple(verdicts)
    self.verdict_ids = verdict_token_ids(self.tokenizer, self.verdicts)
    # The judge never reads past its context (model_config.max_seq_len).
    self.batch_size = int(batch_size)
    self.max_len = min(int(max_len), self.model_config.max_seq_len)
    self.truncated = 0
    self.spec = f"lm:{path}"

  def prompt_text(self, question, first: str, second: str) -> str:
    """The judge's user turn for (question, first answer, second answer)."""
    return TEMPLATE.format(rubric=self.rubric, question=question_text(question), first=first,
                           second=second, A=self.verdicts[0], B=self.verdicts[1])

  def prompt_ids(self, question, first: str, second: str) -> list[int]:
    """Token ids of the chat-rendered judge prompt (ends where the judge's reply starts),
    LEFT-truncated to max_len."""
    from rlhf_jax.data.preferences import truncate_prompt
    from rlhf_jax.data.sft import encode_prompt
    full = encode_prompt(self.tokenizer, [{"role": "user",
                                           "content": self.prompt_text(question, first, second)}])
    ids = truncate_prompt(full, self.max_len, self.tokenizer.bos_id)
    self.truncated += int(len(ids) < len(full))
    return ids

  def verdict_logprobs(self, prompts_ids: Sequence[Sequence[int]], progress: bool = True,
                       desc: str = "judging (lm)") -> np.ndarray:
    """float32 [N, 2]: log p(first verdict token), log p(second) after each prompt.

    Rows are sorted by length and batched (batch_size rows, the last batch padded with
    copies) at power-of-two lengths: one compilation per length bucket."""
    import tqdm

    from rlhf_jax.labeling import _bucket
    n, B = len(prompts_ids), self.batch_size
    out = np.zeros((n, 2), np.float32)
    order = np.argsort([len(x) for x in prompts_ids], kind="stable")
    fn = _verdict_fn(self.model_config)
    ids_2 = np.asarray(self.verdict_ids, np.int32)
    for start in tqdm.trange(0, n, B, desc=desc, unit="batch", disable=not progress or not n):
      idx = order[start:start + B]
      rows = [list(prompts_ids[i]) for i in idx]
      rows += [rows[-1]] * (B - len(rows))
      T = min(_bucket(max(len(r) for r in rows), 32), self.max_len)
      tokens = np.full((B, T), self.tokenizer.pad_id, np.int32)
      seg = np.zeros((B, T), np.int32)
      for j, r in enumerate(rows):
        tokens[j, :len(r)], seg[j, :len(r)] = r, 1
      last = np.asarray([len(r) - 1 for r in rows], np.int32)
      lp = np.asarray(fn(self.params, tokens, seg, last, ids_2))
      out[idx] = lp[:len(idx)]
    return out

  def compare(self, questions: Sequence, answers_a: Sequence[str], answers_b: Sequence[str],
              progress: bool = True) -> dict[str, np.ndarray]:
    """Judge every (question, a, b) in both orders.

    Returns float64 arrays [N]: logp_ab [N, 2] / logp_ba [N, 2] (verdict log-probs with a
    first / b first), score_ab = s(a, b), score_ba = s(b, a) (each > 0: the answer shown
    first wins), preference = (score_ab - score_ba) / 2 (> 0: a is better).
    """
    n = len(questions)
    ids = [self.prompt_ids(q, a, b) for q, a, b in zip(questions, answers_a, answers_b)]
    ids += [self.prompt_ids(q, b, a) for q, a, b in zip(questions, answers_a, answers_b)]
    lp = self.verdict_logprobs(ids, progress=progress).astype(np.float64)
    score = lp[:, 0] - lp[:, 1]
    return {"logp_ab": lp[:n], "logp_ba": lp[n:], "score_ab": score[:n], "score_ba": score[n:],
            "preference": (score[:n] - score[n:]) / 2.0}


def position_stats(score_ab: Sequence[float], score_ba: Sequence[float]) -> dict:
  """Position bias of a pairwise judge over comparisons judged in both orders.

  position_inconsistent_rate: fraction of comparisons whose preferred answer changes
  when the two answers swap places (the judge picks the same position both times:
  score_ab and score_ba have the same sign); first_position_rate: fraction of the 2N
  single-order verdicts that pick the answer shown first (0.5 = no position bias)."""
  ab, ba = np.asarray(score_ab, np.float64), np.asarray(score_ba, np.float64)
  n = len(ab)
  if n == 0:
    return {"judged_in_both_orders": 0, "position_inconsistent_rate": None,
            "first_position_rate": None}
  inconsistent = ((ab > 0) & (ba > 0)) | ((ab < 0) & (ba < 0))
  return {"judged_in_both_orders": int(n),
          "position_inconsistent_rate": float(np.mean(inconsistent)),
          "first_position_rate": float(np.mean(np.concatenate([ab > 0, ba > 0])))}


def make_judge(spec: str, *, rubric_path: str | None = None, verdicts=("A", "B"),
               batch_size: int = 16, max_len: int = 1024, dtype: str = "float32"):
  """A judge from "rm:WORKDIR", "lm:PATH" or "gold" (see the module docstring);
  rubric_path: the LM judge's rubric (`load_rubric`); batch_size: rows per forward pass."""
  kind, sep, arg = (spec or "").partition(":")
  if spec == "gold":
    return GoldJudge()
  if sep and arg and kind == "rm":
    if not os.path.isdir(arg):
      raise JudgeError(f"--judge=rm:{arg}: directory not found")
    return RewardModelJudge(arg, batch_size=batch_size)
  if sep and arg and kind == "lm":
    return LMJudge(arg, load_rubric(rubric_path), verdicts, batch_size, max_len, dtype)
  raise JudgeError(f"--judge={spec!r}: expected {JUDGE_SPECS}")


def describe(judge) -> dict:
  """JSON-able description of a judge (for stats.json)."""
  out = {"spec": judge.spec, "kind": judge.kind}
  if isinstance(judge, LMJudge):
    out.update(rubric=judge.rubric, verdicts=list(judge.verdicts),
               verdict_tokens=[judge.tokenizer.id_to_token(i) for i in judge.verdict_ids],
               template=TEMPLATE, prompts_truncated=judge.truncated)
  return json.loads(json.dumps(out))
