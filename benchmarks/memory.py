"""Peak memory of the SFT train step under each memory option, measured by XLA.

    .venv/bin/python benchmarks/memory.py --out=docs/memory_table.md [--models=tiny,small]
    .venv/bin/python benchmarks/memory.py --formula   # analytic tables for the real sizes

For every option the real SFT step (`rlhf_jax.trainers.sft.make_train_step`:
forward, backward, gradient accumulation, AdamW with clipping; LoRA through
`common.create_train_state`) is jitted with the trainer's shardings and state
donation, lowered for the shapes of one batch and compiled; nothing runs.
`compiled.memory_analysis()` gives, per device:

    args   the step's inputs: train state (params, AdamW mu/nu, step), frozen base
           (LoRA), batch
    temp   XLA's scratch buffers: activations kept for the backward pass, gradients,
           logits, the optimizer update's temporaries
    peak   args + out - alias + temp: everything live at once. The new state is
           donated (written over the old one: alias), so out - alias is the metrics.

`estimate` is `rlhf_jax.memory.train_step_bytes` for the same step (argument bytes
+ the formula's activations, gradients, logits; see docs/memory.md).

The process simulates 8 CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8,
set here before JAX starts) for the data-parallel and FSDP rows; single-device rows
use one of them. Prints a markdown table and writes it to --out.
"""
from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from rlhf_jax import config as config_lib  # noqa: E402
from rlhf_jax import memory, parallel  # noqa: E402
from rlhf_jax.models import ModelConfig, Transformer  # noqa: E402
from rlhf_jax.trainers import common, sft  # noqa: E402

# The tiny preset (configs/sft.py:tiny: its 48-token vocabulary, batch 32 x 32 tokens)
# and a larger model where activations dominate the state.
MODELS = {
    "tiny": (ModelConfig(vocab_size=48, d_model=96, n_layers=4, n_heads=6, n_kv_heads=2,
                         head_dim=16, d_ff=256, max_seq_len=64), 32, 32),
    "small": (ModelConfig(vocab_size=2048, d_model=256, n_layers=8, n_heads=8, n_kv_heads=4,
                          head_dim=32, d_ff=768, max_seq_len=256), 16, 256),
}


@dataclasses.dataclass
class Option:
  name: str
  dtype: str = "float32"
  remat: str = "none"
  accum: int = 1
  mesh: tuple = (1, 1, 1)
  lora_rank: int = 0


OPTIONS = [
    Option("baseline: float32, no remat"),
    Option("bfloat16 compute", dtype="bfloat16"),
    Option("remat full", remat="full"),
    Option("remat dots", remat="dots"),
    Option("remat dots_no_batch", remat="dots_no_batch"),
    Option("remat qkv_proj", remat="qkv_proj"),
    Option("grad_accum_steps 2", accum=2),
    Option("grad_accum_steps 4", accum=4),
    Option("bf16 + remat full + accum 4", dtype="bfloat16", remat="full", accum=4),
    Option("8 devices, data parallel (8,1,1)", mesh=(8, 1, 1)),
    Option("8 devices, FSDP (1,8,1)", mesh=(1, 8, 1)),
    Option("FSDP (1,8,1) + remat full", remat="full", mesh=(1, 8, 1)),
    Option("LoRA rank 8 (q,k,v,o)", lora_rank=8),
]


def measure(model_cfg: ModelConfig, rows: int, seq: int, opt: Option) -> dict:
  cfg = dataclasses.replace(model_cfg, dtype=opt.dtype, remat_policy=opt.remat)
  model = Transformer(cfg)
  config = config_lib.base_config("sft")
  config.lora.rank = opt.lora_rank
  tx, _ = common.make_optimizer(config.optimizer, 100)
  devices = jax.devices()[:int(np.prod(opt.mesh))]
  mesh = parallel.make_mesh(opt.mesh, devices)
  dummy = jnp.zeros((1, 2), jnp.int32)
  with contextlib.redirect_stdout(sys.stderr):  # its "parameters: ..." line
    state, shardings, frozen = common.create_train_state(
        lambda r: model.init(r, dummy)["params"], tx, mesh, jax.random.PRNGKey(0),
        config=config if opt.lora_rank else None)
  bs = parallel.batch_sharding(mesh)
  batch = {k: jax.ShapeDtypeStruct((rows, seq), jnp.int32, sharding=bs)
           for k in ("tokens", "segment_ids", "loss_mask")}
  step = jax.jit(sft.make_train_step(model, tx, opt.accum, frozen),
                 in_shardings=(shardings, *frozen.in_shardings, bs),
                 out_shardings=(shardings, parallel.replicated(mesh)), donate_argnums=0)
  t = time.perf_counter()
  ma = step.lower(state, *frozen.args, batch).compile().memory_analysis()
  compile_s = time.perf_counter() - t
  peak = (ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes
          + ma.temp_size_in_bytes)
  est = None
  if not opt.lora_rank:
    e = memory.train_step_bytes(cfg, rows=rows // opt.accum, seq_len=seq, mesh=opt.mesh,
                                grad_accum=opt.accum)
    est = e["total"] + rows * seq * 3 * 4 / (opt.mesh[0] * opt.mesh[1])  # + the batch
  return {"args": ma.argument_size_in_bytes, "temp": ma.temp_size_in_bytes, "peak": peak,
          "estimate": est, "compile_s": compile_s}


