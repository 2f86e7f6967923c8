"""Reading a config from the command line: `file.py[:preset]` specs (`load_config`) and
key checks of overrides: every `--config.KEY=...` flag names a key the config has (else
ConfigError naming the key and the closest valid one), and a flag value of the wrong type
gets one line naming the key, its type and its default.
"""
from __future__ import annotations

import difflib
import os
import re
import runpy
from typing import Iterable

from ml_collections import ConfigDict

from rlhf_jax.config import ConfigError


def load_config(spec: str) -> ConfigDict:
  """`path/to/file.py[:preset]` -> the ConfigDict of the file's get_config(preset);
  ConfigError naming the file / preset when it cannot be loaded."""
  path, _, preset = spec.partition(":")
  if not os.path.isfile(path):
    raise ConfigError(f"--config: file not found: {path}")
  try:
    module = runpy.run_path(path)
  except Exception as e:  # the config file is user code: name it, not our traceback
    raise ConfigError(f"--config: cannot load {path}: {type(e).__name__}: {e}") from None
  if "get_config" not in module:
    raise ConfigError(f"--config: {path} defines no get_config()")
  try:
    config = module["get_config"](preset) if preset else module["get_config"]()
  except ValueError as e:
    raise ConfigError(f"--config={spec}: {e}") from None
  except Exception as e:
    raise ConfigError(f"--config={spec}: get_config() raised {type(e).__name__}: {e}") from None
  if not isinstance(config, ConfigDict):
    raise ConfigError(f"--config={spec}: get_config() returned {type(config).__name__}, "
                      f"expected an ml_collections ConfigDict")
  return config



def _all_keys(config: ConfigDict, prefix: str = "") -> list[str]:
  keys = []
  for k, v in config.items():
    path = f"{prefix}{k}"
    keys.append(path)
    if isinstance(v, ConfigDict):
      keys.extend(_all_keys(v, path + "."))
  return keys


def check_key(config: ConfigDict, key: str, flag: str = "config") -> None:
  """Raise ConfigError naming `key` (dotted) and the closest valid key if absent."""
  valid = _all_keys(config)
  if key in valid:
    return
  close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
  if not close:  # try the last component alone: "optimizer.lrr" -> "optimizer.lr"
    parent, _, leaf = key.rpartition(".")
    siblings = [k.rpartition(".")[2] for k in valid if k.rpartition(".")[0] == parent]
    m = difflib.get_close_matches(leaf, siblings, n=1, cutoff=0.5)
    close = [f"{parent}.{m[0]}" if parent else m[0]] if m else []
  hint = f"; did you mean --{flag}.{close[0]}?" if close else ""
  raise ConfigError(f"unknown config key '{flag}.{key}'{hint}")


_OVERRIDE = re.compile(r"^--?(config)\.([A-Za-z0-9_.]+)(=.*)?$")


def check_overrides(argv: Iterable[str], config: ConfigDict) -> None:
  """Validate every `--config.a.b=...` flag in argv against `config`'s keys."""
  for arg in argv:
    m = _OVERRIDE.match(arg)
    if m:
      check_key(config, m.group(2), m.group(1))


_FLAG_ERROR = re.compile(r"^flag --config\.([A-Za-z0-9_.]+)=(.*?): (.*)$", re.S)


def explain_flag_error(message: str, config: ConfigDict) -> str:
  """One line for an absl flag-parsing error: a `--config.KEY=VALUE` whose value is not of
  the key's type names the key, the expected type and the default."""
  m = _FLAG_ERROR.match(message)
  if not m:
    return message.splitlines()[0]
  key, value, detail = m.groups()
  node = config
  try:
    for part in key.split("."):
      node = node[part]
  except (KeyError, AttributeError, TypeError):
    return message.splitlines()[0]
  kind = ("section" if isinstance(node, ConfigDict) else
          {bool: "bool", int: "int", float: "float", str: "str"}.get(type(node),
                                                                     type(node).__name__))
  default = "a ConfigDict section" if kind == "section" else repr(node)
  hint = " (true/false)" if kind == "bool" else ""
  return (f"config.{key}: expected {kind}{hint} (default {default}), got {value!r} "
          f"({detail.splitlines()[0]})")
