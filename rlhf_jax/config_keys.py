"""Key checks of config overrides: every `--config.KEY=...` flag names a key the config
has (else ConfigError naming the key and the closest valid one), and a flag value of the
wrong type gets one line naming the key, its type and its default.
"""
from __future__ import annotations

import difflib
import re
from typing import Iterable

from ml_collections import ConfigDict

from rlhf_jax.config import ConfigError


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
