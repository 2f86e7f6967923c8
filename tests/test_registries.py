"""The variant registries of the online-RL knobs are single tables read by validation, the
README and the losses: loss aggregation modes (`losses.ppo.AGGREGATION_MODES`), KL
estimators (`losses.kl.KL_ESTIMATORS`) and reward functions (`rewards.REWARD_FNS`).

Checks: the README tables list exactly the registry's names (and its papers / flags);
validation accepts exactly the registry's names (an entry added to a table is accepted, an
unknown name refused); every aggregation's micro_batch_weight splits a ragged batch into
parts whose weights add up to the whole-batch denominator (numpy, written independently)
and recombine the parts' losses into the whole-batch loss. Numerics of the modes and
estimators themselves are in test_losses_ppo.py / test_losses_kl.py."""
import dataclasses
import os
import re

import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import config as config_lib
from rlhf_jax import rewards
from rlhf_jax.launch import load_config
from rlhf_jax.losses import kl as kl_lib
from rlhf_jax.losses import ppo as ppo_lib
from rlhf_jax import trainers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme_table(header: str) -> list[list[str]]:
  """The rows of the README table whose header line starts with `header`, as stripped
  cells; the first cell with its backticks removed."""
  with open(os.path.join(ROOT, "README.md")) as f:
    text = f.read()
  start = text.index("\n" + header) + 1
  lines = text[start:].split("\n\n", 1)[0].splitlines()[2:]  # past the header and |---|
  rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines]
  for r in rows:
    assert re.fullmatch(r"`\w+`", r[0]), r
    r[0] = r[0].strip("`")
  return rows


# ----------------------------------------------------------------------------- README tables

def test_readme_aggregation_table_is_the_registry():
  rows = _readme_table("| aggregation | what it is | paper |")
  assert [r[0] for r in rows] == list(ppo_lib.AGGREGATIONS) == list(ppo_lib.AGGREGATION_MODES)
  for name, _, paper in rows:
    assert paper == ppo_lib.AGGREGATION_MODES[name].paper, name


def test_readme_kl_table_is_the_registry():
  rows = _readme_table("| kl_estimator | what it is | paper |")
  assert [r[0] for r in rows] == list(kl_lib.KL_KINDS) == list(kl_lib.KL_ESTIMATORS)
  for name, what, paper in rows:
    est = kl_lib.KL_ESTIMATORS[name]
    assert paper == est.paper, name
    assert what.startswith(f"`{est.formula}`: " + ("unbiased" if est.unbiased else "biased")), name
    assert ("≥ 0" in what) == est.nonnegative, name


def test_readme_reward_table_is_the_registry():
  rows = _readme_table("| reward | what it is | workdir | paper |")
  assert [r[0] for r in rows] == list(rewards.REWARD_FNS)
  for name, _, workdir, paper in rows:
    entry = rewards.REWARD_FNS[name]
    assert workdir == ("yes" if entry.needs_workdir else "no"), name
    assert paper == entry.paper, name


# ----------------------------------------------------------------------------- aggregation weights

def _np_denominator(mask_BT, name):
  """The whole-batch denominator of each mode, from its formula: real tokens for the token
  mean, rows with a real token for the sequence means."""
  m = np.asarray(mask_BT) > 0
  return float(m.sum()) if name == "token_mean" else float((m.sum(axis=1) > 0).sum())


@pytest.mark.parametrize("seed", range(4))
def test_micro_batch_weights_split_the_whole_batch_denominator(seed):
  rng = np.random.default_rng(seed)
  B, T = 9, 7
  n_B = rng.integers(0, T + 1, B)
  n_B[rng.integers(B)] = 0                                  # at least one padding row
  start_B = rng.integers(0, T - n_B + 1)                    # ragged, left or right gaps
  t = np.arange(T)[None]
  mask = ((t >= start_B[:, None]) & (t < (start_B + n_B)[:, None])).astype(np.int32)
  loss = rng.normal(size=(B, T)).astype(np.float32)
  loss[mask == 0] = np.nan                                  # never reaches any result
  splits = [int(rng.integers(1, B)), 1, B - 1]
  if seed == 0:                                             # a part with no real token
    mask[:3] = 0
    splits.append(3)
  for name, mode in ppo_lib.AGGREGATION_MODES.items():
    whole = float(mode.fn(jnp.asarray(loss), jnp.asarray(mask), T))
    assert float(mode.micro_batch_weight(jnp.asarray(mask))) == _np_denominator(mask, name)
    for k in splits:
      parts = [(loss[:k], mask[:k]), (loss[k:], mask[k:])]
      w = [float(mode.micro_batch_weight(jnp.asarray(m))) for _, m in parts]
      assert w == [_np_denominator(m, name) for _, m in parts], (name, k)
      assert sum(w) == _np_denominator(mask, name), (name, k)
      # the weighted mean of the parts' losses is the whole-batch loss (exact accumulation)
      got = sum(wi * float(mode.fn(jnp.asarray(l), jnp.asarray(m), T))
                for wi, (l, m) in zip(w, parts)) / max(sum(w), 1.0)
      np.testing.assert_allclose(got, whole, rtol=1e-5, atol=1e-7, err_msg=f"{name} split {k}")
    assert float(ppo_lib.micro_batch_weight(jnp.asarray(mask), name)) == _np_denominator(mask,
                                                                                        name)
    assert float(ppo_lib.aggregate(jnp.asarray(loss), jnp.asarray(mask), name, T)) == whole


