"""Multi-turn / tool-use environments (rlhf_jax/envs): the safe calculator, the tool-call
syntax, each built-in env on scripted model turns, the registry, the SFT transcripts
(GSM8K annotations -> tool calls, synthetic tasks) and their tokenization with a loss on
assistant tokens only. Pure Python (no jax compile)."""
import collections
import os
import inspect
import json
import re
import time
from fractions import Fraction

import numpy as np
import pytest
from ml_collections import ConfigDict

from rlhf_jax import envs
from rlhf_jax.chat_format import CHAT_STYLES, TOOL_PREFIX_GEMMA, render_chat
from rlhf_jax.config import ConfigError
from rlhf_jax.data import sft as sft_data
from rlhf_jax.data.conversation import between_text, tokenize_conversation
from rlhf_jax.envs import calculator, transcripts
from rlhf_jax.envs.base import EnvError, EnvStep, episode_info
from rlhf_jax.envs.calculator import CalcError, calculate, evaluate
from rlhf_jax.envs.tools import (TOOL_CALL_END, MalformedCall, ToolCall, format_tool_call,
                                 parse_tool_calls)

from conftest import CharTokenizer, shared_data_file

F = Fraction

# ----------------------------------------------------------------------------- calculator

# (expression, exact value, float64 reference computed with numpy, formatted result)
VALID = [
    ("48/2", F(24), np.float64(48) / 2, "24"),
    ("12/60", F(1, 5), np.float64(12) / 60, "0.2"),
    ("27*2", F(54), np.float64(27) * 2, "54"),
    ("100-50-30-15", F(5), np.float64(100) - 50 - 30 - 15, "5"),  # left-associative
    ("2*20*.01", F(2, 5), np.float64(2) * 20 * 0.01, "0.4"),
    ("(60+72+42)/3", F(58), (np.float64(60) + 72 + 42) / 3, "58"),
    ("3*(2/3)", F(2), np.float64(3) * (np.float64(2) / 3), "2"),
    ("10/3", F(10, 3), np.float64(10) / 3, "10/3"),
    ("-7/2", F(-7, 2), np.float64(-7) / 2, "-3.5"),
    ("0.1+0.2", F(3, 10), np.float64(0.1) + np.float64(0.2), "0.3"),   # exact, unlike float
    ("2**10", F(1024), np.float64(2) ** 10, "1024"),
    ("2**3**2", F(512), np.float64(2) ** 9, "512"),                     # right-associative
    ("-2**2", F(-4), -(np.float64(2) ** 2), "-4"),                      # as in Python
    ("2**-2", F(1, 4), np.float64(2) ** -2, "0.25"),
    ("(-3)**3", F(-27), np.float64(-3) ** 3, "-27"),
    ("--5", F(5), np.float64(5), "5"),
    ("1,000*1.5", F(1500), np.float64(1000) * 1.5, "1500"),
    ("50%*8", F(4), np.float64(50) / 100 * 8, "4"),
    (" 7 - 2 * 3 ", F(1), np.float64(7) - 6, "1"),
    ("5.", F(5), np.float64(5), "5"),
    ("1+2*3-4/8", F(13, 2), 1 + np.float64(2) * 3 - np.float64(4) / 8, "6.5"),
    ("10**100/10**99", F(10), np.float64(10), "10"),
]


@pytest.mark.parametrize("expr,exact,ref64,text", VALID, ids=[v[0] for v in VALID])
def test_calculator_matches_exact_and_float64_references(expr, exact, ref64, text):
  got = evaluate(expr)
  assert got == exact and isinstance(got, Fraction)
  assert float(got) == pytest.approx(float(ref64), rel=1e-12)
  assert calculate(expr) == text


HOSTILE = [
    "__import__('os').system('touch SENTINEL')",
    "open('SENTINEL', 'w')",
    "().__class__.__bases__[0].__subclasses__()",
    "lambda: open('SENTINEL', 'w')",
    "exec('open(\"SENTINEL\", \"w\")')",
    "eval('1')", "x", "x+1", "True", "'1'", "1;2", "1 if 1 else 2", "[1]", "{}",
    "9**9**9**9",            # the exponent 9**9 is refused before anything large is built
    "2**1025", "99999**1024", "(10**1000)*(10**1000)", "2**0.5", "0**-1", "1/0", "1/(2-2)",
    "(" * 10000 + "1" + ")" * 10000,   # too long
    "1" * 201,
    "\u0663+1", "\uff11\uff12", "\u00b2", "1\u00d72", "1\u22122",   # unicode digits / signs
    "", "   ", "1e5", "1_000", "0x10", "1.2.3", "2(3)", "(1)(2)", "1 2", "**2", "1+", "(1",
    "1)", "*", "%", "1,2", "1,0000", "3%2", "1//2", "1<<64", "~1", "1&1", "1==1", "1=1",
]


