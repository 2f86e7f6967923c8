"""What the name registries share (reward functions in `rlhf_jax.rewards`, environments in
`rlhf_jax.envs`): an entry's builder may be a "module:attribute" string, imported only
when a spec names it (so that naming `math` does not import the reward model's jax code),
and spec values arrive as ml_collections ConfigDicts."""
from __future__ import annotations

import importlib
from typing import Any


def resolve(builder: Any) -> Any:
  """`builder` itself, or the object its "module:attribute" string names (imported now)."""
  if isinstance(builder, str):
    module, attr = builder.split(":")
    return getattr(importlib.import_module(module), attr)
  return builder


def plain(x: Any) -> Any:
  """ConfigDict / FrozenConfigDict -> dict (anything with to_dict); anything else as is."""
  return x.to_dict() if hasattr(x, "to_dict") else x