def formula_tables() -> str:
  """The analytic tables of docs/memory.md for the real sizes (no compilation)."""
  from rlhf_jax import presets
  from rlhf_jax.launch import load_config
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  gb = lambda x: f"{x / 1e9:.2f}"
  out = ["Static training state (float32 params, grads, AdamW mu + nu = 16 bytes/param), GB:",
         "", "| size | params | 16N total | / 8 devices (FSDP) | / 16 devices (FSDP) |",
         "|---|---:|---:|---:|---:|"]
  models = {}
  for size in presets.SIZES:
    c = load_config(f"{repo}/configs/sft.py:{size}")
    m = config_lib.model_config(c)
    models[size] = (c, m)
    n = memory.num_params(m)
    out.append(f"| {size} | {n / 1e9:.3f}B | {gb(16 * n)} | {gb(2 * n)} | {gb(n)} |")
  out += ["", "Activations kept for the backward pass, bfloat16 compute, one 2048-token "
          "sequence, all layers (GB), and the float32 logits buffers (12 V bytes/token):",
          "", "| size | none | dots | dots_no_batch | qkv_proj | full | full: + working layer "
          "| logits |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
  for size, (c, m) in models.items():
    per = {p: 2048 * m.n_layers * memory.saved_bytes_per_token_layer(m, p, 2048)
           for p in ("none", "dots", "dots_no_batch", "qkv_proj", "full")}
    working = 2048 * memory.saved_bytes_per_token_layer(m, "none", 2048)
    out.append(f"| {size} | " + " | ".join(gb(v) for v in per.values())
               + f" | {gb(per['full'] + working)} | {gb(2048 * 12 * m.vocab_size)} |")
  out += ["", "Each size's SFT preset (`configs/sft.py:SIZE`: batch 64 x 2048 tokens, its "
          "grad_accum_steps, remat full, bf16) on each hardware with that hardware's mesh, "
          "estimated GB per device (budget = 80% of HBM):", "",
          "| size | " + " | ".join(f"{h} ({memory.HARDWARE[h].hbm_bytes / 2**30:.0f} GiB)"
                                   for h in memory.HARDWARE) + " |",
          "|---|" + "---:|" * len(memory.HARDWARE)]
  for size, (c, m) in models.items():
    cells = []
    for h in memory.HARDWARE:
      c2 = load_config(f"{repo}/configs/sft.py:{size}")
      c2.mesh.shape = presets.mesh_for(size, h)
      ok, est, _ = memory.fits(c2, h)
      cells.append(f"{gb(est)} {'fits' if ok else '**no**'} {tuple(c2.mesh.shape)}")
    out.append(f"| {size} | " + " | ".join(cells) + " |")
  return "\n".join(out)


def mb(x):
  return "—" if x is None else f"{x / 2**20:.2f}"


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", default="", help="write the markdown table here too")
  p.add_argument("--models", default="tiny,small")
  p.add_argument("--formula", action="store_true",
                 help="print the analytic tables for the real model sizes instead (fast)")
  a = p.parse_args(argv)
  if a.formula:
    print(formula_tables())
    return
  if jax.device_count() < 8:
    sys.exit("needs 8 (simulated) devices: run it in a fresh process "
             "(XLA_FLAGS=--xla_force_host_platform_device_count=8)")
  lines = [f"SFT train step, per device, MiB. {datetime.date.today()}, "
           f"{platform.machine()} CPU x {os.cpu_count()} cores, JAX {jax.__version__}, "
           f"XLA CPU backend.", ""]
  for name in a.models.split(","):
    cfg, rows, seq = MODELS[name]
    n = memory.num_params(cfg)
    lines += [f"**{name}**: {cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads}/"
              f"{cfg.n_kv_heads} heads, d_ff {cfg.d_ff}, vocab {cfg.vocab_size} "
              f"({n / 1e6:.2f}M params); batch {rows} x {seq} tokens", "",
              "| option | args | temp | peak | peak / baseline | estimate |",
              "|---|---:|---:|---:|---:|---:|"]
    base = None
    for opt in OPTIONS:
      r = measure(cfg, rows, seq, opt)
      base = base or r["peak"]
      lines.append(f"| {opt.name} | {mb(r['args'])} | {mb(r['temp'])} | {mb(r['peak'])} | "
                   f"{r['peak'] / base:.2f} | {mb(r['estimate'])} |")
      print(lines[-1], f"(compiled in {r['compile_s']:.1f}s)", file=sys.stderr, flush=True)
    lines.append("")
  text = "\n".join(lines)
  print(text)
  if a.out:
    with open(a.out, "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  main()
