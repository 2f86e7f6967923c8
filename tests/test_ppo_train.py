"""PPO trainer end to end on synthetic 1-digit addition, from a short SFT run:
learning, shared critic, adaptive KL controller checkpointed and resumed bitwise."""
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from rlhf_jax.checkpoint import read_checkpoint
from conftest import override, read_metrics
from rlhf_jax.launch import load_config
from rlhf_jax.trainers import ppo

pytestmark = pytest.mark.slow


rows = read_metrics


def ppo_config(sft_add_run, tfds_data_dir, **over):
  c = load_config("configs/ppo.py:tiny")
  c.init_from = sft_add_run
  c.data.data_dir = tfds_data_dir
  c.checkpoint.async_save = False
  return override(c, **over)


def test_ppo_raises_accuracy_above_the_sft_policy(sft_add_run, tfds_data_dir, tmp_path):
  wd = str(tmp_path / "ppo")
  # 40 steps are enough: held-out accuracy +0.27 at this seed (+0.12, +0.20 at seeds 1, 2)
  ppo.run(ppo_config(sft_add_run, tfds_data_dir, num_steps=40, eval_every=40), wd)
  r = rows(wd)
  start, end = r[0]["eval_accuracy"], r[-1]["eval_accuracy"]
  assert end > start + 0.08, (start, end)
  for key in ("value_loss", "explained_variance", "rollout_values_explained_variance",
              "clip_frac", "approx_kl", "entropy", "kl_seq", "kl_coef", "reward/math",
              "time/generate", "time/update", "rollout_tokens_per_second"):
    assert key in r[-1] and np.isfinite(r[-1][key]), key


def test_shared_critic_runs(sft_add_run, tfds_data_dir, tmp_path):
  wd = str(tmp_path / "shared")
  ppo.run(ppo_config(sft_add_run, tfds_data_dir, num_steps=2, log_every=1, eval_every=0,
                     **{"ppo.critic": "shared"}), wd)
  _, state = read_checkpoint(os.path.join(wd, "checkpoints"))
  assert set(state["params"]["value"]) == {"dense"}  # a head only: shares the policy trunk
  assert np.isfinite(rows(wd)[-1]["value_loss"])


def _cli(workdir, sft_add_run, tfds_data_dir, fault=None):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("RLHF_JAX_FAULT", None)
  if fault:
    env["RLHF_JAX_FAULT"] = fault
  return subprocess.run(
      [sys.executable, "-m", "rlhf_jax.faults" if fault else "rlhf_jax.launch", "train", "--config=configs/ppo.py:tiny",
       f"--workdir={workdir}", f"--config.init_from={sft_add_run}",
       f"--config.data.data_dir={tfds_data_dir}", "--config.num_steps=4",
       "--config.checkpoint.every=2", "--config.eval_every=0", "--config.log_every=1",
       "--config.ppo.adaptive_kl=True", "--config.ppo.kl_target=0.01",
       "--config.ppo.kl_horizon=100", "--config.checkpoint.async_save=False"],
      env=env, capture_output=True, text=True, timeout=600)


def test_adaptive_kl_controller_resumes_bitwise(sft_add_run, tfds_data_dir, tmp_path):
  ref, killed = str(tmp_path / "ref"), str(tmp_path / "killed")
  out = _cli(ref, sft_add_run, tfds_data_dir)
  assert out.returncode == 0, out.stderr[-3000:]
  betas = [r["kl_coef"] for r in rows(ref)]
  assert betas[0] == pytest.approx(0.05) and betas[-1] != betas[0]  # the controller moved
  out = _cli(killed, sft_add_run, tfds_data_dir, fault="3:KILL")
  assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
  out = _cli(killed, sft_add_run, tfds_data_dir)
  assert out.returncode == 0 and "resumed from step 2" in out.stdout, out.stderr[-3000:]
  (_, a), (_, b) = (read_checkpoint(os.path.join(w, "checkpoints")) for w in (ref, killed))
  assert float(a["kl_ctl"]["beta"]) == float(b["kl_ctl"]["beta"])
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert np.array_equal(np.asarray(x), np.asarray(y))
  assert [r["kl_coef"] for r in rows(killed)] == betas
