"""The README's "Adding a DPO variant" example works as written: its code block, run in
the namespace of rlhf_jax/losses/dpo.py, registers a loss type that validation, the
loss and the trainer's step use; the loss matches a float64 numpy reference of the
formula. Also: the README's loss-type table lists every registered loss type."""
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax import config as config_lib
from rlhf_jax.launch import load_config
from rlhf_jax.losses import dpo as dpo_losses
from rlhf_jax.models import ModelConfig, Transformer
from rlhf_jax import trainers
from rlhf_jax.trainers import dpo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme():
  with open(os.path.join(ROOT, "README.md")) as f:
    return f.read()


def _example_code() -> str:
  text = _readme()
  section = text[text.index("### Adding a DPO variant"):]
  return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture
def apo_zero(monkeypatch):
  """The README block run in a copy of the registry (restored afterwards)."""
  monkeypatch.setattr(dpo_losses, "LOSSES", dict(dpo_losses.LOSSES))
  namespace = vars(dpo_losses)
  code = _example_code()
  added = [n for n in ("apo_zero_losses",) if n not in namespace]
  exec(compile(code, "README.md", "exec"), namespace)
  yield "apo_zero"
  for n in added:
    namespace.pop(n, None)


def _np_apo_zero(c, r, beta, w):
  sig = lambda z: 1.0 / (1.0 + np.exp(-z))
  losses = (1.0 - sig(beta * c)) + sig(beta * r)
  return np.sum(w * losses) / np.sum(w)


def test_readme_variant_matches_float64_numpy(apo_zero):
  rng = np.random.default_rng(0)
  B = 7
  pc, pr = rng.normal(-20, 5, B), rng.normal(-25, 5, B)
  rc, rr = rng.normal(-21, 5, B), rng.normal(-24, 5, B)
  w = np.array([1, 1, 0, 1, 1, 0, 1], np.float64)  # ragged: padding rows
  loss, metrics = dpo_losses.preference_loss(
      apo_zero, policy_chosen_logps_B=jnp.asarray(pc, jnp.float32),
      policy_rejected_logps_B=jnp.asarray(pr, jnp.float32),
      ref_chosen_logps_B=jnp.asarray(rc, jnp.float32),
      ref_rejected_logps_B=jnp.asarray(rr, jnp.float32),
      chosen_lengths_B=jnp.full((B,), 5), rejected_lengths_B=jnp.full((B,), 6), beta=0.3,
      weights_B=jnp.asarray(w, jnp.float32))
  np.testing.assert_allclose(float(loss), _np_apo_zero(pc - rc, pr - rr, 0.3, w), rtol=1e-6)
  np.testing.assert_allclose(float(metrics["chosen_reward"]),
                             np.sum(w * 0.3 * (pc - rc)) / np.sum(w), rtol=1e-5)
  # degenerate: equal log-ratios of 0 give 1 - 1/2 + 1/2 = 1
  z = jnp.zeros((3,))
  loss0, _ = dpo_losses.preference_loss(
      apo_zero, policy_chosen_logps_B=z, policy_rejected_logps_B=z, ref_chosen_logps_B=z,
      ref_rejected_logps_B=z, chosen_lengths_B=jnp.ones(3), rejected_lengths_B=jnp.ones(3),
      beta=0.1)
  assert float(loss0) == pytest.approx(1.0)
  with pytest.raises(ValueError, match="needs ref_chosen_logps_B"):
    dpo_losses.preference_loss(apo_zero, policy_chosen_logps_B=z, policy_rejected_logps_B=z,
                               chosen_lengths_B=jnp.ones(3), rejected_lengths_B=jnp.ones(3),
                               beta=0.1)


def test_readme_variant_validates_and_trains(apo_zero):
  c = load_config(os.path.join(ROOT, "configs/dpo.py:tiny"))
  c.dpo.loss_type = apo_zero
  trainers.validate(c, 1)  # accepted: validation reads the registry
  c.dpo.label_smoothing = 0.1
  with pytest.raises(config_lib.ConfigError, match="label_smoothing: applies only to"):
    trainers.validate(c, 1)
  c.dpo.label_smoothing = 0.0
  assert dpo.uses_reference(c.dpo) and dpo.sides(c.dpo) == ("chosen", "rejected")

  cfg = ModelConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1,
                    head_dim=8, d_ff=32)
  model = Transformer(cfg)
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))["params"])
  tx = optax.sgd(0.5)
  state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
  rng = np.random.default_rng(1)
  T = 8
  seg = jnp.ones((2, T), jnp.int32)
  mask = jnp.asarray(np.arange(T)[None] >= 3, jnp.int32) * seg
  batch = {f"{s}_{k}": v for s in ("chosen", "rejected") for k, v in (
      ("tokens", jnp.asarray(rng.integers(3, 32, (2, T)), jnp.int32)),
      ("segment_ids", seg), ("loss_mask", mask))}
  ref = jax.tree.map(lambda p: p * 0.5, params)
  step = jax.jit(dpo.make_train_step(model, tx, c.dpo))
  s1, m1 = step(state, ref, batch)
  _, m2 = step(s1, ref, batch)
  assert np.isfinite(float(m1["loss"])) and float(m2["loss"]) < float(m1["loss"])


def test_readme_loss_table_lists_every_registered_loss_type():
  text = _readme()
  table = text[text.index("| loss_type |"):text.index("Also `dpo.reference_free`")]
  listed = re.findall(r"^\| `(\w+)` \|", table, re.M)
  assert listed == list(dpo_losses.LOSS_TYPES)


def test_grpo_advantage_estimators_drive_validation():
  """config.grpo.advantage accepts exactly the registry's names, and group_size=1 is
  refused exactly for the estimators that need groups."""
  from rlhf_jax.losses.advantages import ESTIMATORS
  assert set(ESTIMATORS) == {"group_std", "group", "rloo", "reinforce_pp"}
  for name, est in ESTIMATORS.items():
    c = load_config(os.path.join(ROOT, "configs/grpo.py:tiny"))
    c.grpo.advantage = name
    c.rollout.group_size = 1
    c.rollout.train_micro_batch = 0
    if est.needs_groups:
      with pytest.raises(config_lib.ConfigError, match="needs group_size >= 2"):
        trainers.validate(c, 1)
    else:
      trainers.validate(c, 1)
  c.grpo.advantage = "nope"
  with pytest.raises(config_lib.ConfigError, match="config.grpo.advantage='nope'"):
    trainers.validate(c, 1)