def test_kl_nonnegative_flags():
  d = np.linspace(-5, 5, 101).astype(np.float32)
  for name, est in kl_lib.KL_ESTIMATORS.items():
    k = np.asarray(est.fn(jnp.asarray(d)))
    assert np.isfinite(k).all() and (k >= 0).all() == est.nonnegative, name


# ----------------------------------------------------------------------------- validation

def _config(trainer):
  return load_config(os.path.join(ROOT, f"configs/{trainer}.py:tiny"))


def _set(c, trainer, key, value):
  if trainer == "grpo":
    c.grpo[key] = value
  else:
    c.ppo[key] = value


@pytest.mark.parametrize("trainer", ["grpo", "ppo"])
def test_validation_reads_aggregation_and_kl_tables(trainer, monkeypatch):
  for key, table in (("aggregation", ppo_lib.AGGREGATION_MODES),
                     ("kl_estimator", kl_lib.KL_ESTIMATORS)):
    for name in table:
      c = _config(trainer)
      _set(c, trainer, key, name)
      trainers.validate(c, 1)
    c = _config(trainer)
    _set(c, trainer, key, "nope")
    with pytest.raises(config_lib.ConfigError, match=f"{key}"):
      trainers.validate(c, 1)
  # a new entry in a table is a valid name (validation reads the table, not a copy of it)
  copy = dataclasses.replace(ppo_lib.AGGREGATION_MODES["seq_mean_token_sum"])
  monkeypatch.setattr(ppo_lib, "AGGREGATION_MODES",
                      {**ppo_lib.AGGREGATION_MODES, "seq_mean_token_sum_copy": copy})
  monkeypatch.setattr(kl_lib, "KL_ESTIMATORS", {
      **kl_lib.KL_ESTIMATORS, "k_abs": kl_lib.KLEstimator(jnp.abs, "|d|", False, True, "")})
  c = _config(trainer)
  _set(c, trainer, "aggregation", "seq_mean_token_sum_copy")
  _set(c, trainer, "kl_estimator", "k_abs")
  trainers.validate(c, 1)
  # ... and the losses dispatch through it
  d = jnp.asarray([[1.0, -2.0]])
  assert np.asarray(kl_lib.kl_estimate(d, jnp.zeros_like(d), "k_abs")).tolist() == [[1.0, 2.0]]
  assert float(ppo_lib.aggregate(d, jnp.ones_like(d), "seq_mean_token_sum_copy")) == -1.0


def test_validation_reads_the_reward_table():
  c = _config("grpo")
  for name, entry in rewards.REWARD_FNS.items():
    spec = {"name": name}
    if entry.needs_workdir:
      spec["workdir"] = "runs/rm"
    elif name == "length_penalty":
      spec["target"] = 4
    elif name == "overlong":
      spec.update(max_len=8, cache_len=2)
    rewards.check_reward_spec(spec)   # named, options checked, nothing built
  c.reward.spec = "nope"
  with pytest.raises(config_lib.ConfigError, match="unknown reward function 'nope'"):
    trainers.validate(c, 1)
  # a reward that loads a trained model needs a workdir
  for name, entry in rewards.REWARD_FNS.items():
    if entry.needs_workdir:
      c.reward.spec = f'{{"name": "{name}", "workdir": ""}}'
      with pytest.raises(config_lib.ConfigError, match=f"reward '{name}': needs option 'workdir'"):
        trainers.validate(c, 1)


def test_registry_builders_resolve_lazily_and_specs_become_plain_dicts():
  """rlhf_jax.registry: a "module:attribute" builder names the object (imported on use),
  a callable is itself; ConfigDicts become dicts. Both registries go through it."""
  import ml_collections

  from rlhf_jax import envs, registry, rewards
  from rlhf_jax.envs.guess_number import GuessNumberEnv
  from rlhf_jax.rewards.math import MathReward
  assert registry.resolve("rlhf_jax.rewards.math:MathReward") is MathReward
  assert registry.resolve(len) is len
  assert rewards.REWARD_FNS["math"].factory() is MathReward
  assert envs.ENVS["guess_number"].factory() is GuessNumberEnv
  assert registry.plain(ml_collections.ConfigDict({"a": {"b": 1}})) == {"a": {"b": 1}}
  assert registry.plain([1]) == [1]
  with pytest.raises(ModuleNotFoundError):
    registry.resolve("rlhf_jax.no_such_module:x")
