"""Sweep definitions: SWEEP.py's `get_sweep(preset)` validated, grids expanded, cells in
dependency order, and the jobs (cell x seed) with their command lines (`plan`).

SWEEP.py defines `get_sweep(preset)` returning a dict: `name`, `seeds` (default seeds of
every cell), `cells` (each: `name`, `config` "FILE.py:PRESET" + `overrides` {key: value}, or
`command` [argv]; optional `seeds`, `depends`), `grid` (each: `base` cell + `axes` {key:
[values]}, one cell per point of the product, named `<base>-<leaf>=<value>,...`) and
`report` (options copied to sweep.json for `rlhf_jax.report`). Override values and command
args may use `{sweep_dir}`, `{workdir}`, `{seed}`, `{python}` and `{cell:NAME}` (NAME's
workdir for this seed, else for NAME's first seed; implies a dependency on NAME).
"""
from __future__ import annotations

import dataclasses
import itertools
import os
import re
import runpy
import sys

TOP_FIELDS = {"name", "seeds", "cells", "grid", "report"}
CELL_FIELDS = {"name", "config", "command", "overrides", "seeds", "depends"}
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.,=+-]*$")
_PLACEHOLDER = re.compile(r"\{(sweep_dir|workdir|seed|python)\}|\{cell:([^{}]*)\}")


class SweepError(Exception):
  """A bad sweep definition or command line; the message names the cell/key/file."""


@dataclasses.dataclass
class Job:
  cell: str
  seed: int
  workdir: str          # absolute
  argv: list
  depends: tuple        # names of the cells whose jobs must be done first

  @property
  def name(self) -> str:
    return f"{self.cell}/seed-{self.seed}"


# ------------------------------------------------------------------ definition

def load_sweep(spec: str) -> dict:
  """`path.py[:preset]` -> the validated sweep with grid cells expanded."""
  path, _, preset = spec.partition(":")
  if not os.path.isfile(path):
    raise SweepError(f"sweep file not found: {path}")
  try:
    module = runpy.run_path(path)
    if "get_sweep" not in module:
      raise SweepError(f"{path} defines no get_sweep()")
    raw = module["get_sweep"](preset) if preset else module["get_sweep"]()
  except SweepError:
    raise
  except Exception as e:  # a bug or a bad preset in the user's sweep file
    raise SweepError(f"{spec}: {type(e).__name__}: {e}") from None
  return _validate(raw, spec)


def _validate(raw, spec: str) -> dict:
  if not isinstance(raw, dict):
    raise SweepError(f"{spec}: get_sweep() must return a dict, got {type(raw).__name__}")
  _no_unknown(raw, TOP_FIELDS, "sweep")
  seeds = _seeds(raw.get("seeds", [0]), "sweep")
  for field, kind in (("cells", list), ("grid", list), ("report", dict)):
    if not isinstance(raw.get(field, kind()), kind):
      raise SweepError(f"sweep: {field} must be a {kind.__name__}")
  cells = list(raw.get("cells", []))
  for i, g in enumerate(raw.get("grid", [])):
    cells.extend(_expand_grid(g, f"grid[{i}]"))
  if not cells:
    raise SweepError(f"{spec}: the sweep has no cells")
  names = set()
  for i, c in enumerate(cells):
    cells[i] = _normalize_cell(c, i, seeds, names)
  known = {c["name"]: c for c in cells}
  for c in cells:
    for d in c["depends"]:
      if d not in known:
        ref = "{cell:%s}" % d
        used = any(ref in s for s in _strings([c["command"] or [], list(c["overrides"].values())]))
        raise SweepError(f"cell {c['name']!r}: unknown cell {d!r} in "
                         + (f"placeholder {ref}" if used else "depends"))
  _check_config_keys(cells)
  return dict(name=str(raw.get("name", os.path.basename(spec))), definition=spec,
              seeds=seeds, cells=_topo_sort(cells), report=dict(raw.get("report", {})))


