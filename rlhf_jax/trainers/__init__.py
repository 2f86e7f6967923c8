"""Trainers: one module per algorithm (`run(config, workdir)`, `validate(config,
num_devices)`) and the pieces they share. `validate` here checks a config of any trainer."""
from __future__ import annotations

import importlib

from rlhf_jax import config as config_lib


def validate(config, num_devices: int | None = None) -> None:
  """Every check of `config` that needs no files: the shared sections
  (`rlhf_jax.config.validate`) and config.trainer's own (`rlhf_jax.trainers.<trainer>
  .validate`). num_devices = jax.device_count() also checks that mesh.shape fits the
  devices and every batch splits evenly over them; None checks the config alone.
  ConfigError naming the key."""
  name = f"rlhf_jax.trainers.{config.trainer}"
  try:
    trainer = importlib.import_module(name)
  except ModuleNotFoundError as e:
    if e.name != name:  # a missing dependency of the trainer: not a config error
      raise
    raise config_lib.ConfigError(f"config.trainer={config.trainer!r}: no module "
                                 f"rlhf_jax/trainers/{config.trainer}.py") from None
  if not callable(getattr(trainer, "validate", None)):
    raise config_lib.ConfigError(f"config.trainer={config.trainer!r}: "
                                 f"rlhf_jax/trainers/{config.trainer}.py is not a trainer")
  trainer.validate(config, num_devices)
