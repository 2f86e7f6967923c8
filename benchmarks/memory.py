"""Peak memory of the SFT train step under each memory option, measured by XLA.

    .venv/bin/python benchmarks/memory.py --out=docs/memory_table.md [--models=tiny,small]
    .venv/bin/python benchmarks/memory.py --formula   # analytic tables for the real sizes
    .venv/bin/python benchmarks/memory.py --aot --jsonl=/tmp/aot.jsonl   # real sizes, compiled
    .venv/bin/python benchmarks/memory.py --aot-table=/tmp/aot.jsonl     # its markdown tables

For every option the real SFT step (`rlhf_jax.trainers.sft.make_train_step`:
forward, backward, gradient accumulation, AdamW with clipping; LoRA through
`state_lib.create_train_state`) is jitted with the trainer's shardings and state
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

`--aot` compiles the real steps at real sizes from abstract inputs
(`rlhf_jax.memory_aot`: nothing is allocated): the SFT, DPO and GRPO-update steps
and the sampler of the llama3_2_1b, qwen2_5_1_5b, llama3_8b, gemma3_1b and gemma2_2b
shapes (the Gemmas with their sliding windows and soft-caps) at 2k / 8k / 32k
tokens per device on one device, dense vs chunked attention, log-probs whole or
chunked (model.logits_chunk), and the `configs/grpo.py:gsm8k` preset at
rollout.max_new_tokens=4096 on 8 devices (v5e-8's mesh). Each measured row is appended
to --jsonl as it comes (a rerun skips rows already there); `--aot-table` turns the file
into the markdown tables of docs/memory.md, with `rlhf_jax.memory`'s estimate next to
every row.
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
from rlhf_jax import memory, memory_plan, parallel  # noqa: E402
from rlhf_jax.models import ModelConfig, Transformer  # noqa: E402
from rlhf_jax.trainers import optim, sft
from rlhf_jax.trainers import state as state_lib  # noqa: E402

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
  tx, _ = optim.make_optimizer(config.optimizer, 100)
  devices = jax.devices()[:int(np.prod(opt.mesh))]
  mesh = parallel.make_mesh(opt.mesh, devices)
  dummy = jnp.zeros((1, 2), jnp.int32)
  with contextlib.redirect_stdout(sys.stderr):  # its "parameters: ..." line
    state, shardings, frozen = state_lib.create_train_state(
        lambda r: model.init(r, dummy)["params"], tx, mesh, jax.random.PRNGKey(0),
        config=config if opt.lora_rank else None)
  bs = parallel.batch_sharding(mesh)
  batch = {k: jax.ShapeDtypeStruct((rows, seq), jnp.int32, sharding=bs)
           for k in ("tokens", "segment_ids", "loss_mask")}
  step = state_lib.jit_step(sft.make_train_step(model, tx, opt.accum, frozen), shardings, bs,
                            metrics_sharding=parallel.replicated(mesh), donate=True)
  t = time.perf_counter()
  ma = step.lower(state, batch).compile().memory_analysis()
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
  out += ["", "Activations kept for the backward pass, bfloat16 compute, dense attention, "
          "one 2048-token sequence, all layers (GB); the working layer with dense and with "
          "chunked attention; the float32 logits buffers (8 V bytes/token; "
          "model.logits_chunk = 512: 512 tokens' worth):",
          "", "| size | none | dots | dots_no_batch | qkv_proj | full | full: + working layer "
          "| + working, chunked | logits | logits, chunk 512 |",
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for size, (c, m) in models.items():
    per = {p: 2048 * m.n_layers * memory.saved_bytes_per_token_layer(m, p, 2048,
                                                                     attention="dense")
           for p in ("none", "dots", "dots_no_batch", "qkv_proj", "full")}
    working = {a: memory.train_step_bytes(m, rows=1, seq_len=2048, attention=a)["activations"]
               - per["full"] for a in ("dense", "chunked")}
    lc = dataclasses.replace(m, logits_chunk=512)
    out.append(f"| {size} | " + " | ".join(gb(v) for v in per.values())
               + f" | {gb(per['full'] + working['dense'])} | "
               f"{gb(per['full'] + working['chunked'])} | {gb(memory.logits_bytes(m, 1, 2048))} | "
               f"{gb(memory.logits_bytes(lc, 1, 2048))} |")
  out += ["", "Each size's SFT preset (`configs/sft.py:SIZE`: batch 64 x 2048 tokens, its "
          "grad_accum_steps, remat full, bf16) on each hardware with that hardware's mesh, "
          "estimated GB per device (budget = 80% of HBM):", "",
          "| size | " + " | ".join(f"{h} ({memory_plan.HARDWARE[h].hbm_bytes / 2**30:.0f} GiB)"
                                   for h in memory_plan.HARDWARE) + " |",
          "|---|" + "---:|" * len(memory_plan.HARDWARE)]
  for size, (c, m) in models.items():
    cells = []
    for h in memory_plan.HARDWARE:
      c2 = load_config(f"{repo}/configs/sft.py:{size}")
      c2.mesh.shape = presets.mesh_for(size, h)
      ok, est, _ = memory_plan.fits(c2, h)
      cells.append(f"{gb(est)} {'fits' if ok else '**no**'} {tuple(c2.mesh.shape)}")
    out.append(f"| {size} | " + " | ".join(cells) + " |")
  import runpy
  trainers = ("sft", "dpo", "rm", "grpo", "ppo")
  out += ["", "Every sized preset on its planned hardware and mesh: estimated peak per device "
          "(largest phase; GRPO/PPO include the sampler and the log-prob passes), GB:", "",
          "| preset | " + " | ".join(trainers) + " |", "|---|" + "---|" * len(trainers)]
  for size in presets.SIZES:
    cells = []
    for name in trainers:
      hw = runpy.run_path(f"{repo}/configs/{name}.py")["SIZES"][size]["hardware"]
      ok, est, _ = memory_plan.fits(load_config(f"{repo}/configs/{name}.py:{size}"), hw)
      cells.append(f"{hw} {presets.mesh_for(size, hw)}: {est / 1e9:.1f} GB"
                   f"{'' if ok else ' **no**'}")
    out.append(f"| `{size}` | " + " | ".join(cells) + " |")
  return "\n".join(out)


# ----------------------------------------------------------------------------
# --aot: the real steps at real sizes, compiled from abstract inputs
# ----------------------------------------------------------------------------

AOT_SIZES = ("llama3_2_1b", "qwen2_5_1_5b", "llama3_8b", "gemma3_1b", "gemma2_2b")
AOT_TOKENS = (2048, 8192, 32768)
PROMPT = 256          # prompt tokens of the DPO / GRPO / sampler rows
GiB = 2 ** 30


def attention_has_hoist_fix() -> bool:
  import inspect
  from rlhf_jax.models import attention_chunked
  return "optimization_barrier" in inspect.getsource(attention_chunked)


@contextlib.contextmanager
def hoist_fix(on: bool):
  """The proposed fix of models/attention_chunked.py (the chunked backend) under the layer scan
  (docs/memory.md): tie the mask arrays to q with an optimization barrier, so that JAX's
  scan partial evaluation cannot hoist the mask-only parts of the block loops out of the
  layer scan (it stacks them over all n x m block pairs: O(T S) memory again)."""
  from rlhf_jax.models import attention_chunked
  if not on or attention_has_hoist_fix():
    yield
    return
  orig = attention_chunked._prepare

  def prepare(q, k, v, qseg, qidx, kvseg, kvidx, *rest):
    q, qseg, qidx, kvseg, kvidx = jax.lax.optimization_barrier((q, qseg, qidx, kvseg, kvidx))
    return orig(q, k, v, qseg, qidx, kvseg, kvidx, *rest)
  attention_chunked._prepare = prepare
  try:
    yield
  finally:
    attention_chunked._prepare = orig


def gsm8k_config(max_new_tokens: int = 4096):
  """configs/grpo.py:gsm8k with rollout.max_new_tokens (model.max_seq_len raised to fit)."""
  from rlhf_jax.launch import load_config
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  c = load_config(f"{repo}/configs/grpo.py:gsm8k")
  c.rollout.max_new_tokens = max_new_tokens
  c.model.max_seq_len = max(c.model.max_seq_len, c.data.max_prompt_len + max_new_tokens)
  return c


def aot_grid(chunk: int, fix: bool) -> list[dict]:
  """The rows to compile: the full SFT grid for llama3_2_1b; for the other shapes and
  steps the dense-vs-chunked contrast at 8k and 32k; the sampler at every length; the
  gsm8k preset on 8 devices. Log-probs whole (0) and chunked (`chunk`; the gsm8k rows:
  the preset's model.logits_chunk) once the trainers read model.logits_chunk."""
  from rlhf_jax.memory_aot import logits_chunk_supported
  lcs = (0, chunk) if logits_chunk_supported() else (0,)
  lc_long = lcs[-1]  # "with chunked log-probs" where there is no room for both
  rows = []
  add = lambda **kw: rows.append({"mesh": (1, 1, 1), "fix": fix, **kw})
  for T in (256,) + AOT_TOKENS:
    for att in ("dense", "chunked"):
      for lc in lcs:
        add(kind="sft", size="llama3_2_1b", tokens=T, attention=att, logits_chunk=lc)
  if fix and not attention_has_hoist_fix():  # the code as it is on main, for the record
    for T in (8192, 32768):
      rows.append({"mesh": (1, 1, 1), "fix": False, "kind": "sft", "size": "llama3_2_1b",
                   "tokens": T, "attention": "chunked", "logits_chunk": lc_long})
  for kind in ("sft", "dpo", "grpo"):
    for size in AOT_SIZES:
      if kind == "sft" and size == "llama3_2_1b":
        continue
      for T in (8192, 32768):
        for att in ("dense", "chunked"):
          add(kind=kind, size=size, tokens=T, attention=att, logits_chunk=lc_long)
  for size in AOT_SIZES:
    for T in AOT_TOKENS:
      add(kind="sample", size=size, tokens=T, attention="chunked", logits_chunk=0)
    add(kind="sample", size=size, tokens=AOT_TOKENS[-1], attention="dense", logits_chunk=0)
  c = gsm8k_config()
  r = c.rollout
  for lc in sorted({0, c.model.logits_chunk} if len(lcs) > 1 else {0}):  # the preset's
    for kind in ("grpo", "logp", "sample"):
      add(kind=kind, size="gsm8k@4096", tokens=c.data.max_prompt_len + r.max_new_tokens,
          attention="chunked", logits_chunk=0 if kind == "sample" else lc, mesh=(1, 8, 1))
      if kind == "sample" and lc:
        rows.pop()  # the sampler does not read logits_chunk
  return rows


def row_key(row: dict) -> str:
  return "|".join(str(tuple(row[k]) if k == "mesh" else row[k])
                  for k in ("kind", "size", "tokens", "attention", "logits_chunk", "fix", "mesh"))


def aot_model(row: dict) -> ModelConfig:
  from rlhf_jax import memory_aot
  size = "llama3_2_1b" if row["size"].startswith("gsm8k") else row["size"]
  return memory_aot.preset_model(size, max_seq_len=row["tokens"], attention=row["attention"],
                                 logits_chunk=row["logits_chunk"])


def aot_measure(row: dict) -> dict:
  from rlhf_jax import memory_aot as A
  m, T, mesh = aot_model(row), row["tokens"], tuple(row["mesh"])
  with hoist_fix(row["fix"]), contextlib.redirect_stdout(sys.stderr):
    if row["size"].startswith("gsm8k"):
      c = gsm8k_config(T - PROMPT)
      r, P, N = c.rollout, c.data.max_prompt_len, T - c.data.max_prompt_len
      B = r.prompts_per_step * r.group_size // c.grpo.minibatches
      if row["kind"] == "grpo":
        res = A.grpo_update(m, B, P, N, mesh, c.grpo, r.train_micro_batch, r.group_size)
      elif row["kind"] == "logp":
        res = A.logprob_pass(m, r.logprob_micro_batch, P, N, mesh, r.group_size)
      else:
        from rlhf_jax.rollout import generate_group_size
        G = generate_group_size(r.group_size, r.generate_micro_batch,
                                r.prompts_per_step * r.group_size)
        res = A.sampler(m, r.generate_micro_batch, P, N, mesh, group_size=G)
    elif row["kind"] == "sft":
      res = A.sft_step(m, 1, T, mesh)
    elif row["kind"] == "dpo":
      res = A.dpo_step(m, 1, PROMPT, T // 2 - PROMPT, mesh)
    elif row["kind"] == "grpo":
      res = A.grpo_update(m, 1, PROMPT, T - PROMPT, mesh)
    elif row["kind"] == "sample":
      res = A.sampler(m, 1, PROMPT, T - PROMPT, mesh)
    else:
      raise ValueError(row["kind"])
  return res.as_dict()


def run_aot(path: str, chunk: int, fix: bool, only: str = "") -> None:
  import json
  done = set()
  if os.path.exists(path):
    with open(path) as f:
      done = {row_key(json.loads(line)) for line in f if line.strip()}
  grid = [r for r in aot_grid(chunk, fix) if row_key(r) not in done
          and (not only or r["kind"] in only.split(",") or r["size"] in only.split(","))]
  print(f"{len(grid)} compiles to go ({len(done)} rows already in {path})", file=sys.stderr,
        flush=True)
  t0 = time.perf_counter()
  for i, row in enumerate(grid):
    try:
      row = {**row, **aot_measure(row)}
    except Exception as e:  # noqa: BLE001 -- record it and go on with the grid
      row = {**row, "error": f"{type(e).__name__}: {str(e)[:300]}"}
    row.update(date=str(datetime.date.today()), jax=jax.__version__)
    with open(path, "a") as f:
      f.write(json.dumps(row) + "\n")
    msg = row.get("error") or " ".join(f"{k} {row[k] / GiB:.2f}" for k in
                                       ("args", "out", "alias", "temp", "peak"))
    print(f"[{i + 1}/{len(grid)} {time.perf_counter() - t0:.0f}s] {row_key(row)}: {msg} GiB "
          f"({row.get('compile_s', 0):.0f}s)", file=sys.stderr, flush=True)


def aot_estimate(row: dict) -> float:
  """rlhf_jax.memory's bytes for the row's step (+ its batch, as XLA counts it)."""
  m, T, mesh = aot_model(row), row["tokens"], tuple(row["mesh"])
  if row["size"].startswith("gsm8k"):
    # the config's phase, less what the trainer holds that the compiled function does not
    # take (the reference policy; the AdamW state outside the update), + its batch
    c = gsm8k_config(T - PROMPT)
    c.model.update(attention=row["attention"], logits_chunk=row["logits_chunk"])
    e = memory_plan.config_estimate(c, mesh[0] * mesh[1] * mesh[2], platform="cpu")
    r, n, W = c.rollout, mesh[0] * mesh[1], T - PROMPT
    if row["kind"] == "grpo":
      B = r.prompts_per_step * r.group_size // c.grpo.minibatches
      return e["train_step"] - e["extra_params"] + B * (8 * T + 16 * W) / n
    held = e["adam"] + e["extra_params"]
    if row["kind"] == "logp":
      return e["logprob_pass"] - held + r.logprob_micro_batch * 8 * T / n
    return e["generate"] - held + r.generate_micro_batch * 8 * PROMPT / n
  if row["kind"] == "sft":
    return memory.train_step_bytes(m, rows=1, seq_len=T, platform="cpu")["total"] + 12 * T
  if row["kind"] == "dpo":
    from rlhf_jax.models.api import prefix_sharing_saves_flops
    W = T // 2 - PROMPT
    kw = (dict(mask_kind="shared_prefix", logit_tokens=2 * W)
          if prefix_sharing_saves_flops(m, PROMPT, W, 2) else {})
    return memory.train_step_bytes(m, rows=2, seq_len=T // 2, platform="cpu",
                                   **kw)["total"] + 12 * T
  if row["kind"] == "grpo":
    W = T - PROMPT
    e = memory.train_step_bytes(m, rows=1, seq_len=T, logit_tokens=W, donated=True,
                                platform="cpu")
    return e["total"] + 8 * T + 16 * W
  if row["kind"] == "sample":
    return 4 * memory.num_params(m) + memory.generation_phase_bytes(
        m, rows=1, prompt_len=PROMPT, length=T, platform="cpu")["total"]
  raise ValueError(row["kind"])


def aot_tables(path: str) -> str:
  import json
  with open(path) as f:
    rows = list({row_key(r): r for r in map(json.loads, filter(str.strip, f))}.values())
  g = lambda x: f"{x / GiB:.2f}"
  names = {"sft": "SFT step", "dpo": "DPO step", "grpo": "GRPO update", "sample": "sampler",
           "logp": "log-prob pass"}
  meta = rows[0] if rows else {}
  out = [f"Per device, GiB. {meta.get('date', '?')}, {platform.machine()} CPU x "
         f"{os.cpu_count()} cores, JAX {meta.get('jax', jax.__version__)}, XLA CPU backend; "
         f"compiled from abstract inputs (nothing allocated).", "",
         "| step | shape | tokens/device | attention | logits_chunk | args | out − alias | "
         "temp | peak | estimate | est / peak |",
         "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
  order = {"sft": 0, "dpo": 1, "grpo": 2, "logp": 3, "sample": 4}
  rows.sort(key=lambda r: (r["size"].startswith("gsm8k"), order[r["kind"]],
                           AOT_SIZES.index(r["size"]) if r["size"] in AOT_SIZES else 0,
                           r["tokens"], r["attention"], r["logits_chunk"], not r["fix"]))
  for r in rows:
    att = r["attention"] + ("" if r["fix"] or r["attention"] == "dense" else " (main, unfixed)")
    shape = r["size"] + (f" {tuple(r['mesh'])}" if tuple(r["mesh"]) != (1, 1, 1) else "")
    head = (f"| {names[r['kind']]} | {shape} | {r['tokens']:,} | {att} | "
            f"{r['logits_chunk'] or 'off'} |")
    if "error" in r:
      out.append(head + f" {r['error'][:80]} | | | | | |")
      continue
    try:
      est = aot_estimate(r)
      est_s, ratio = g(est), f"{est / r['peak']:.2f}"
    except Exception as e:  # noqa: BLE001
      est_s, ratio = f"({type(e).__name__})", "—"
    out.append(head + f" {g(r['args'])} | {g(r['out'] - r['alias'])} | {g(r['temp'])} | "
               f"{g(r['peak'])} | {est_s} | {ratio} |")
  return "\n".join(out)


def mb(x):
  return "—" if x is None else f"{x / 2**20:.2f}"


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", default="", help="write the markdown table here too")
  p.add_argument("--models", default="tiny,small")
  p.add_argument("--formula", action="store_true",
                 help="print the analytic tables for the real model sizes instead (fast)")
  p.add_argument("--aot", action="store_true",
                 help="compile the real steps at real sizes (rows appended to --jsonl)")
  p.add_argument("--jsonl", default="aot_memory.jsonl", help="--aot results, one row a line")
  p.add_argument("--only", default="", help="--aot: only these kinds/shapes (comma list)")
  p.add_argument("--logits-chunk", type=int, default=1024,
                 help="--aot: model.logits_chunk of the chunked log-prob rows")
  p.add_argument("--fix-chunked-hoist", action="store_true",
                 help="--aot: measure chunked attention with the proposed attention.py fix "
                      "(hoist_fix) unless main has it")
  p.add_argument("--aot-table", default="", help="print the markdown tables of an --aot file")
  a = p.parse_args(argv)
  if a.aot:
    run_aot(a.jsonl, a.logits_chunk, a.fix_chunked_hoist, a.only)
    print(aot_tables(a.jsonl))
    return
  if a.aot_table:
    print(aot_tables(a.aot_table))
    return
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
