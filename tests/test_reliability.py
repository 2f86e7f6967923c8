"""Reliability (issue #9), the fast CI subset of experiments/reliability/kill_resume.py,
through its own functions and configs (the tiny presets, shortened):

  determinism   every trainer, same config + seed twice: metrics.jsonl (timing keys
                excluded) and every checkpoint leaf bitwise identical (SFT, PPO, GRPO:
                two in-process runs; RM, DPO: a separate `rlhf-jax train` process,
                killed and resumed, against an in-process run);
  kill+resume   a real SIGKILL of `rlhf-jax train` (the reward model after a step, DPO in
                the middle of a checkpoint write), resumed: bitwise equal to the
                uninterrupted run, no metrics row duplicated or missing (SFT, PPO and
                GRPO kills are in test_train / test_ppo_train / test_grpo_train);
  SIGTERM       checkpoint, exit 75 (EXIT_PREEMPTED) within 30 s; also during start-up;
  NaN           non-finite losses injected at chosen steps are skipped (parameters and
                optimizer state untouched) and counted; max_bad_steps in a row stop it.
"""
import importlib.util
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

import rlhf_jax
from rlhf_jax import faults
from rlhf_jax.trainers import dpo, grpo, loop, ppo, reward_model, sft

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location(
    "kill_resume", REPO / "experiments" / "reliability" / "kill_resume.py")
kr = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kr)

RUN = {"sft": sft.run, "rm": reward_model.run, "dpo": dpo.run, "ppo": ppo.run,
       "grpo": grpo.run}
# Shorter than the harness's runs; the same presets and knobs otherwise.
SHORT = {"sft": dict(num_steps=6, eval_every=6, **{"checkpoint.every": 2, "sample.every": 6}),
         "rm": dict(num_steps=6, eval_every=6, **{"checkpoint.every": 2}),
         "dpo": dict(num_steps=6, eval_every=6, **{"checkpoint.every": 2, "sample.every": 6}),
         "ppo": dict(num_steps=2, eval_every=2, **{"checkpoint.every": 1}),
         "grpo": dict(num_steps=3, eval_every=3, **{"checkpoint.every": 1})}


def run_in_process(trainer, workdir, **extra):
  return RUN[trainer](kr.config(trainer, **{**SHORT[trainer], **extra}), str(workdir))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """trainer -> the workdir of one uninterrupted in-process run (made on first use)."""
  made = {}

  def get(trainer):
    if trainer not in made:
      wd = tmp_path_factory.mktemp(f"ref_{trainer}")
      assert run_in_process(trainer, wd)["step"] == SHORT[trainer]["num_steps"]
      made[trainer] = str(wd)
    return made[trainer]
  return get


def cli(trainer, workdir, fault=None, **extra):
  env = {"RLHF_JAX_FAULT": fault} if fault else {}
  return subprocess.run(kr.cli_argv(trainer, str(workdir), **{**SHORT[trainer], **extra}),
                        cwd=REPO, env=kr.env(**env), capture_output=True, text=True,
                        timeout=600)


def assert_same_run(ref, other):
  c = kr.compare(ref, other)
  assert c["ok"], c
  assert c["rows"] > 1 and c["leaves"] > 10
  return c


@pytest.mark.parametrize("trainer", ["sft", "ppo", "grpo"])  # rm, dpo: the kill tests
def test_same_config_and_seed_give_bitwise_identical_runs(reference, tmp_path, trainer):
  ref = reference(trainer)
  run_in_process(trainer, tmp_path)
  assert_same_run(ref, str(tmp_path))


def test_the_comparison_sees_another_seed(reference, tmp_path):
  run_in_process("sft", tmp_path, seed=1)
  c = kr.compare(reference("sft"), str(tmp_path))
  assert not c["ok"] and not c["bitwise_params"] and not c["metrics_rows_ok"], c


def test_timing_keys_are_the_only_ones_excluded():
  assert [k for k in ("time/step", "elapsed_s", "tokens_per_second",
                      "rollout_tokens_per_second", "train_tokens_per_second")
          if not kr.is_timing_key(k)] == []
  assert not any(kr.is_timing_key(k) for k in ("loss", "step", "skipped_updates", "kl_coef",
                                               "eval_loss", "learning_rate", "time"))