@pytest.mark.parametrize("expr", HOSTILE, ids=range(len(HOSTILE)))
def test_calculator_refuses_hostile_and_bad_input_quickly_without_running_code(
    expr, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  t0 = time.perf_counter()
  with pytest.raises(CalcError) as e:
    evaluate(expr)
  assert time.perf_counter() - t0 < 0.5
  assert str(e.value)  # a reason
  assert not (tmp_path / "SENTINEL").exists()
  assert list(tmp_path.iterdir()) == []


def test_calculator_limits_name_the_reason(monkeypatch):
  with pytest.raises(CalcError, match="exponent 387420489 too large"):
    evaluate("9**9**9**9")
  with pytest.raises(CalcError, match="number too large"):
    evaluate("(10**1000)*(10**1000)")
  with pytest.raises(CalcError, match="division by zero"):
    evaluate("1/(2-2)")
  with pytest.raises(CalcError, match="too long"):
    evaluate("1" * 201)
  with pytest.raises(CalcError, match="unexpected character '\u0663'"):
    evaluate("\u0663")
  # Depth is bounded on its own (no RecursionError) when the length limit is raised.
  monkeypatch.setattr(calculator, "MAX_CHARS", 10**6)
  with pytest.raises(CalcError, match="nested too deeply"):
    evaluate("(" * 10000 + "1" + ")" * 10000)
  with pytest.raises(CalcError, match="nested too deeply"):
    evaluate("2**" * 5000 + "1")
  assert evaluate("(" * 30 + "1" + ")" * 30) == 1
  assert evaluate("-" * 5000 + "1") == 1  # signs are a loop, not recursion


def test_calculator_source_never_evaluates_code():
  src = inspect.getsource(calculator)
  assert not re.search(r"(?<![.\w])(eval|exec|compile|__import__|literal_eval)\s*\(", src)
  assert not re.search(r"^\s*(import ast|from ast)", src, re.M)


# ----------------------------------------------------------------------------- tool calls

def test_parse_tool_calls_table():
  text = ("Half is <tool>calculator: 48 / 2 </tool> then <tool>x</tool></tool>"
          "<tool>: 3</tool><tool>my tool: 1</tool><tool>search: cats</tool><tool>calc")
  got = parse_tool_calls(text, known=("calculator",))
  assert got[0] == ToolCall("calculator", "48 / 2", 8, 40)
  assert text[got[0].start:got[0].end] == "<tool>calculator: 48 / 2 </tool>"
  reasons = [c.reason for c in got[1:]]
  assert all(isinstance(c, MalformedCall) for c in got[1:])
  assert [r.split(":")[0].split(" (")[0] for r in reasons] == [
      "no colon", "stray </tool> without <tool>", "empty tool name", "bad tool name 'my tool'",
      "unknown tool 'search'; tools", "unclosed <tool> tag"]
  # Without `known` any well-formed name is a call; a second <tool> before a close leaves
  # the first unclosed; empty / None text has none.
  assert parse_tool_calls("<tool>search: cats</tool>") == [ToolCall("search", "cats", 0, 25)]
  two = parse_tool_calls("<tool>a: 1 <tool>b: 2</tool>")
  assert isinstance(two[0], MalformedCall) and two[0].reason == "unclosed <tool> tag"
  assert two[1] == ToolCall("b", "2", 11, 28)
  assert parse_tool_calls("") == parse_tool_calls(None) == parse_tool_calls("no call") == []
  assert TOOL_CALL_END == "</tool>" and envs.TOOL_CALL_END == TOOL_CALL_END
  assert format_tool_call("calculator", "48/2") == "<tool>calculator: 48/2</tool>"
  for bad in (("my tool", "1"), ("9x", "1"), ("calc", "</tool>")):
    with pytest.raises(ValueError):
      format_tool_call(*bad)


# ----------------------------------------------------------------------------- envs

def _run(env, row, seed, turns):
  env.reset(row, seed)
  return [env.step(t) for t in turns]


def test_calculator_env_transcript():
  env = envs.make_env_factory({"name": "calculator", "max_tool_calls": 3})()
  assert env.observation_role == "tool" and env.max_turns == 4
  steps = _run(env, {"prompt": "q", "answer": "72"}, 0, [
      "48/2 = <tool>calculator: 48/2</tool>",
      "<tool>calc: 1</tool>",
      "<tool>calculator: 1/0</tool>",
      "So 24 + 48 = 72.\n#### 72"])
  assert [s.observation for s in steps] == [
      "24", "error: unknown tool 'calc'; tools: ['calculator']", "error: division by zero", None]
  assert [s.done for s in steps] == [False, False, False, True]
  assert [s.reward for s in steps] == [0.0, 0.0, 0.0, 1.0]
  total = collections.Counter()
  for s in steps:
    total.update({k: v for k, v in s.info.items() if k in ("tool_calls", "tool_errors",
                                                           "malformed_tool_calls")})
  assert total == {"tool_calls": 2, "tool_errors": 1, "malformed_tool_calls": 1}
  assert steps[-1].info["correct"] is True and steps[-1].info["turn"] == 4
  assert episode_info([s.info for s in steps]) == {"turn": 4, "correct": True, **total}
  with pytest.raises(EnvError, match="after the episode ended"):
    env.step("more")
  # Wrong final answer; budget exceeded; an unclosed tag is malformed, not an answer.
  assert _run(env, {"answer": "72"}, 0, ["#### 71"])[0] == EnvStep(
      None, 0.0, True, {"turn": 1, "tool_calls": 0, "tool_errors": 0,
                        "malformed_tool_calls": 0, "correct": False})
  over = _run(env, {"answer": "3"}, 0, ["<tool>calculator: 1+2</tool>"] * 4)
  assert [s.done for s in over] == [False] * 3 + [True]
  assert over[-1].reward == 0.0 and over[-1].info["tool_budget_exceeded"] == 1
  unclosed = _run(env, {"answer": "3"}, 0, ["<tool>calculator: 1+2"])[0]
  assert not unclosed.done and unclosed.observation == "error: unclosed <tool> tag"
  with pytest.raises(EnvError, match="calculator.*row\\['answer'\\]"):
    env.reset({"prompt": "q"}, 0)
  with pytest.raises(EnvError, match="before reset"):
    calculator.CalculatorEnv().step("1")


def _binary_search_turns(env, secret):
  lo, hi, turns = env.lo, env.hi, []
  while True:
    g = (lo + hi) // 2
    turns.append(f"I guess {g}.")
    if g == secret:
      return turns
    lo, hi = (g + 1, hi) if secret > g else (lo, g - 1)


def test_guess_number_binary_search_always_wins_and_feedback_is_right():
  env = envs.make_env_factory("guess_number")()
  assert (env.lo, env.hi, env.max_guesses, env.observation_role) == (1, 8, 4, "user")
  for secret in range(1, 9):
    steps = _run(env, {"prompt": "guess 1-8", "answer": str(secret)}, 0,
                 _binary_search_turns(env, secret))
    assert steps[-1].done and steps[-1].info["correct"] and steps[-1].reward == 1.0
    assert all(not s.done and s.observation in ("higher", "lower") for s in steps[:-1])
    assert len(steps) <= 4  # ceil(log2(9)) = 4
  steps = _run(env, {"answer": "6"}, 0, ["4", "7", "nothing", "5"])
  assert [s.observation for s in steps] == ["higher", "lower", "invalid", None]
  assert [s.info["invalid_guesses"] for s in steps] == [0, 0, 1, 0]
  assert steps[-1].done and steps[-1].info == {"turn": 4, "invalid_guesses": 0, "correct": False}
  assert steps[-1].reward == 0.0
  costly = envs.make_env_factory({"name": "guess_number", "turn_cost": 0.25})()
  assert _run(costly, {"answer": "3"}, 0, ["1", "2", "3"])[-1].reward == pytest.approx(0.5)
  for bad in ({"answer": "9"}, {"answer": "five"}):
    with pytest.raises(EnvError, match="guess_number"):
      env.reset(bad, 0)
  assert _run(env, {"answer": "2"}, 0, ["9" * 40])[0].observation == "invalid"


def test_guess_number_secret_from_seed_is_deterministic_and_covers_the_range():
  env = envs.make_env_factory({"name": "guess_number", "lo": 3, "hi": 6})()
  secrets = []
  for seed in range(200):
    env.reset({"prompt": "guess 3-6", "answer": ""}, seed)
    a = env.secret
    env.reset({"prompt": "guess 3-6"}, seed)
    assert env.secret == a
    secrets.append(a)
  assert set(secrets) == {3, 4, 5, 6}
  assert max(collections.Counter(secrets).values()) < 80  # roughly uniform (expected 50)


def test_retry_on_feedback():
  env = envs.make_env_factory({"name": "retry_on_feedback", "retry_discount": 0.5})()
  assert env.observation_role == "user" and env.max_turns == 2
  steps = _run(env, {"answer": "42"}, 0, ["#### 41", "Sorry: #### 42"])
  assert steps[0] == EnvStep("That is not correct. Try again.", 0.0, False, {"turn": 1})
  assert steps[1] == EnvStep(None, 0.5, True, {"turn": 2, "correct": True,
                                                "first_correct": False, "attempts": 2})
  first = _run(env, {"answer": "42"}, 0, ["The answer is 42."])
  assert first == [EnvStep(None, 1.0, True, {"turn": 1, "correct": True,
                                              "first_correct": True, "attempts": 1})]
  both_wrong = _run(env, {"answer": "42"}, 0, ["1", "2"])
  assert both_wrong[-1].reward == 0.0 and both_wrong[-1].info["correct"] is False
  three = envs.make_env_factory({"name": "retry_on_feedback", "max_attempts": 3,
                                 "feedback": "No."})()
  assert [s.observation for s in _run(three, {"answer": "1"}, 0, ["2", "3", "4"])] == [
      "No.", "No.", None]


def test_same_row_seed_and_turns_give_the_same_steps():
  for spec, turns in (("guess_number", ["4", "7", "6"]),
                      ("calculator", ["<tool>calculator: 2*3</tool>", "6"]),
                      ("retry_on_feedback", ["5", "6"])):
    make = envs.make_env_factory(spec)
    a = _run(make(), {"answer": "6"}, 7, turns)
    b = _run(make(), {"answer": "6"}, 7, turns)
    assert a == b


# ----------------------------------------------------------------------------- registry

def test_make_env_factory_specs_and_errors():
  for spec in ("guess_number", {"name": "guess_number"}, '{"name": "guess_number", "hi": 16}',
               ConfigDict({"name": "guess_number", "hi": 16})):
    make = envs.make_env_factory(spec)
    a, b = make(), make()
    assert a is not b and isinstance(a, envs.Env)
  assert envs.make_env_factory('{"name": "guess_number", "hi": 16}')().hi == 16
  assert envs.ENV_NAMES == sorted(envs.ENVS) == ["calculator", "guess_number",
                                                  "retry_on_feedback"]
  names = re.escape(str(envs.ENV_NAMES))
  for spec, what in (("nope", "unknown env 'nope'"), ("", "empty"), ("{bad", "not valid JSON"),
                     ({"hi": 3}, "missing 'name'"), (3, "expected an env name"),
                     ({"name": "guess_number", "high": 3}, r"unknown option\(s\) \['high'\]"),
                     ({"name": "guess_number", "lo": 5, "hi": 2}, "hi=2: expected an integer"),
                     ({"name": "calculator", "max_tool_calls": -1}, "max_tool_calls=-1"),
                     ({"name": "retry_on_feedback", "retry_discount": 2}, "retry_discount=2")):
    with pytest.raises(ConfigError, match=f"config.rollout.env: .*{what}.*{names}"):
      envs.make_env_factory(spec)


class _Echo:
  """A minimal env: echoes the model's text as a user message, done after `turns` turns."""
  observation_role = "user"

  def __init__(self, turns: int = 2):
    self.turns = turns

  def reset(self, row, seed):
    self.t = 0

  def step(self, model_text):
    self.t += 1
    done = self.t >= self.turns
    return EnvStep(None if done else model_text, float(done), done, {"turn": self.t})


def test_register_env_adds_a_name_and_refuses_duplicates():
  try:
    envs.register_env("echo", _Echo, "echoes")
    assert "echo" in envs.ENV_NAMES and envs.ENV_NAMES == sorted(envs.ENVS)
    env = envs.make_env_factory({"name": "echo", "turns": 3})()
    assert [s.observation for s in _run(env, {}, 0, ["a", "b", "c"])] == ["a", "b", None]
    with pytest.raises(ValueError, match="already registered"):
      envs.register_env("echo", _Echo)
    with pytest.raises(ConfigError, match="unknown option"):
      envs.make_env_factory({"name": "echo", "steps": 3})
  finally:
    envs.ENVS.pop("echo", None)
    envs.ENV_NAMES[:] = sorted(envs.ENVS)


# ----------------------------------------------------------------------------- transcripts

def _annotated(messages):
  """The GSM8K answer text back from a converted transcript (tool calls -> annotations)."""
  out, value = [], {}
  for i, m in enumerate(messages):
    if m["role"] == "assistant":
      out.append(m["content"])
    elif m["role"] == "tool":
      value[len(out) - 1] = m["content"]
  return out, value


def test_gsm8k_rows_become_tool_transcripts():
  path = shared_data_file("gsm8k_train.jsonl")
  rows = [json.loads(line) for _, line in zip(range(40), open(path))]
  stats = collections.Counter()
  for row in rows:
    conv = transcripts.gsm8k_tool_row(row, stats)
    assert conv is not None
    msgs = conv["messages"]
    assert msgs[0] == {"role": "user", "content": row["question"]}
    assert [m["role"] for m in msgs[1:]] == ["assistant", "tool"] * (len(msgs[1:]) // 2) + [
        "assistant"]
    assert all(m.get("weight") == 1 for m in msgs if m["role"] == "assistant")
    # Putting the annotations back where the tool calls are gives the original answer, and
    # every tool message is the exact value of its expression, within GSM8K's rounding.
    anns = re.findall(r"<<([^<>]*)>>", row["answer"])
    text = "".join(m["content"] for m in msgs if m["role"] == "assistant")
    calls = re.findall(r"<tool>calculator: (.*?)</tool>", text)
    assert calls == [a.rpartition("=")[0].strip() for a in anns]
    it = iter(anns)
    assert re.sub(r"<tool>calculator: .*?</tool>", lambda m: f"<<{next(it)}>>", text) == \
        row["answer"]
    results = [m["content"] for m in msgs if m["role"] == "tool"]
    for a, r in zip(anns, results):
      shown = a.rpartition("=")[2].strip()
      d = len(shown.partition(".")[2])
      assert abs(float(F(r)) - float(F(shown))) <= 0.5 * 10.0 ** -d + 1e-12, (a, r)
    assert msgs[-1]["content"].rstrip().endswith("#### " + row["answer"].rpartition("#### ")[2])
  assert stats["rows"] == 40 and stats["tool_calls"] == sum(
      len(re.findall("<<", r["answer"])) for r in rows)
  # A wrong annotation, or an expression the calculator refuses, drops the row (counted).
  bad = collections.Counter()
  assert transcripts.gsm8k_tool_row({"question": "q", "answer": "2+2=<<2+2=5>>5\n#### 5"},
                                    bad) is None
  assert transcripts.gsm8k_tool_row({"question": "q", "answer": "<<=5>>5\n#### 5"}, bad) is None
  assert bad == {"skipped_wrong_annotation": 1, "skipped_bad_annotation": 1}


def test_write_gsm8k_tool_sft_file(tmp_path):
  src = tmp_path / "g.jsonl"
  src.write_text(json.dumps({"question": "Add.", "answer": "1+2=<<1+2=3>>3\n#### 3"}) + "\n" +
                 json.dumps({"question": "Bad.", "answer": "<<1+1=3>>3\n#### 3"}) + "\n")
  stats = transcripts.write_gsm8k_tool_sft(str(src), str(tmp_path / "out.jsonl"))
  assert stats == {"rows": 1, "tool_calls": 1, "skipped_wrong_annotation": 1}
  [row] = [json.loads(line) for line in open(tmp_path / "out.jsonl")]
  assert [m["content"] for m in row["messages"]] == [
      "Add.", "1+2=<tool>calculator: 1+2</tool>", "3", "3\n#### 3"]
  src.write_text(json.dumps({"question": "Q", "answer": "no marker"}) + "\n")
  with pytest.raises(sft_data.DataError, match="g.jsonl:1: 'answer' must be"):
    transcripts.write_gsm8k_tool_sft(str(src), str(tmp_path / "o2.jsonl"))


def test_synthetic_transcripts_are_deterministic_and_played_through_the_env():
  for task in transcripts.TASKS:
    a = [transcripts.make_transcript(task, np.random.default_rng(5), 2) for _ in range(3)]
    b = [transcripts.make_transcript(task, np.random.default_rng(5), 2) for _ in range(3)]
    assert a == b
  rng = np.random.default_rng(0)
  wins = []
  for _ in range(300):
    row = transcripts.make_transcript("guess_number", rng, 1)
    msgs = row["messages"]
    secret_range = re.fullmatch(r"guess 1-(\d+)", msgs[0]["content"])
    assert secret_range and secret_range.group(1) == "8"
    guesses = [int(m["content"]) for m in msgs if m["role"] == "assistant"]
    feedback = [m["content"] for m in msgs if m["role"] == "user"][1:]
    assert len(guesses) <= 4 and len(feedback) == len(guesses) - 1
    lo, hi = 1, 8
    for g, f in zip(guesses, feedback):  # every guess is in the range still possible
      assert lo <= g <= hi and f in ("higher", "lower")
      lo, hi = (g + 1, hi) if f == "higher" else (lo, g - 1)
    wins.append(guesses[-1] == int(row["answer"]))
    assert wins[-1] or len(guesses) == 4
  assert 0.6 < np.mean(wins) < 0.97  # a valid but unoptimised player: room for RL
  calc = transcripts.make_transcript("calc_chain", np.random.default_rng(1), 3)
  expr = calc["messages"][0]["content"].removeprefix("calc: ")
  assert calc["answer"] == calculate(expr)
  assert [m["content"] for m in calc["messages"][1:]] == [
      f"<tool>calculator: {expr}</tool>", calculate(expr), calculate(expr)]


# ----------------------------------------------------------------------------- chat + tokens

CONV = [{"role": "user", "content": "calc: 2*3+4"},
        {"role": "assistant", "content": "<tool>calculator: 2*3+4</tool>"},
        {"role": "tool", "content": "10"},
        {"role": "assistant", "content": "It is 9."},
        {"role": "user", "content": "That is not correct. Try again."},
        {"role": "assistant", "content": "10"}]

RENDERED = {
    "chatml": ("<|im_start|>user\ncalc: 2*3+4<|im_end|>\n<|im_start|>assistant\n"
               "<tool>calculator: 2*3+4</tool><|im_end|>\n<|im_start|>tool\n10<|im_end|>\n"
               "<|im_start|>assistant\nIt is 9.<|im_end|>\n<|im_start|>user\nThat is not "
               "correct. Try again.<|im_end|>\n<|im_start|>assistant\n10<|im_end|>\n"),
    "llama3": ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\ncalc: 2*3+4"
               "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n<tool>calculator: "
               "2*3+4</tool><|eot_id|><|start_header_id|>ipython<|end_header_id|>\n\n10"
               "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nIt is 9.<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nThat is not correct. Try again."
               "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n10<|eot_id|>"),
    "gemma": ("<start_of_turn>user\ncalc: 2*3+4<end_of_turn>\n<start_of_turn>model\n"
              "<tool>calculator: 2*3+4</tool><end_of_turn>\n<start_of_turn>user\n"
              f"{TOOL_PREFIX_GEMMA}10<end_of_turn>\n<start_of_turn>model\nIt is 9.<end_of_turn>\n"
              "<start_of_turn>user\nThat is not correct. Try again.<end_of_turn>\n"
              "<start_of_turn>model\n10<end_of_turn>\n"),
    "plain": ("User: calc: 2*3+4\nAssistant: <tool>calculator: 2*3+4</tool>\nTool: 10\n"
              "Assistant: It is 9.\nUser: That is not correct. Try again.\nAssistant: 10\n"),
}


