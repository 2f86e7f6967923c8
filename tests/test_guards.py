"""Numerical guards: a non-finite gradient skips the update (parameters and AdamW state
untouched, the step still counts; `optim.skip_nonfinite` counts it in the optimizer
state), train_loop logs the count and stops with one clear message after
config.max_bad_steps in a row."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax import checkpoint as ckpt_lib
from rlhf_jax import config as config_lib
from rlhf_jax import parallel
from rlhf_jax.metrics import read_jsonl
from rlhf_jax.trainers import loop, optim
from rlhf_jax.trainers import step as step_lib


def _state(tx):
  params = {"w": jnp.arange(4.0), "b": jnp.ones(())}
  return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_gradient_skips_the_update(bad):
  tx = optim.skip_nonfinite(optax.adamw(0.1))
  state = _state(tx)
  step = jax.jit(lambda s, g: (step_lib.apply_gradients(s, g, tx), step_lib.skipped_metric(g)))
  good = {"w": jnp.full(4, 0.5), "b": jnp.float32(1.0)}
  s1, skipped = step(state, good)
  assert float(skipped) == 0.0 and int(s1["step"]) == 1
  assert not np.array_equal(s1["params"]["w"], state["params"]["w"])
  poisoned = {"w": jnp.array([0.5, bad, 0.5, 0.5]), "b": jnp.float32(1.0)}
  s2, skipped = step(s1, poisoned)
  assert float(skipped) == 1.0 and int(s2["step"]) == 2   # the batch is consumed
  for a, b in zip(jax.tree.leaves((s2["params"], s2["opt_state"].inner)),
                  jax.tree.leaves((s1["params"], s1["opt_state"].inner))):
    np.testing.assert_array_equal(a, b)                   # nothing else moved
  assert optim.guard_counters(s1["opt_state"]) == (0, 0)
  assert optim.guard_counters(s2["opt_state"]) == (1, 1)  # counted: 1 in all, 1 in a row
  s3, _ = step(s2, good)                                  # and training goes on
  assert np.all(np.isfinite(s3["params"]["w"]))
  assert not np.array_equal(s3["params"]["w"], s2["params"]["w"])
  assert optim.guard_counters(s3["opt_state"]) == (1, 0)


def test_the_guard_is_in_every_trainers_optimizer():
  tx, _ = optim.make_optimizer(config_lib.base_config("sft").optimizer, 10)
  state = _state(tx)
  assert isinstance(state["opt_state"], optim.GuardState)
  s1 = step_lib.apply_gradients(state, {"w": jnp.full(4, jnp.nan), "b": jnp.float32(1.0)}, tx)
  np.testing.assert_array_equal(s1["params"]["w"], state["params"]["w"])
  assert optim.guard_counters(s1["opt_state"]) == (1, 1)


def _loop(tmp_path, pattern, max_bad):
  config = config_lib.base_config("sft")
  config.update(num_steps=len(pattern), log_every=1, eval_every=0, max_bad_steps=max_bad)
  config.checkpoint.update(every=100, async_save=False)
  tx = optim.skip_nonfinite(optax.sgd(0.1))
  state = _state(tx)
  update = jax.jit(lambda s, g: step_lib.apply_gradients(s, g, tx))

  def step_fn(s, batch):  # NaN gradients at the updates `pattern` marks (a tuple per
    for bad in np.atleast_1d(pattern[batch]):  # step: one entry per update)
      g = jnp.float32(np.nan if bad else 1.0)
      s = update(s, {"w": jnp.full(4, g), "b": g})
    return {**s, "step": jnp.int32(batch + 1)}, {"loss": 1.0}
  ckpt = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints"), 100, 1, async_save=False)
  return loop.train_loop(config, str(tmp_path), state=state, start=0, train_step=step_fn,
                         get_batch=lambda i: i, mesh=parallel.make_mesh(), checkpointer=ckpt,
                         schedule=lambda s: 0.1, shard_batches=False,
                         updates_per_step=len(np.atleast_1d(pattern[0])))


def test_train_loop_counts_intermittent_skips(tmp_path):
  out = _loop(tmp_path, [0, 1, 0, 1, 1, 0], max_bad=3)
  assert out["step"] == 6 and out["skipped_updates"] == 3
  rows = read_jsonl(str(tmp_path / "metrics.jsonl"))
  assert [r["skipped_updates"] for r in rows] == [0, 1, 1, 2, 3, 3]


def test_train_loop_stops_after_max_bad_steps_in_a_row(tmp_path):
  with pytest.raises(loop.TrainingError,
                     match=r"3 consecutive non-finite updates \(steps 3-5, "
                           r"config.max_bad_steps=3\)"):
    _loop(tmp_path, [0, 0, 1, 1, 1, 0, 0], max_bad=3)
  assert [r["step"] for r in read_jsonl(str(tmp_path / "metrics.jsonl"))] == [1, 2, 3, 4]


def test_train_loop_with_several_updates_per_step(tmp_path):
  # PPO / GRPO: a step is "bad" when every one of its updates was skipped; a step with a
  # finite update breaks the run; skipped_updates counts updates.
  out = _loop(tmp_path, [(0, 0), (1, 1), (1, 0), (1, 1), (0, 0)], max_bad=2)
  assert out["step"] == 5 and out["skipped_updates"] == 5
  rows = read_jsonl(str(tmp_path / "metrics.jsonl"))
  assert [r["skipped_updates"] for r in rows] == [0, 2, 3, 5, 5]
  with pytest.raises(loop.TrainingError,
                     match=r"2 consecutive non-finite updates \(steps 3-4, config.max_bad_steps=2\)"):
    _loop(tmp_path / "stop", [(0, 0), (0, 1), (1, 1), (1, 1), (0, 0)], max_bad=2)


# Eval cadence: eval_every, eval_at_start, eval_at_end (loop.eval_due).

def _eval_steps(tmp_path, num_steps, eval_every, log_every=1, **knobs):
  config = config_lib.base_config("sft")
  config.update(num_steps=num_steps, log_every=log_every, eval_every=eval_every, **knobs)
  config.checkpoint.update(every=100, async_save=False)
  seen = []

  def evaluate(params, step):
    seen.append(step)
    return {"eval_loss": float(step)}
  ckpt = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints"), 100, 1, async_save=False)
  loop.train_loop(config, str(tmp_path), state=_state(optax.sgd(0.1)), start=0,
                  train_step=lambda s, b: (s, {"loss": 1.0}), get_batch=lambda i: i,
                  mesh=parallel.make_mesh(), checkpointer=ckpt, schedule=lambda s: 0.1,
                  evaluate=evaluate, shard_batches=False)
  rows = read_jsonl(str(tmp_path / "metrics.jsonl"))
  assert [r["step"] for r in rows if "eval_loss" in r] == seen
  return seen


@pytest.mark.parametrize("knobs,want", [
    ({}, [0, 3, 6, 7]),                                    # the defaults: today's cadence
    (dict(eval_at_start=False), [3, 6, 7]),
    (dict(eval_at_end=False), [0, 3, 6]),
    (dict(eval_at_start=False, eval_at_end=False), [3, 6]),
])
def test_eval_cadence(tmp_path, knobs, want):
  assert _eval_steps(tmp_path, 7, 3, **knobs) == want


def test_eval_every_beyond_num_steps(tmp_path):
  # eval_every > num_steps: only the start and the end evaluate; both off = no eval at all.
  assert _eval_steps(tmp_path / "a", 4, 50) == [0, 4]
  assert _eval_steps(tmp_path / "b", 4, 50, eval_at_start=False, eval_at_end=False) == []
  assert _eval_steps(tmp_path / "c", 4, 0) == []  # eval_every=0: never, whatever the knobs
  assert _eval_steps(tmp_path / "d", 6, 2, log_every=3) == [0, 6]  # evals ride on log rows


def test_eval_cadence_knobs_are_checked():
  config = config_lib.base_config("sft")
  del config["eval_at_end"]  # (ConfigDict refuses a str for a bool field; a file may not)
  config.eval_at_end = "no"
  with pytest.raises(config_lib.ConfigError, match=r"config.eval_at_end: expected True or False"):
    config_lib.validate(config)