def test_reward_model_sigkill_after_a_step_then_resume_is_bitwise(reference, tmp_path):
  ref = reference("rm")
  # SIGKILL after step 5 (synchronous checkpoint writes: checkpoint 4 is surely finished)
  out = cli("rm", tmp_path, fault="5:KILL", **{"checkpoint.async_save": False})
  assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
  assert kr._finished_steps(str(tmp_path))[-1] == 4
  assert [r["step"] for r in kr.read_rows(str(tmp_path / "metrics.jsonl"))][-1] == 5
  run_in_process("rm", tmp_path)  # resumes from 4; row 5 is not duplicated
  assert_same_run(ref, str(tmp_path))


def test_dpo_sigkill_during_a_checkpoint_write_then_resume_is_bitwise(reference, tmp_path):
  ref = reference("dpo")
  out = cli("dpo", tmp_path, fault="4:KILL:save")
  assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
  # killed mid-write: step 4's temporary directory holds tensor data, 4 is not finished
  assert list(kr._tmp_dirs(str(tmp_path))) == ["4.orbax-checkpoint-tmp"]
  tmp = tmp_path / "checkpoints" / "4.orbax-checkpoint-tmp"
  assert any(p.is_file() for p in tmp.rglob("*")) and kr._finished_steps(str(tmp_path)) == [2]
  assert os.path.exists(tmp_path / "reference_logps_train.npz")  # the reference-logp cache
  run_in_process("dpo", tmp_path)
  assert not kr._tmp_dirs(str(tmp_path))
  assert_same_run(ref, str(tmp_path))


def test_sigterm_checkpoints_and_exits_75_within_30_s(tmp_path):
  wd = tmp_path / "term"
  proc = subprocess.Popen(kr.cli_argv("sft", str(wd), num_steps=400, eval_every=0,
                                      **{"checkpoint.every": 100}),
                          cwd=REPO, env=kr.env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  metrics = wd / "metrics.jsonl"
  deadline = time.time() + 300
  while not (metrics.exists() and len(kr.read_rows(str(metrics))) >= 2):
    if proc.poll() is not None or time.time() > deadline:
      proc.kill()
      pytest.fail("the run ended or hung before step 2: " + "".join(proc.communicate())[-3000:])
    time.sleep(0.05)
  t0 = time.time()
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=60)
  seconds = time.time() - t0
  assert proc.returncode == rlhf_jax.EXIT_PREEMPTED == 75, out[-2000:] + err[-3000:]
  assert seconds < 30, (seconds, out[-2000:])
  step = int(out.split("preempted: saved checkpoint at step ")[1].split(";")[0])
  assert 2 <= step < 400 and kr._finished_steps(str(wd))[-1] == step
  assert [r["step"] for r in kr.read_rows(str(metrics))] == list(range(1, step + 1))
  # SIGTERM during start-up (imports, data, compilation): nothing to save, exit 75 at once.
  proc = subprocess.Popen(kr.cli_argv("sft", str(tmp_path / "early")), cwd=REPO, env=kr.env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  first = proc.stdout.readline()  # "rlhf-jax train: ...", then data, tokenizer, jit
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=60)
  assert first.startswith("rlhf-jax train: ") and proc.returncode == 75, (first, out, err[-3000:])
  assert "preempted (SIGTERM) outside the training loop" in err, (out, err[-3000:])


@pytest.mark.parametrize("trainer,steps", [("sft", [2, 4]), ("grpo", [2, 3, 4])])
def test_injected_nans_are_skipped_counted_and_stop_after_max_bad_steps(
    tmp_path, trainer, steps):
  n = 5
  finished, message = True, ""
  undo = faults.install(nan_steps=steps)  # the loss of those steps is multiplied by NaN
  try:
    RUN[trainer](kr.config(trainer, **kr.nan_overrides(n)), str(tmp_path))
  except loop.TrainingError as e:
    finished, message = False, str(e)
  finally:
    undo()
  handled = kr.nan_handled(str(tmp_path), steps, n, finished, message,
                           kr.updates_per_step(trainer))
  assert handled == [True] * len(steps), (handled, finished, message)
  assert finished == (len(steps) < kr.MAX_BAD)