@pytest.mark.parametrize("style", CHAT_STYLES)
def test_multi_turn_transcript_renders_with_a_tool_role(style):
  assert render_chat(CONV, style, add_generation_prompt=False) == RENDERED[style]
  for k in range(1, len(CONV)):  # prefixes: a reply's generation prompt, every turn
    assert RENDERED[style].startswith(render_chat(CONV[:k], style, False))
    if CONV[k]["role"] == "assistant":
      gen = render_chat(CONV[:k], style)
      assert RENDERED[style].startswith(gen.rstrip(" "))


class _StyledChar(CharTokenizer):
  def __init__(self, style):
    self.style = style

  def apply_chat_template(self, messages, add_generation_prompt=True):
    return render_chat(messages, self.style, add_generation_prompt)


def _check_conversation_tokens(tok, trained):
  ids, mask = tokenize_conversation(tok, CONV, trained)
  assert len(ids) == len(mask)
  ids, mask = np.asarray(ids), np.asarray(mask, bool)
  # Runs of trained tokens: exactly the contents of the trained assistant turns, the last
  # one followed by EOS.
  runs, cur = [], []
  for i, m in zip(ids, mask):
    if m:
      cur.append(int(i))
    elif cur:
      runs.append(cur)
      cur = []
  if cur:
    runs.append(cur)
  want = [m["content"] for m, t in zip(CONV, trained) if m["role"] == "assistant" and t]
  assert [tok.decode([i for i in r if i != tok.eos_id]) for r in runs] == want
  assert ids[-1] == tok.eos_id and mask[-1]
  # Context pieces are the template text between the replies (tool result, feedback).
  between = between_text(tok, CONV[:2], CONV[2:3])
  assert "10" in between and "calculator" not in between
  return ids, mask