def _no_unknown(d, fields, where):
  if not isinstance(d, dict):
    raise SweepError(f"{where}: expected a dict, got {d!r}")
  unknown = sorted(set(d) - fields)
  if unknown:
    raise SweepError(f"{where}: unknown field {unknown[0]!r} (expected {sorted(fields)})")


def _seeds(seeds, where):
  if (not isinstance(seeds, (list, tuple)) or not seeds or len(set(seeds)) != len(seeds)
      or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
    raise SweepError(f"{where}: seeds must be a non-empty list of distinct ints, got {seeds!r}")
  return list(seeds)


def _name_value(v) -> str:
  """A grid value as it appears in a cell name (filesystem-safe)."""
  return re.sub(r"[^\w.+-]+", "_", str(v)).strip("_") or "_"


def _expand_grid(g, where) -> list:
  """One cell per point of the product of g["axes"], overrides merged over the base's."""
  _no_unknown(g, {"base", "axes"}, where)
  base, axes = g.get("base"), g.get("axes")
  _no_unknown(base, CELL_FIELDS, f"{where}.base")
  if not isinstance(base.get("name"), str):
    raise SweepError(f"{where}.base: needs a name")
  if not isinstance(axes, dict) or not axes or not all(
      isinstance(v, (list, tuple)) and v for v in axes.values()):
    raise SweepError(f"{where} ({base.get('name')!r}): axes must map keys to non-empty lists")
  cells = []
  for point in itertools.product(*axes.values()):
    tag = ",".join(f"{k.rpartition('.')[2]}={_name_value(v)}" for k, v in zip(axes, point))
    overrides = {**base.get("overrides", {}), **dict(zip(axes, point))}
    cells.append({**base, "name": f"{base.get('name')}-{tag}", "overrides": overrides})
  return cells


def _normalize_cell(c, i, seeds, names) -> dict:
  """Check one cell's fields; fill defaults; add the dependencies implied by {cell:X}."""
  name = c.get("name") if isinstance(c, dict) else None
  where = f"cell {name!r}" if isinstance(name, str) else f"cells[{i}]"
  _no_unknown(c, CELL_FIELDS, where)
  if not isinstance(name, str) or not _SAFE_NAME.match(name):
    raise SweepError(f"{where}: name {name!r} must be a filesystem-safe string "
                     f"(letters, digits, _ . , = + -)")
  if name in names:
    raise SweepError(f"duplicate cell name {name!r}")
  names.add(name)
  if ("config" in c) == ("command" in c):
    raise SweepError(f"{where}: needs exactly one of 'config' or 'command'")
  if "command" in c:
    cmd = c["command"]
    if not isinstance(cmd, (list, tuple)) or not cmd or not all(isinstance(a, str) for a in cmd):
      raise SweepError(f"{where}: command must be a non-empty list of strings")
    if c.get("overrides"):
      raise SweepError(f"{where}: overrides are for config cells; put args in the command")
  elif not isinstance(c["config"], str):
    raise SweepError(f"{where}: config must be 'FILE.py[:preset]', got {c['config']!r}")
  overrides = c.get("overrides", {})
  if not isinstance(overrides, dict) or not all(isinstance(k, str) for k in overrides):
    raise SweepError(f"{where}: overrides must be a dict of 'dotted.key': value")
  if "seed" in overrides:
    raise SweepError(f"{where}: do not override 'seed'; use the cell's seeds list")
  depends = c.get("depends", [])
  if not isinstance(depends, (list, tuple)) or not all(isinstance(d, str) for d in depends):
    raise SweepError(f"{where}: depends must be a list of cell names")
  refs = [m.group(2) for s in _strings([c.get("command", []), list(overrides.values())])
          for m in _PLACEHOLDER.finditer(s) if m.group(2) is not None]
  return dict(name=name, config=c.get("config"), command=list(c.get("command", [])) or None,
              overrides=dict(overrides), seeds=_seeds(c.get("seeds", seeds), where),
              depends=list(dict.fromkeys([*depends, *refs])))


def _strings(x):
  """Every str inside nested lists/tuples."""
  if isinstance(x, str):
    yield x
  elif isinstance(x, (list, tuple)):
    for y in x:
      yield from _strings(y)


def _topo_sort(cells) -> list:
  """Cells in dependency order (definition order otherwise); a cycle is an error."""
  by_name, out, state = {c["name"]: c for c in cells}, [], {}

  def visit(name, path):
    if state.get(name) == "done":
      return
    if state.get(name) == "visiting":
      cycle = path[path.index(name):] + [name]
      raise SweepError(f"dependency cycle: {' -> '.join(cycle)}")
    state[name] = "visiting"
    for d in by_name[name]["depends"]:
      visit(d, path + [name])
    state[name] = "done"
    out.append(by_name[name])

  for c in cells:
    visit(c["name"], [])
  return out


def _check_config_keys(cells):
  """Load each config once; every override key must exist (did-you-mean error otherwise)."""
  if all(c["config"] is None for c in cells):
    return  # command cells only: no need to import the library (and jax)
  from rlhf_jax import config as config_lib
  from rlhf_jax import config_keys
  loaded = {}
  for c in cells:
    if c["config"] is None:
      continue
    spec = c["config"]
    if spec not in loaded:
      if not os.path.isfile(spec.partition(":")[0]):
        raise SweepError(f"cell {c['name']!r}: config file not found: {spec.partition(':')[0]}")
      try:
        loaded[spec] = config_keys.load_config(spec)
      except Exception as e:
        raise SweepError(f"cell {c['name']!r}: cannot load config {spec} ({e})") from None
    for key in c["overrides"]:
      try:
        config_keys.check_key(loaded[spec], key)
      except config_lib.ConfigError as e:
        raise SweepError(f"cell {c['name']!r}: {e}") from None


# ------------------------------------------------------------------ planning

def _flag_value(v) -> str:
  """A Python value as a --config.KEY=VALUE string."""
  if isinstance(v, (bool, str)):
    return str(v)
  if isinstance(v, (list, tuple)):
    items = [repr(x) if isinstance(x, str) else _flag_value(x) for x in v]
    return f"({items[0]},)" if len(items) == 1 else f"({', '.join(items)})"
  return repr(v)


def _substitute(value, ctx):
  """Replace the exact placeholders in str values (recursing into lists); others untouched."""
  if isinstance(value, (list, tuple)):
    return type(value)(_substitute(v, ctx) for v in value)
  if not isinstance(value, str):
    return value
  return _PLACEHOLDER.sub(lambda m: ctx[m.group(1)] if m.group(1) else ctx["cell"](m.group(2)),
                          value)


def plan(sweep: dict, sweep_dir: str) -> list:
  """The jobs of every cell x seed, in dependency order."""
  sweep_dir = os.path.abspath(sweep_dir)
  seeds_of = {c["name"]: c["seeds"] for c in sweep["cells"]}

  def wd(cell, seed):
    return os.path.join(sweep_dir, cell, f"seed-{seed}")

  jobs = []
  for c in sweep["cells"]:
    for seed in c["seeds"]:
      ctx = dict(sweep_dir=sweep_dir, workdir=wd(c["name"], seed), seed=str(seed),
                 python=sys.executable,
                 cell=lambda n, s=seed: wd(n, s if s in seeds_of[n] else seeds_of[n][0]))
      if c["command"]:
        argv = _substitute(c["command"], ctx)
      else:
        argv = [sys.executable, "-m", "rlhf_jax.launch", "train", f"--config={c['config']}",
                f"--workdir={ctx['workdir']}", f"--config.seed={seed}"] + [
                    f"--config.{k}={_flag_value(_substitute(v, ctx))}"
                    for k, v in c["overrides"].items()]
      jobs.append(Job(c["name"], seed, ctx["workdir"], list(argv), tuple(c["depends"])))
  return jobs
