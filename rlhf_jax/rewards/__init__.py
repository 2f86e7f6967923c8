"""Reward functions for online RL, and a registry to build them from config.

Interface (`rlhf_jax.rewards.base`): a reward function is a callable with a
`name`,

    fn(prompts, completions, metadata) -> np.ndarray float32 [B]

Built in (the registry `REWARD_FNS`, name -> `RewardEntry`: builder, description,
whether it loads a trained model from a workdir, paper; options are the constructor
arguments):

  math          MathReward(correct=1, incorrect=0, format_reward=0, format_marker="####",
                rel_tol=0)                      final number vs metadata["answer"]
  length_penalty LengthPenalty(target, coef=0.01)   -coef per token beyond target
  missing_eos   MissingEosPenalty(penalty=-1)      completion not finished with EOS
  overlong      OverlongPenalty(max_len, cache_len, scale=1)   DAPO soft overlong punishment
  reward_model  RewardModelReward(workdir, max_prompt_len=None, max_completion_len=None,
                batch_size=32, add_eos="always", mean=0, std=1, whiten=False)
  prm           PRMReward(workdir, aggregate="min"|"prod"|"last"|"mean", step_sep="\\n", stat="")
                a process reward model's per-step p(correct), aggregated (rewards/prm.py)

`make_reward_fn(spec)` builds a `CombinedReward` from a config-like spec;
calling it returns `(total_B, {label: component_B})` (weighted sum; the
unweighted components are for `reward/<label>` metrics):

    "math"
    {"name": "math", "weight": 1.0, "correct": 1.0}
    [{"name": "math"}, {"name": "missing_eos", "weight": 1.0, "penalty": -1.0}]

Each entry: "name" (required), "weight" (default 1), "label" (the metric
name, default the name; needed when one reward appears twice), the rest are
the reward's options. `register_reward_fn(name, factory, ...)` adds an entry.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Callable, Mapping

from rlhf_jax import registry
from rlhf_jax.rewards.base import RewardError, RewardFn  # noqa: F401
from rlhf_jax.rewards.combine import CombinedReward, combine, reward_metrics  # noqa: F401


@dataclasses.dataclass(frozen=True)
class RewardEntry:
  """One reward function that a spec names (`config.reward.spec`, `config.eval_reward_spec`).

  builder: the factory, factory(**options) -> RewardFn (the spec entry's options are its
  arguments), or its "module:attribute" (imported on first use, so that a spec that does
  not name the reward model does not import jax for it). description: what it scores.
  needs_workdir: it loads a trained model from the run directory given as its `workdir`
  option (building it reads that run and needs jax); validation refuses the entry
  without a non-empty workdir. paper: where it comes from ("" for a plain shaping rule).
  """
  builder: str | Callable[..., RewardFn]
  description: str = ""
  needs_workdir: bool = False
  paper: str = ""

  def factory(self) -> Callable[..., RewardFn]:
    return registry.resolve(self.builder)


REWARD_FNS: dict[str, RewardEntry] = {
    "math": RewardEntry(
        "rlhf_jax.rewards.math:MathReward",
        "final number of the completion vs metadata[\"answer\"] (GSM8K-robust extraction)",
        paper="rule-based verifiable reward: DeepSeek-R1 (Guo et al. 2025), Tulu 3 RLVR "
              "(Lambert et al. 2024)"),
    "length_penalty": RewardEntry(
        "rlhf_jax.rewards.rules:LengthPenalty", "-coef per completion token beyond target"),
    "missing_eos": RewardEntry(
        "rlhf_jax.rewards.rules:MissingEosPenalty",
        "penalty for a completion cut at the length limit (no EOS)"),
    "overlong": RewardEntry(
        "rlhf_jax.rewards.rules:OverlongPenalty",
        "soft overlong punishment: 0, then linear down to -1 over the last cache_len tokens",
        paper="DAPO (Yu et al. 2025, eq. 13)"),
    "reward_model": RewardEntry(
        "rlhf_jax.rewards.reward_model:RewardModelReward",
        "a trained reward model's score (optionally normalised)", needs_workdir=True,
        paper="Ziegler et al. 2019; InstructGPT (Ouyang et al. 2022)"),
    "prm": RewardEntry(
        "rlhf_jax.rewards.prm:PRMReward",
        "a trained process reward model's per-step p(correct), aggregated (min/prod/last/mean)",
        needs_workdir=True, paper="Lightman et al. 2023; Uesato et al. 2022"),
}
_RESERVED = ("name", "weight", "label")


def register_reward_fn(name: str, factory: Callable[..., RewardFn], description: str = "",
                       needs_workdir: bool = False, paper: str = "") -> None:
  """Make `factory(**options)` available to `make_reward_fn` as `name` (a `RewardEntry`)."""
  if name in REWARD_FNS:
    raise ValueError(f"reward function {name!r} is already registered")
  REWARD_FNS[name] = RewardEntry(factory, description, needs_workdir, paper)


def _factory(name: str) -> Callable[..., RewardFn]:
  if name not in REWARD_FNS:
    raise ValueError(f"unknown reward function {name!r}; valid: {sorted(REWARD_FNS)}")
  return REWARD_FNS[name].factory()


def _entries(spec) -> list[dict]:
  spec = registry.plain(spec)
  if isinstance(spec, str):
    return [{"name": spec}]
  if isinstance(spec, Mapping):
    return [dict(spec)]
  if isinstance(spec, (list, tuple)):
    out = []
    for i, e in enumerate(spec):
      e = registry.plain(e)
      if isinstance(e, str):
        e = {"name": e}
      if not isinstance(e, Mapping):
        raise ValueError(f"reward spec[{i}]={e!r}: expected a name or a dict with 'name'")
      out.append(dict(e))
    return out
  raise ValueError(f"reward spec {spec!r}: expected a name, a dict with 'name', or a list "
                   f"of them")


def _checked(entry: Mapping):
  """(factory, options) of one spec entry; ValueError for an unknown name or option."""
  entry = dict(registry.plain(entry))
  if "name" not in entry:
    raise ValueError(f"reward spec {entry!r}: missing 'name'; valid names: "
                     f"{sorted(REWARD_FNS)}")
  name = entry["name"]
  factory = _factory(name)
  options = {k: registry.plain(v) for k, v in entry.items() if k not in _RESERVED}
  try:
    sig = inspect.signature(factory)
  except (TypeError, ValueError):
    sig = None
  if sig is not None and not any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()):
    valid = [p for p in sig.parameters if p != "self"]
    unknown = sorted(set(options) - set(valid))
    if unknown:
      raise ValueError(f"reward {name!r}: unknown option(s) {unknown}; valid: "
                       f"{valid + list(_RESERVED[1:])}")
    missing = [p.name for p in sig.parameters.values()
               if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
               and p.name not in options]
    if missing:
      raise ValueError(f"reward {name!r}: missing required option(s) {missing}")
  workdir = options.get("workdir")
  if REWARD_FNS[name].needs_workdir and not (isinstance(workdir, str) and workdir):
    raise ValueError(f"reward {name!r}: needs option 'workdir', the run directory of the "
                     f"trained model it loads; got {workdir!r}")
  weight = entry.get("weight", 1.0)
  if isinstance(weight, bool) or not isinstance(weight, (int, float)):
    raise ValueError(f"reward {name!r}: weight must be a number, got {weight!r}")
  return factory, options


def build_reward_fn(entry: Mapping) -> RewardFn:
  """One reward function from {"name": ..., **options} (weight/label ignored)."""
  factory, options = _checked(entry)
  return factory(**options)


def parse_spec(spec):
  """A spec as given in a config: a name, or JSON text of an entry / a list of entries."""
  if isinstance(spec, str) and spec.strip()[:1] in ("[", "{"):
    import json
    try:
      return json.loads(spec)
    except json.JSONDecodeError as e:
      raise ValueError(f"reward spec is not valid JSON ({e.msg} at column {e.colno}): "
                       f"{spec!r}") from None
  return spec


def check_reward_spec(spec) -> None:
  """Raise ValueError for a spec `make_reward_fn` would refuse (unknown name, option or
  bad weight, invalid JSON), without building anything (no reward model is loaded)."""
  for e in _entries(parse_spec(spec)):
    _checked(e)


def make_reward_fn(spec) -> CombinedReward:
  """A `CombinedReward` from a spec (see the module docstring)."""
  components = []
  for e in _entries(parse_spec(spec)):
    fn = build_reward_fn(e)
    components.append((e.get("label", e["name"]), fn, float(e.get("weight", 1.0))))
  return CombinedReward(components)