@pytest.mark.parametrize("style", CHAT_STYLES)
def test_conversation_tokens_put_the_loss_on_assistant_turns_only(style):
  tok = _StyledChar(style)
  ids, mask = _check_conversation_tokens(tok, [False, True, False, True, False, True])
  # Char-level: the whole sequence is BOS + the rendered conversation with EOS in place of
  # the last end-of-turn text.
  text = RENDERED[style].replace("Assistant: ", "Assistant:")  # plain: reply after the prompt
  end = text.rindex("10") + 2
  assert ids[0] == tok.bos_id and tok.decode(ids[1:-1]) == text[:end]
  _check_conversation_tokens(tok, [False, True, False, False, False, True])  # weight 0 turn


def test_conversation_tokens_with_real_tokenizers(tmp_path):
  from test_tokenizer import SMOL_TEMPLATE, write_hf_tokenizer
  from rlhf_jax.tokenizer import load_tokenizer, train_sentencepiece
  corpus = tmp_path / "c.txt"
  corpus.write_text("".join(RENDERED.values()) * 3)
  sp = train_sentencepiece(corpus, tmp_path / "sp", 60, "char")           # plain, our models
  hf = load_tokenizer(write_hf_tokenizer(tmp_path / "hf", SMOL_TEMPLATE))  # chatml byte BPE
  for tok in (sp, hf, load_tokenizer(tmp_path / "hf", chat_style="llama3"),
              load_tokenizer(tmp_path / "hf", chat_style="gemma")):
    _check_conversation_tokens(tok, [False, True, False, True, False, True])


