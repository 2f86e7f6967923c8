"""Multi-turn training runs (env guess_number, the tiny model from scratch): a short GRPO
run through the command line -- the same config twice gives the same bits, and a run
killed after step 3 resumes from its step-2 checkpoint to the uninterrupted run's
parameters and metrics, bit for bit (the episodes of the re-done step are the same: env
seeds and sampling noise come from the run's seed and the step only); PPO and GRPO
variants for 2 steps in process. (Slow: subprocesses and one compilation per trainer,
about 45 s + 60 s.)"""
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from conftest import read_metrics
from rlhf_jax.checkpoint import read_checkpoint

pytestmark = pytest.mark.slow

ARGS = ["--config=configs/grpo.py:tiny", "--config.data.synthetic_task=guess_number",
        "--config.data.synthetic_digits=1", "--config.data.synthetic_train_examples=64",
        "--config.data.synthetic_eval_examples=8", "--config.tokenizer.vocab_size=40",
        '--config.rollout.env={"name": "guess_number", "hi": 8, "max_guesses": 4}',
        "--config.reward.spec=", "--config.rollout.prompts_per_step=4",
        "--config.rollout.group_size=4", "--config.rollout.max_new_tokens=32",
        "--config.rollout.max_tokens_per_turn=3", "--config.rollout.env_tokens_per_call=8",
        "--config.num_steps=4", "--config.checkpoint.every=2", "--config.eval_every=0",
        "--config.log_every=1", "--config.checkpoint.async_save=False"]


def _cli(workdir, fault=None):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("RLHF_JAX_FAULT", None)
  if fault:
    env["RLHF_JAX_FAULT"] = fault
  return subprocess.run(
      [sys.executable, "-m", "rlhf_jax.faults" if fault else "rlhf_jax.launch", "train",
       f"--workdir={workdir}", *ARGS], env=env, capture_output=True, text=True, timeout=900)


def _same_checkpoints(a, b):
  import jax
  (sa, ta), (sb, tb) = (read_checkpoint(os.path.join(w, "checkpoints")) for w in (a, b))
  assert sa == sb == 4
  la, lb = jax.tree.leaves(ta), jax.tree.leaves(tb)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    assert np.array_equal(np.asarray(x), np.asarray(y))


def test_multiturn_grpo_is_deterministic_and_resumes_bitwise(tmp_path):
  ref, again, killed = (str(tmp_path / n) for n in ("ref", "again", "killed"))
  for wd in (ref, again):
    out = _cli(wd)
    assert out.returncode == 0, out.stderr[-3000:]
  out = _cli(killed, fault="3:KILL")
  assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
  assert read_checkpoint(os.path.join(killed, "checkpoints"))[0] == 2
  out = _cli(killed)
  assert out.returncode == 0 and "resumed from step 2" in out.stdout, out.stderr[-3000:]
  _same_checkpoints(ref, again)
  _same_checkpoints(ref, killed)
  drop = lambda rows: [{k: v for k, v in r.items() if not k.startswith("time/")
                        and "per_second" not in k and k != "elapsed_s"} for r in rows]
  rows = drop(read_metrics(ref))
  assert rows == drop(read_metrics(again)) == drop(read_metrics(killed))
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  # real episodes: several turns, env tokens between them, model tokens only in the length
  assert max(r["env/turns"] for r in rows) > 1 and min(r["env/env_tokens"] for r in rows) > 0
  assert all(r["response_length"] == r["env/model_tokens"] for r in rows)
  # the report reads multi-turn runs as it reads any (runs = the three workdirs)
  from rlhf_jax import report
  md = open(report.write_report([str(tmp_path)], str(tmp_path / "report"),
                                metrics=["env/success", "env/turns", "env/env_tokens"])).read()
  assert "3 runs" in md and "`env/turns`" in md and "`env/env_tokens`" in md


@pytest.mark.parametrize("algo,over", [
    ("ppo", {"rollout.turn_rewards": "per_turn"}),
    ("grpo", {"grpo.variant": "rloo"}),
    ("grpo", {"grpo.variant": "reinforce_pp", "rollout.turn_rewards": "per_turn"}),
    ("grpo", {"grpo.variant": "dapo"}),   # dynamic sampling: refilled groups of episodes
])
def test_trainers_run_episodes(tmp_path, algo, over):
  """PPO and the GRPO variants train on episodes (2 steps, in process): finite losses,
  the episode metrics logged, lengths = model tokens."""
  import math
  from conftest import override
  from rlhf_jax.launch import load_config
  from rlhf_jax.trainers import grpo, ppo
  c = load_config(f"configs/{algo}.py:tiny")
  keys = {a.split("=")[0][len("--config."):]: a.split("=", 1)[1] for a in ARGS[1:]}
  for k in ("data.synthetic_task", "rollout.env", "reward.spec"):
    c = override(c, **{k: keys[k]})
  c = override(c, **{"data.synthetic_digits": 1, "data.synthetic_train_examples": 64,
                     "data.synthetic_eval_examples": 8, "tokenizer.vocab_size": 40,
                     "rollout.prompts_per_step": 4, "rollout.group_size": 4,
                     "rollout.max_new_tokens": 32, "rollout.max_tokens_per_turn": 3,
                     "rollout.env_tokens_per_call": 8, "num_steps": 2, "eval_every": 2,
                     "eval_prompts": 4, "eval_samples": 2, "log_every": 1,
                     "checkpoint.async_save": False, **over})
  (ppo if algo == "ppo" else grpo).run(c, str(tmp_path))
  rows = read_metrics(str(tmp_path))
  last = rows[-1]
  assert math.isfinite(last["loss"]) and last["env/turns"] >= 1
  assert last["response_length"] == last["env/model_tokens"]
  assert "eval_env/success" in last and "eval_sampled_env/turns" in last
  if over.get("grpo.variant") == "dapo":
    assert "refill_rounds" in last
