"""Config validation and CLI override checking."""
import subprocess
import sys

import pytest

from rlhf_jax import config as config_lib
from rlhf_jax import config_keys
from rlhf_jax import trainers
from rlhf_jax.launch import load_config
from rlhf_jax.trainers import dpo as dpo_trainer


def test_presets_load_and_validate():
  for preset in ("tiny", "1b"):
    c = load_config(f"configs/sft.py:{preset}")
    trainers.validate(c)
    m = config_lib.model_config(c, vocab_size=100)
    assert m.n_heads % m.n_kv_heads == 0
  assert config_lib.model_config(load_config("configs/sft.py:1b")).rope_scaling == (
      32.0, 1.0, 4.0, 8192)


@pytest.mark.parametrize("key,suggestion", [
    ("optimizer.lrr", "optimizer.lr"),
    ("optimzer.lr", "optimizer.lr"),
    ("batchsize", "batch_size"),
    ("data.max_seq_length", "data.max_seq_len"),
])
def test_unknown_keys_suggest_closest(key, suggestion):
  c = load_config("configs/sft.py:tiny")
  with pytest.raises(config_lib.ConfigError) as e:
    config_keys.check_overrides([f"--config.{key}=1"], c)
  assert f"'config.{key}'" in str(e.value) and f"--config.{suggestion}?" in str(e.value)


def test_valid_overrides_pass():
  c = load_config("configs/sft.py:tiny")
  config_keys.check_overrides(["--config.optimizer.lr=1e-4", "--workdir=x",
                               "--config.data.packing"], c)


@pytest.mark.parametrize("key,value,fragment", [
    ("grad_accum_steps", 3, "not divisible"),
    ("num_steps", 0, "config.num_steps"),
    ("data.overlength", "chop", "config.data.overlength"),
])
def test_validate_names_bad_values(key, value, fragment):
  c = load_config("configs/sft.py:tiny")
  parent = c
  *path, leaf = key.split(".")
  for p in path:
    parent = parent[p]
  parent[leaf] = value
  with pytest.raises(config_lib.ConfigError, match=fragment):
    config_lib.validate(c)


def test_each_trainer_validates_its_own_sections():
  """config.validate checks the shared sections; the trainer's validate (picked by
  rlhf_jax.trainers.validate from config.trainer) adds its own."""
  c = load_config("configs/dpo.py:tiny")
  c.dpo.beta = 0.0
  config_lib.validate(c, 1)
  for validate in (trainers.validate, dpo_trainer.validate):
    with pytest.raises(config_lib.ConfigError, match=r"^config.dpo.beta: must be > 0.0"):
      validate(c, 1)
  c.dpo.beta = 0.1
  c.batch_size = 6
  with pytest.raises(config_lib.ConfigError, match="data-parallel size 4"):
    trainers.validate(c, 4)
  c.trainer = "nope"
  with pytest.raises(config_lib.ConfigError, match="no module rlhf_jax/trainers/nope.py"):
    trainers.validate(c)
  c.trainer = "loop"
  with pytest.raises(config_lib.ConfigError, match="trainers/loop.py is not a trainer"):
    trainers.validate(c)


def test_cli_reports_mistyped_key_in_one_line(tmp_path):
  out = subprocess.run([sys.executable, "-m", "rlhf_jax.launch", "train",
                        "--config=configs/sft.py:tiny", f"--workdir={tmp_path}",
                        "--config.optimizer.lrr=3e-4"], capture_output=True, text=True)
  assert out.returncode == 2
  assert out.stderr.strip() == ("error: unknown config key 'config.optimizer.lrr'; "
                                "did you mean --config.optimizer.lr?")
  assert not list(tmp_path.iterdir())  # nothing written