@pytest.mark.slow
def test_conversation_tokens_with_the_smollm2_tokenizer():
  """The real chatml tokenizer (SmolLM2's GGUF, ~5 s to load): the end-of-turn and role
  markers between the replies are its special tokens, EOS is <|im_end|>."""
  from test_smollm2 import smollm2_path
  from rlhf_jax.tokenizer import load_tokenizer
  tok = load_tokenizer(smollm2_path())
  ids, mask = _check_conversation_tokens(tok, [False, True, False, True, False, True])
  assert tok.decode([int(i) for i in ids]).startswith("<|im_start|>system\nYou are")
  im_end, im_start = tok.token_to_id("<|im_end|>"), tok.token_to_id("<|im_start|>")
  assert ids[-1] == tok.eos_id == im_end
  assert list(ids).count(im_start) == 7 and not mask[ids == im_start].any()


def test_sft_rows_with_weights_train_every_assistant_turn(tmp_path):
  tok = CharTokenizer()
  single = {"messages": CONV[:1] + [CONV[1]]}
  weighted_single = {"messages": CONV[:1] + [dict(CONV[1], weight=1)]}
  multi = {"messages": [dict(m, weight=1) if m["role"] == "assistant" else m for m in CONV]}
  multi_w0 = json.loads(json.dumps(multi))
  multi_w0["messages"][3]["weight"] = 0
  path = tmp_path / "rows.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in (single, weighted_single, multi,
                                                          multi_w0, {"messages": CONV})))
  ex = sft_data.tokenize_sft_file(str(path), tok, 400)
  # A single-turn row is the same with or without weights.
  assert np.array_equal(ex[0][0], ex[1][0]) and np.array_equal(ex[0][1], ex[1][1])
  trained = lambda e: tok.decode([int(i) for i, m in zip(*e) if m and i != tok.eos_id])
  assert trained(ex[2]) == "<tool>calculator: 2*3+4</tool>It is 9.10"
  assert trained(ex[3]) == "<tool>calculator: 2*3+4</tool>10"
  assert trained(ex[4]) == "10"   # no weights: the last turn only, as before
  assert np.array_equal(ex[2][0], ex[3][0]) and not np.array_equal(ex[2][1], ex[3][1])
  for bad, msg in (({"role": "tool", "content": "10", "weight": 1}, "role 'tool' and a 'weight'"),
                   ({"role": "assistant", "content": "x", "weight": 2}, "expected 0 or 1")):
    rows = {"messages": CONV[:2] + [bad] + [dict(CONV[5], weight=1)]}
    path.write_text(json.dumps(rows) + "\n")
    with pytest.raises(sft_data.DataError, match=f"rows.jsonl:1: .*{re.escape(msg)}"):
      sft_data.tokenize_sft_file(str(path), tok, 400)
  path.write_text(json.dumps({"messages": CONV[:5] + [dict(CONV[5], weight=0)]}) + "\n")
  with pytest.raises(sft_data.DataError, match="last message has weight 0"):
    sft_data.tokenize_sft_file(str(path), tok, 400)


