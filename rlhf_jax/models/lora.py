"""LoRA: low-rank adapters on the projections of a frozen model (pure functions).

Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"
(arXiv:2106.09685). A target projection W (a stacked kernel [L, in..., out...])
is used as

    W' = W + (alpha / r) * A @ B        A [L, in..., r] ~ N(0, 1/fan_in),  B [L, r, out...] = 0

so the adapted model starts *exactly* at the base model (A @ 0 = 0) and only A
and B (r * (in + out) numbers per layer) are trained. Targets and kernel layouts
(`rlhf_jax.models.transformer`, layers stacked by nn.scan on axis 0):

    q, k, v   [L, D, heads, head_dim]   input axis 1, output axes 2, 3
    o         [L, heads, head_dim, D]   input axes 1, 2, output axis 3
    gate, up  [L, D, F]                 down  [L, F, D]

The trained tree of a LoRA run is

    {"lora": {<path to module>: {"a": A, "b": B}},   e.g. lora["layers"]["q"]
     "full": {<path>: leaf}}                         leaves trained fully

"full" holds copies of the parameters named in `LoraConfig.trainable` (matched
against every key of a parameter's path: "head" is a reward/value head,
"lm_head" an untied output layer, "embed" the embeddings, "value" a whole PPO
critic); an adapter is never put on a fully trained kernel. Adapters are found
wherever a path ends in ("layers", <target>, "kernel"): the LM itself, a reward
model's "backbone", PPO's "policy" and critic backbone.

This module works in *merged form*: `merge(base, trained)` builds the full
parameters (W + scale * A @ B) and the model runs unchanged, so the loss is a
function of the trained tree with the base a constant argument (gradients
reach A, B and the "full" leaves only). The price is one full-size temporary
per adapted kernel in each step (and a full-size gradient for it in the
backward pass), never an optimizer state: Adam moments exist for A and B only.

Sharding: A carries the logical names of the kernel's input axes, B those of
its output axes, and the rank axis is None (replicated), so adapters are laid
out on the mesh like the weights they adapt (`rlhf_jax.parallel`).

Dropout (`LoraConfig.dropout` = p): LoRA drops the adapter's *input* x before
x @ A. In merged form the adapter sees no activations, so the mask is applied
to the rows of A, i.e. to the input features: A' = A * m / (1 - p) with
m ~ Bernoulli(1 - p) drawn per layer and per input feature once per optimizer
update. This is exactly input dropout on the adapter path with one mask shared
by all tokens of the batch (the original draws one per token), a noisier
regulariser; p = 0 (the default) is plain LoRA.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
# Number of input axes of each target kernel after the leading layers axis.
_IN_AXES = {"q": 1, "k": 1, "v": 1, "o": 2, "gate": 1, "up": 1, "down": 1}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """LoRA hyper-parameters (config.lora); `trainable` includes the trainer's
  always-trained parameters (e.g. a scalar head)."""

  rank: int
  alpha: float = 16.0
  dropout: float = 0.0
  target_modules: tuple[str, ...] = ("q", "k", "v", "o")
  trainable: tuple[str, ...] = ()

  def __post_init__(self):
    object.__setattr__(self, "target_modules", tuple(self.target_modules))
    object.__setattr__(self, "trainable", tuple(self.trainable))
    if int(self.rank) != self.rank or self.rank <= 0:
      raise ValueError(f"config.lora.rank={self.rank}: expected a positive integer "
                       f"(0 turns LoRA off)")
    if not self.alpha > 0:
      raise ValueError(f"config.lora.alpha={self.alpha}: expected > 0 (scale = alpha / rank)")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"config.lora.dropout={self.dropout}: expected 0 <= dropout < 1")
    bad = [t for t in self.target_modules if t not in TARGETS]
    if bad or not self.target_modules:
      raise ValueError(f"config.lora.target_modules={list(self.target_modules)}: expected a "
                       f"non-empty subset of {list(TARGETS)}")

  @property
  def scale(self) -> float:
    return float(self.alpha) / float(self.rank)

  @classmethod
  def from_config(cls, c, always_trainable=()) -> "LoraConfig":
    """From the config.lora ConfigDict (or a dict); `always_trainable` is added to
    `trainable` (a reward model's / value function's scalar head)."""
    get = c.get if hasattr(c, "get") else (lambda k, d=None: getattr(c, k, d))
    trainable = tuple(get("trainable", ()) or ())
    trainable += tuple(t for t in always_trainable if t not in trainable)
    return cls(rank=int(get("rank")), alpha=float(get("alpha", 16.0)),
               dropout=float(get("dropout", 0.0)),
               target_modules=tuple(get("target_modules", ("q", "k", "v", "o"))),
               trainable=trainable)

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d.update(target_modules=list(self.target_modules), trainable=list(self.trainable))
    return d


# ----------------------------------------------------------------------------
# Which parameters get what
# ----------------------------------------------------------------------------

def _flat(tree) -> dict[tuple, Any]:
  return traverse_util.flatten_dict(tree) if tree else {}


def is_fully_trained(path: tuple, cfg: LoraConfig) -> bool:
  """Whether the parameter at `path` (tuple of keys) is trained fully."""
  return any(k in cfg.trainable for k in path)


def adapted_modules(params, cfg: LoraConfig) -> list[tuple]:
  """Paths (without "kernel") of the kernels that get an adapter, in a fixed order."""
  out = []
  for path in _flat(params):
    if (len(path) >= 3 and path[-1] == "kernel" and path[-3] == "layers"
        and path[-2] in cfg.target_modules and not is_fully_trained(path, cfg)):
      out.append(path[:-1])
  return sorted(out)


def _check_selection(params, cfg: LoraConfig):
  flat = _flat(params)
  keys = {k for p in flat for k in p}
  missing = [t for t in cfg.trainable if t not in keys]
  if missing:
    top = sorted({p[0] for p in flat})
    raise ValueError(f"config.lora.trainable={list(cfg.trainable)}: {missing} name no parameter "
                     f"of this model (names are matched against every key of a parameter path; "
                     f"top-level names: {top})")
  found = {p[-1] for p in adapted_modules(params, cfg)}
  absent = [t for t in cfg.target_modules if t not in found]
  if absent:
    raise ValueError(f"config.lora.target_modules: no kernel for {absent} in this model "
                     f"(or only fully trained ones, config.lora.trainable)")


# ----------------------------------------------------------------------------
# Init, merge, unmerge
# ----------------------------------------------------------------------------

def _unbox(x):
  return x.unbox() if isinstance(x, nn.LogicallyPartitioned) else x


def init_lora(params, cfg: LoraConfig, rng) -> dict:
  """Adapters {path: {"a": A, "b": B}} (nested dicts) for `params`.

  A ~ N(0, 1/fan_in) (fan_in = product of the kernel's input axes), B = 0. When the
  kernels are boxed (`nn.LogicallyPartitioned`, e.g. from model.init) the adapters
  are boxed too: A gets the names of the kernel's leading and input axes, B those
  of its output axes, the rank axis None.
  """
  flat = _flat(params)
  modules = adapted_modules(params, cfg)
  kernels = [flat[path + ("kernel",)] for path in modules]
  shapes = [tuple(_unbox(k).shape) for k in kernels]
  sizes = [math.prod(s[:1 + _IN_AXES[p[-1]]]) * cfg.rank for p, s in zip(modules, shapes)]
  # One draw for all A (one random-number kernel to compile), split in module order.
  z = jax.random.normal(rng, (sum(sizes),), jnp.float32) if modules else None
  out, offset = {}, 0
  for path, kernel, shape, size in zip(modules, kernels, shapes, sizes):
    n_in = _IN_AXES[path[-1]]
    lead, ins, outs = shape[:1], shape[1:1 + n_in], shape[1 + n_in:]
    a = z[offset:offset + size].reshape(lead + ins + (cfg.rank,)) / math.sqrt(math.prod(ins))
    offset += size
    b = jnp.zeros(lead + (cfg.rank,) + outs, jnp.float32)
    if isinstance(kernel, nn.LogicallyPartitioned):
      names = tuple(kernel.names)
      a = kernel.replace(value=a, names=names[:1 + n_in] + (None,))
      b = kernel.replace(value=b, names=names[:1] + (None,) + names[1 + n_in:])
    out[path + ("a",)] = a
    out[path + ("b",)] = b
  return traverse_util.unflatten_dict(out) if out else {}


def init_trainable(params, cfg: LoraConfig, rng) -> dict:
  """The trained tree {"lora": init_lora(...), "full": copies of the fully trained
  leaves} of a LoRA run starting from `params` (boxed or plain)."""
  _check_selection(params, cfg)
  full = {p: v for p, v in _flat(params).items() if is_fully_trained(p, cfg)}
  return {"lora": init_lora(params, cfg, rng),
          "full": traverse_util.unflatten_dict(full) if full else {}}


def delta(a, b, scale: float):
  """scale * A @ B as a kernel [L, in..., out...] from A [L, in..., r], B [L, r, out...]
  (float32, full precision on every backend)."""
  L, r = a.shape[0], a.shape[-1]
  ins, outs = a.shape[1:-1], b.shape[2:]
  d = jnp.einsum("lir,lro->lio", a.reshape(L, -1, r).astype(jnp.float32),
                 b.reshape(L, r, -1).astype(jnp.float32),
                 precision=jax.lax.Precision.HIGHEST)
  return (scale * d).reshape((L,) + tuple(ins) + tuple(outs))


def _modules(adapters) -> dict[tuple, dict]:
  """{module path: {"a": A, "b": B}} from the nested adapter tree."""
  mods: dict[tuple, dict] = {}
  for path, v in _flat(adapters).items():
    mods.setdefault(path[:-1], {})[path[-1]] = v
  return mods


@functools.partial(jax.jit, static_argnums=2)
def merge(base, trained, cfg: LoraConfig, rng=None):
  """Full parameters: `base` with the "full" leaves of `trained` swapped in and
  W + (alpha / r) * A @ B on every adapted kernel. `rng` (training only) applies
  `cfg.dropout` to the adapters' input features (module docstring); None = no
  dropout. Pure; jitted (one compiled program, so every caller outside another jit
  -- evaluation, export, load_init -- gets bit-identical merged weights); the result
  has the tree of `base`."""
  flat = dict(_flat(base))
  for path, v in _flat(trained.get("full", {})).items():
    if path not in flat:
      raise ValueError(f"lora.merge: trained leaf {'/'.join(path)} is not a base parameter")
    flat[path] = v
  for i, (path, ab) in enumerate(sorted(_modules(trained.get("lora", {})).items())):
    key = path + ("kernel",)
    if key not in flat:
      raise ValueError(f"lora.merge: adapter {'/'.join(path)} has no base kernel")
    a = ab["a"]
    if rng is not None and cfg.dropout > 0:
      keep = jax.random.bernoulli(jax.random.fold_in(rng, i), 1.0 - cfg.dropout, a.shape[:-1])
      a = a * (keep[..., None] / (1.0 - cfg.dropout)).astype(a.dtype)
    w = flat[key]
    flat[key] = (w + delta(a, ab["b"], cfg.scale)).astype(w.dtype)
  return traverse_util.unflatten_dict(flat)


def unmerge(merged, trained, cfg: LoraConfig):
  """Inverse of `merge` on the adapted kernels: W' - (alpha / r) * A @ B. Equal to the
  base up to float32 rounding; fully trained leaves keep their (trained) values, their
  base values are not recoverable from the merged parameters."""
  flat = dict(_flat(merged))
  for path, ab in _modules(trained.get("lora", {})).items():
    key = path + ("kernel",)
    w = flat[key]
    flat[key] = (w - delta(ab["a"], ab["b"], cfg.scale)).astype(w.dtype)
  return traverse_util.unflatten_dict(flat)


def num_params(tree) -> int:
  """Number of scalars in a (possibly boxed or abstract) parameter tree."""
  return sum(math.prod(getattr(_unbox(x), "shape", ())) for x in jax.tree.leaves(
      tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)))