def test_readme_example_env_registers_and_plays():
  """The "Adding an environment" example of README.md, run as written."""
  with open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md")) as f:
    text = f.read()
  section = text[text.index("<!-- BEGIN envs"):text.index("<!-- END envs -->")]
  code = re.search(r"```python\n(from rlhf_jax.envs import .*?)```", section, re.S).group(1)
  try:
    exec(compile(code, "README.md", "exec"), {})
    env = envs.make_env_factory("countdown")()
    steps = _run(env, {"answer": "3"}, 0, ["3", "2", "1"])
    assert [(s.observation, s.reward, s.done) for s in steps] == [
        ("go on", 0.0, False), ("go on", 0.0, False), (None, 1.0, True)]
    assert steps[-1].info == {"correct": True}
    wrong = _run(env, {"answer": "3"}, 0, ["3", "1"])
    assert wrong[-1].done and wrong[-1].reward == 0.0 and wrong[-1].info == {"correct": False}
  finally:
    envs.ENVS.pop("countdown", None)
    envs.ENV_NAMES[:] = sorted(envs.ENVS)


def test_sft_config_sources_for_multi_turn_data(tmp_path):
  from rlhf_jax import config as config_lib
  from rlhf_jax.launch import load_config
  from rlhf_jax.trainers import sft as sft_trainer
  c = load_config("configs/sft.py:tiny")
  c.data.synthetic_task, c.data.synthetic_digits = "guess_number", 1
  c.data.synthetic_train_examples, c.data.synthetic_eval_examples = 5, 3
  config_lib.validate(c)
  train, evals = sft_trainer.resolve_data(c, str(tmp_path / "a"))
  rows = [json.loads(line) for line in open(train)]
  assert len(rows) == 5 and rows[0]["messages"][0]["content"] == "guess 1-8"
  assert train.endswith("guess_number_d1_train.jsonl") and len(open(evals).readlines()) == 3
  src = tmp_path / "gsm8k.jsonl"
  src.write_text(json.dumps({"question": "Add.", "answer": "1+2=<<1+2=3>>3\n#### 3"}) + "\n")
  c.data.source, c.data.train_path = "gsm8k_tools", str(src)
  config_lib.validate(c)
  train, evals = sft_trainer.resolve_data(c, str(tmp_path / "b"))
  assert evals == "" and os.path.basename(train).startswith("gsm8k_tools_")
  assert json.loads(open(train).read())["messages"][2] == {"role": "tool", "content": "3"}
  c.data.source = "gsm8k"
  with pytest.raises(ConfigError, match="data.source"):
    config_lib.validate(c)
  c.data.source, c.data.train_path = "gsm8k_tools", ""
  config_lib.validate(c)  # a config alone may leave the path to the command line
  with pytest.raises(ConfigError, match="data.train_path"):
    config_lib.validate(c, num_devices=1)  # a run needs it
