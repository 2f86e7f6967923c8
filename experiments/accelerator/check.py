"""The accelerator check: attention parity, SFT MFU and decode vs the HBM roofline, one table.

    bash experiments/accelerator/check.sh             # a GPU machine: installs, runs, <= 8 min
    bash experiments/accelerator/check.sh --dry_run   # CPU, tiny shapes, every section (~40 s)
    python experiments/accelerator/check.py [--dry_run] [--sections=device,parity,sft_mfu,decode]
        [--peak_tflops=F] [--hbm_gbps=G] [--budget_s=S] [--json=PATH]

Sections (each row is printed as soon as it is measured; README.md beside this file says
what every row means):

  device   the chip, its peak dense bf16 FLOP/s and HBM bandwidth (table `PEAKS` by
           jax.devices()[0].device_kind, or --peak_tflops/--hbm_gbps; measured when the
           kind is unknown), and a measured bf16 matmul rate and copy bandwidth beside them.
  parity   every attention backend (rlhf_jax/models/attention.py) against `dense` in bf16,
           forward and gradients, for every mask kind; then the whole model (SFT loss and
           parameter gradients) with ModelConfig.attention set to each backend.
  sft_mfu  the SFT train step (rlhf_jax.trainers.sft.make_train_step + the trainer's AdamW)
           of the Llama-3.2-1B shape, bf16 compute, remat "full", one backend at a time:
           tokens/s, MFU and HFU (formulas printed).
  decode   `rlhf_jax.sampling.generate` of the same shape at batch 64 and 256: decode
           tokens/s against the HBM roofline (weights + KV cache bytes read per step).
  async_rl GRPO steps/s with rollout.max_staleness = 0 (synchronous) vs 1 (the rollout of
           step t+1 sampled in a background thread while step t updates; issue #18) on the
           one device, colocated: the `grpo.py:tiny` task with SmolLM2-135M's blocks
           (bf16; the tiny tokenizer's vocabulary), 16 prompts x 8 samples, 128 new tokens; grpo.old_logps=recompute for both,
           so they do the same work. On one device the sampler and the update queue on the
           same stream: what overlap can buy there is the host-side gaps (reward, batching,
           logging), not the device time.

Timing: jax.block_until_ready, compile and warm-up steps first, median of the timed
iterations. Every section has a time box (a share of --budget_s; what a section leaves
goes to the next); a case that would overrun it is reported as skipped, and a watchdog
ends the run at --budget_s with the rows so far. With $OUT set (or --json) every row is
also written, as it comes, to $OUT/accelerator_check.json.

--dry_run: CPU (JAX_PLATFORMS=cpu), tiny shapes, every section end to end; backends not
available on the platform are rows "n/a on cpu". It is what tests/test_accelerator_check.py
runs, so the script cannot rot. Exit status 1 when any row FAILs or errors.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import platform
import statistics
import sys
import threading
import time
import traceback

if "--dry_run" in sys.argv[1:]:  # before JAX starts: CPU, and XLA:CPU compiling fast (the
  # dry run's time is its ~20 compilations of tiny programs; ~3x less with these flags)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
                             " --xla_llvm_disable_expensive_passes=true").strip()

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from rlhf_jax import sampling  # noqa: E402
from rlhf_jax.losses.logprobs import shift_for_next_token  # noqa: E402
from rlhf_jax.losses.sft import sft_loss_sums  # noqa: E402
from rlhf_jax.models import attention as attn_lib  # noqa: E402
from rlhf_jax.models import attention_mask as mask_lib  # noqa: E402
from rlhf_jax.models.transformer import ModelConfig, Transformer, init_params  # noqa: E402

SECTIONS = ("device", "parity", "sft_mfu", "decode", "async_rl")
# Time-box shares of the budget (what a section leaves over goes to the next ones).
SHARES = {"device": 0.03, "parity": 0.13, "sft_mfu": 0.4, "decode": 0.24, "async_rl": 0.2}

# device_kind substring (first match, case-insensitive) -> (dense bf16 TFLOP/s without
# sparsity, HBM GB/s), vendor datasheets. jax.devices()[0].device_kind is e.g.
# "NVIDIA H200", "NVIDIA H100 80GB HBM3" (SXM), "NVIDIA A100-SXM4-80GB".
PEAKS = (
    ("H200 NVL", 835.0, 4800.0),
    ("H200", 989.0, 4800.0),            # SXM, 141 GB HBM3e
    ("H100 NVL", 835.0, 3900.0),
    ("H100 PCIe", 756.0, 2000.0),
    ("H100", 989.0, 3350.0),            # SXM, 80 GB HBM3
    ("A100-SXM4-80GB", 312.0, 2039.0),
    ("A100 80GB PCIe", 312.0, 1935.0),
    ("A100", 312.0, 1555.0),            # 40 GB parts
)

# Parity tolerance. Errors are measured against `dense` run in float32 on the same
# (bf16-rounded) inputs, over the positions a loss sees, normalised by the reference's
# largest magnitude; a backend passes when its bf16 error is at most
# TOL_FACTOR x dense's own bf16 error + TOL_FLOOR (FlashAttention's test rule, Dao 2023).
TOL_FACTOR, TOL_FLOOR = 2.0, 1e-3
TOLERANCE_TEXT = (f"parity: err = max|x - x_f32| / max|x_f32| over real query positions "
                  f"(x_f32 = dense in float32 on the same bf16 inputs; gradients: each of "
                  f"dq, dk, dv[, dnew_k, dnew_v] for a cotangent that is 0 on padding, the row "
                  f"shows the one nearest its tolerance; model: "
                  f"relative L2 of loss and of all parameter gradients); a backend passes when "
                  f"err_bf16(backend) <= {TOL_FACTOR:g} x err_bf16(dense) + {TOL_FLOOR:g}")
FLOPS_TEXT = ("MFU = model FLOPs per step / step time / peak; model FLOPs = 6 * N * B * T "
              "(N = matmul parameters: L * (D*Dh*(H+2K) + H*Dh*D + 3*D*F) + V*D for the "
              "unembedding; the input embedding is a gather) + attention "
              "(attention QK^T and PV: 4 * T^2 * H * Dh per layer forward, x3 for "
              "forward + backward, causal: 12 * L * H * Dh * T(T+1)/2 per sequence; "
              "rlhf_jax/flops.py). "
              "HFU adds remat 'full' recompute, one more forward of every block: "
              "2 * (N - V*D) * B * T + 4 * L * H * Dh * B * T(T+1)/2. Norms, RoPE, softmax and the "
              "optimizer are not counted; the masked half of T x T that dense computes isn't "
              "either (same model FLOPs for every backend).")
ROOFLINE_TEXT = ("decode roofline: bytes read per decode step = weight bytes (every parameter "
                 "as passed to generate) + B * 2 * L * K * Dh * S * cache bytes (K and V of "
                 "all S = P + N - 1 cache slots, which every step reads); tokens/s bound = "
                 "B * HBM bandwidth / bytes per step. Measured: decode time = generate(N) - "
                 "generate(1) (the prefill and first token), B * (N - 1) tokens.")


# ----------------------------------------------------------------------------
# Shapes
# ----------------------------------------------------------------------------

# Llama-3.2-1B (rlhf_jax/presets.py SIZES["llama3_2_1b"]), bf16 compute, remat "full".
LLAMA_1B = dict(vocab_size=128256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8,
                head_dim=64, d_ff=8192, rope_theta=500000.0,
                rope_scaling=(32.0, 1.0, 4.0, 8192), norm_eps=1e-5, tie_embeddings=True)
TINY = dict(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
            d_ff=128)


@dataclasses.dataclass(frozen=True)
class Shapes:
  model: dict            # ModelConfig fields of the SFT / decode model
  parity_model: dict     # the (small) model of the model-level parity rows
  attn: tuple            # parity: B, T, H, K, Dh
  cache: tuple           # parity "cached": S slots, cache_index, new tokens per case
  sft: tuple             # B, T
  decode_batches: tuple
  decode: tuple          # P prompt tokens, N new tokens
  iters: int             # timed iterations (median)
  warmup: int
  decode_weights: str    # parameter dtypes passed to generate
  decode_iters: int
  async_rl: tuple = ()   # model fields over grpo.py:tiny's, prompts, G, new tokens, steps, warm-up


# SmolLM2-135M's blocks (rlhf_jax/presets.py), bf16 compute; the vocabulary stays the tiny
# task's tokenizer's (sampled ids must decode), so the unembedding is smaller than SmolLM2's.
SMOLLM2_BLOCKS = dict(d_model=576, n_layers=30, n_heads=9, n_kv_heads=3,
                      head_dim=64, d_ff=1536, dtype="bfloat16")

GPU_SHAPES = Shapes(
    model=LLAMA_1B,
    parity_model=dict(vocab_size=4096, d_model=512, n_layers=2, n_heads=8, n_kv_heads=2,
                      head_dim=64, d_ff=1024),
    attn=(2, 1024, 32, 8, 64), cache=(1024, 512, (8, 1)), sft=(8, 2048),
    decode_batches=(64, 256), decode=(128, 256), iters=5, warmup=2,
    decode_weights="float32,bfloat16", decode_iters=3,
    async_rl=(SMOLLM2_BLOCKS, 16, 8, 128, 12, 3))
# The dry run keeps every code path and as few compilations as that allows (~20).
DRY_SHAPES = Shapes(
    model=TINY, parity_model=TINY, attn=(2, 32, 4, 2, 16), cache=(32, 16, (4,)), sft=(2, 64),
    decode_batches=(4,), decode=(8, 8), iters=2, warmup=1, decode_weights="bfloat16",
    decode_iters=2, async_rl=({}, 2, 2, 4, 3, 1))


# ----------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------

def _fmt(v) -> str:
  if v is None:
    return "-"
  if isinstance(v, str):
    return v
  v = float(v)
  if not math.isfinite(v):
    return str(v)
  if v == 0 or 1e-2 <= abs(v) < 1e6:
    return f"{v:.4g}" if abs(v) < 100 else f"{v:.0f}"
  return f"{v:.2e}"


def _bytes(x: float) -> str:
  return f"{x / 1e9:.3g} GB" if x >= 1e8 else f"{x / 1e6:.3g} MB"


def _flops(x: float) -> str:
  return f"{x / 1e12:.4g} TFLOP/s" if x >= 1e11 else f"{x / 1e9:.3g} GFLOP/s"


class Report:
  """One markdown table, printed a row at a time; the JSON rewritten after every row."""

  COLUMNS = ("section", "case", "metric", "value", "reference", "status")

  def __init__(self, json_path: str | None, meta: dict):
    self.rows: list[dict] = []
    self.json_path = json_path
    self.meta = meta
    self.lock = threading.Lock()
    self.header_printed = False

  def header(self):
    print("| " + " | ".join(self.COLUMNS) + " |")
    print("|" + "---|" * len(self.COLUMNS), flush=True)
    self.header_printed = True

  def row(self, section, case, metric, value=None, reference="", status="ok", **extra):
    r = dict(section=section, case=case, metric=metric,
             value=(None if value is None or isinstance(value, str) else float(value)),
             reference=reference, status=status, t_s=round(time.perf_counter() - T0, 1),
             **extra)
    with self.lock:
      self.rows.append(r)
      cells = [section, case, metric, _fmt(value), reference, status]
      print("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |", flush=True)
      self.write()

  def write(self, done: bool = False):
    if not self.json_path:
      return
    tmp = self.json_path + ".tmp"
    with open(tmp, "w") as f:
      json.dump({"meta": self.meta, "rows": self.rows, "done": done,
                 "elapsed_s": round(time.perf_counter() - T0, 1)}, f, indent=1)
    os.replace(tmp, self.json_path)

  def failed(self) -> bool:
    return any(r["status"].startswith(("FAIL", "error")) for r in self.rows)


T0 = time.perf_counter()


def log(msg: str):
  print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


class TimeBox:
  """Section deadlines: a section gets its share of what is left (shares of the sections
  still to run); a case is skipped when the slowest case so far would overrun it."""

  def __init__(self, budget_s: float, sections):
    self.deadline = T0 + budget_s
    self.pending = list(sections)
    self.section_deadline = self.deadline
    self.longest = 0.0

  def left(self) -> float:
    return self.deadline - time.perf_counter()

  def start(self, section: str):
    shares = sum(SHARES[s] for s in self.pending)
    self.section_deadline = time.perf_counter() + self.left() * SHARES[section] / shares
    self.pending.remove(section)
    self.longest = 0.0

  def fits(self) -> bool:
    """Room for one more case like the slowest so far (the first case always runs)."""
    now = time.perf_counter()
    return now + self.longest <= self.section_deadline and now + self.longest < self.deadline

  def case_took(self, seconds: float):
    self.longest = max(self.longest, seconds)


def timed_median(fn, iters: int) -> float:
  times = []
  for _ in range(iters):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return statistics.median(times)


# ----------------------------------------------------------------------------
# Attention backends (the API of rlhf_jax/models/attention.py)
# ----------------------------------------------------------------------------

def api_missing() -> str:
  """'' when rlhf_jax.models.attention (masks: attention_mask) has the backend API, else
  what is missing."""
  names = ("attend", "supports", "available", "resolve")
  mask_names = ("causal_mask", "shared_prefix_mask", "cached_mask")
  missing = ([n for n in names if not hasattr(attn_lib, n)]
             + [n for n in mask_names if not hasattr(mask_lib, n)])
  return ", ".join(missing)


def backend_status(backend: str, kind: str, platform_: str) -> tuple[str, str]:
  """(concrete backend or "", why not): "" + a reason when it cannot run here."""
  missing = api_missing()
  if missing:
    if backend in ("dense", "auto"):
      return "built-in", ""
    return "", "n/a: attention API not there yet"
  if backend != "auto" and not attn_lib.available(backend, platform_):
    return "", f"n/a on {platform_}"
  if backend != "auto" and not attn_lib.supports(backend, kind):
    return "", f"n/a: {backend} has no kind {kind}"
  return (attn_lib.resolve(backend, kind, platform_) if backend == "auto" else backend), ""


def backend_label(backend: str, concrete: str) -> str:
  return backend if backend == concrete else f"{backend}->{concrete}"


# ----------------------------------------------------------------------------
# Section: device
# ----------------------------------------------------------------------------

def device_section(rep: Report, a, box: TimeBox) -> tuple[float, float, str]:
  """(peak FLOP/s, HBM bytes/s, where they come from); rows for the measured rates."""
  dev = jax.devices()[0]
  kind = dev.device_kind
  table = next(((k, f, b) for k, f, b in PEAKS if k.lower() in kind.lower()), None)
  gpu = dev.platform == "gpu"
  n = 8192 if gpu else 256
  dt = jnp.bfloat16 if gpu else jnp.float32
  x = jax.random.normal(jax.random.PRNGKey(0), (n, n), dt)
  mm = jax.jit(lambda a_, b_: a_ @ b_)
  jax.block_until_ready(mm(x, x))
  mm_s = timed_median(lambda: mm(x, x), 10 if gpu else 3)
  mm_flops = 2 * n ** 3 / mm_s
  del x
  m = (1 << 29) if gpu else (1 << 21)   # elements: 1 GiB of bf16 on a GPU, 8 MiB f32 on CPU
  y = jnp.ones((m,), dt)
  cp = jax.jit(lambda z: z + 1)
  jax.block_until_ready(cp(y))
  cp_s = timed_median(lambda: cp(y), 10 if gpu else 3)
  cp_bw = 2 * m * jnp.dtype(dt).itemsize / cp_s
  del y
  if a.peak_tflops:
    peak, peak_src = a.peak_tflops * 1e12, "--peak_tflops"
  elif table:
    peak, peak_src = table[1] * 1e12, f"table: {table[0]}"
  else:
    peak, peak_src = mm_flops, f"measured ({kind} not in the table)"
  if a.hbm_gbps:
    bw, bw_src = a.hbm_gbps * 1e9, "--hbm_gbps"
  elif table:
    bw, bw_src = table[2] * 1e9, f"table: {table[0]}"
  else:
    bw, bw_src = cp_bw, f"measured ({kind} not in the table)"
  dname = "bf16" if gpu else "f32"
  rep.row("device", kind, f"{dname} matmul {n}^3 TFLOP/s (measured)", mm_flops / 1e12,
          f"peak {_flops(peak)} ({peak_src})", f"{100 * mm_flops / peak:.0f}% of peak")
  rep.row("device", kind, "copy GB/s, read + write (measured)", cp_bw / 1e9,
          f"peak {_bytes(bw)}/s ({bw_src})", f"{100 * cp_bw / bw:.0f}% of peak")
  return peak, bw, f"{peak_src}; {bw_src}"


# ----------------------------------------------------------------------------
# Section: parity
# ----------------------------------------------------------------------------

def _parity_cases(shapes: Shapes):
  """(label, kind, inputs) with numpy inputs: segment ids (causal, shared_prefix) or the
  cache mask (cached), padding and packing in every case."""
  B, T, H, K, Dh = shapes.attn
  S, ci, new_tokens = shapes.cache
  p = T // 8
  causal = np.zeros((B, T), np.int32)
  causal[0, :T // 2], causal[0, T // 2:T - p] = 1, 2           # two packed + right padding
  causal[1:, p:] = 1                                          # left padding
  shared = np.zeros((B, T), np.int32)
  w = (T - T // 2 - 2) // 2
  for b, lead in enumerate([0] + [2] * (B - 1)):              # prefix (left-padded) | 2 | 3
    shared[b, lead:T // 2], shared[b, T // 2:T // 2 + w] = 1, 2
    shared[b, T // 2 + w:T // 2 + 2 * w] = 3
  kv = np.ones((B, S), np.int32)
  kv[1:, :3] = 0                                              # a left-padded prompt
  cases = [("causal", "causal", dict(seg=causal)),
           ("shared_prefix", "shared_prefix", dict(seg=shared))]
  for tn in new_tokens:
    cases.append((f"cached T={tn}", "cached", dict(kv=kv, ci=ci, tn=tn)))
  return cases


def _mask(kind, x, T):
  if kind == "causal":
    return mask_lib.causal_mask(jnp.asarray(x["seg"]))
  if kind == "shared_prefix":
    return mask_lib.shared_prefix_mask(jnp.asarray(x["seg"]))
  return mask_lib.cached_mask(jnp.asarray(x["kv"]), x["ci"], T)


def _attention_arrays(kind, x, shapes: Shapes):
  """float32 arrays (rounded to bf16, so every run sees the same inputs) and the
  real-query mask [B, T]."""
  B, T, H, K, Dh = shapes.attn
  S = shapes.cache[0]
  keys = iter(jax.random.split(jax.random.PRNGKey(1), 8))
  rnd = lambda shape: jax.random.normal(next(keys), shape).astype(jnp.bfloat16).astype(
      jnp.float32)
  if kind == "cached":
    tn, ci = x["tn"], x["ci"]
    arrs = dict(q=rnd((B, tn, H, Dh)), k=rnd((B, S, K, Dh)), v=rnd((B, S, K, Dh)),
                nk=rnd((B, tn, K, Dh)), nv=rnd((B, tn, K, Dh)))
    real = x["kv"][:, ci:ci + tn] > 0
  else:
    arrs = dict(q=rnd((B, T, H, Dh)), k=rnd((B, T, K, Dh)), v=rnd((B, T, K, Dh)))
    real = x["seg"] > 0
  arrs["g"] = rnd(arrs["q"].shape) * jnp.asarray(real, jnp.float32)[:, :, None, None]
  return arrs, real


def _attend_with_grads(kind, x, arrs, backend, dtype):
  names = ("q", "k", "v") + (("nk", "nv") if kind == "cached" else ())
  T = arrs["q"].shape[1]

  def f(*ins):
    d = dict(zip(names, ins))
    kw = dict(new_k_BTKd=d["nk"], new_v_BTKd=d["nv"]) if kind == "cached" else {}
    return attn_lib.attend(d["q"], d["k"], d["v"], _mask(kind, x, T), backend=backend, **kw)

  def run(g, *ins):
    out, vjp = jax.vjp(f, *ins)
    return out, dict(zip(names, vjp(g.astype(out.dtype))))

  out, grads = jax.jit(run)(arrs["g"].astype(dtype), *(arrs[n].astype(dtype) for n in names))
  return (np.asarray(out, np.float32), {k: np.asarray(v, np.float32) for k, v in grads.items()})


_GRAD_NAMES = dict(q="q", k="k", v="v", nk="new_k", nv="new_v")


def _errors(result, ref, real):
  """(forward err, {input: gradient err}, all finite) of one run against the f32 run."""
  (out, grads), (r_out, r_grads) = result, ref
  finite = bool(np.all(np.isfinite(out))) and all(bool(np.all(np.isfinite(g)))
                                                  for g in grads.values())
  return (_max_err(out, r_out, real),
          {n: _max_err(g, r_grads[n], real if n == "q" else None) for n, g in grads.items()},
          finite)


def _max_err(x, ref, where=None):
  if where is not None:
    x, ref = x[where], ref[where]
  scale = float(np.max(np.abs(ref))) or 1.0
  return float(np.max(np.abs(x - ref))) / scale


def _verdict(err, err_dense, finite=True):
  if not finite:
    return "FAIL (non-finite)"
  tol = TOL_FACTOR * err_dense + TOL_FLOOR
  return "ok" if err <= tol else f"FAIL (> {tol:.2e})"


def parity_section(rep: Report, a, box: TimeBox, shapes: Shapes, platform_: str):
  if api_missing():
    rep.row("parity", "all backends", "fwd / grad err", None, "",
            "n/a: attention API not there yet")
  else:
    for label, kind, x in _parity_cases(shapes):
      if not box.fits():
        rep.row("parity", label, "fwd / grad err", None, "", "skipped (time box)")
        continue
      t = time.perf_counter()
      arrs, real = _attention_arrays(kind, x, shapes)
      ref = _attend_with_grads(kind, x, arrs, "dense", jnp.float32)
      done = {}
      for backend in attn_lib.BACKENDS:
        concrete, why = backend_status(backend, kind, platform_)
        case = f"{label}/{backend_label(backend, concrete or backend)}"
        if why:
          rep.row("parity", case, "fwd / grad err", None, "", why)
          continue
        try:
          for b in sorted({concrete, "dense"} - set(done)):
            done[b] = _attend_with_grads(kind, x, arrs, b, jnp.bfloat16)
          (e_fwd, e_grads, finite), (d_fwd, d_grads, _) = (
              _errors(done[concrete], ref, real), _errors(done["dense"], ref, real))
          # The gradient row shows the array closest to (or furthest past) its tolerance.
          worst = (max(e_grads, key=e_grads.get) if backend == "dense" else
                   max(e_grads, key=lambda n: e_grads[n] - TOL_FACTOR * d_grads[n]))
          gname = "d" + _GRAD_NAMES[worst]
          if backend == "dense":
            status = "ok" if finite else "FAIL (non-finite)"
            rep.row("parity", case, "fwd err (bf16 vs f32)", e_fwd, "the reference", status)
            rep.row("parity", case, f"grad err (worst: {gname})", e_grads[worst],
                    "the reference", status)
            continue
          vs_dense = _max_err(done[concrete][0], done["dense"][0], real)
          rep.row("parity", case, "fwd err (bf16 vs f32)", e_fwd,
                  f"dense {d_fwd:.2e}; vs dense bf16 {vs_dense:.2e}",
                  _verdict(e_fwd, d_fwd, finite))
          rep.row("parity", case, f"grad err (worst: {gname})", e_grads[worst],
                  f"dense {d_grads[worst]:.2e}", _verdict(e_grads[worst], d_grads[worst], finite))
        except Exception as e:  # noqa: BLE001  (a broken backend is a row, not the end)
          _error_row(rep, "parity", case, "fwd / grad err", e)
      box.case_took(time.perf_counter() - t)
  _model_parity(rep, a, box, shapes, platform_)


def _model_loss_and_grads(cfg: ModelConfig, params, batch):
  model = Transformer(cfg)

  def loss(p):
    logits, _ = model.apply({"params": p}, batch["tokens"], batch["segment_ids"])
    nll, n = sft_loss_sums(*shift_for_next_token(logits, batch["tokens"], batch["loss_mask"]))
    return nll / jnp.maximum(n, 1.0)

  value, grads = jax.jit(jax.value_and_grad(loss))(params)
  return float(value), np.concatenate([np.asarray(g, np.float32).ravel()
                                       for g in jax.tree.leaves(grads)])


def _model_parity(rep, a, box, shapes: Shapes, platform_: str):
  """The whole model: SFT loss and all parameter gradients with ModelConfig.attention set to
  each backend (bf16) against dense in float32; packed rows and padding."""
  base = ModelConfig(**shapes.parity_model, max_seq_len=shapes.attn[1])
  B, T = shapes.attn[0], shapes.attn[1]
  params = init_params(base, jax.random.PRNGKey(2))
  seg = _parity_cases(shapes)[0][2]["seg"]
  tokens = np.asarray(jax.random.randint(jax.random.PRNGKey(3), (B, T), 3, base.vocab_size))
  batch = dict(tokens=jnp.asarray(tokens), segment_ids=jnp.asarray(seg),
               loss_mask=jnp.asarray((seg > 0).astype(np.int32)))
  rel = lambda x, r: float(np.linalg.norm(np.asarray(x) - r) / (np.linalg.norm(r) or 1.0))
  ref = None
  done = {}
  for backend in attn_lib.BACKENDS:
    concrete, why = backend_status(backend, "causal", platform_)
    case = f"model/{backend_label(backend, concrete or backend)}"
    if why:
      rep.row("parity", case, "loss / grad rel err", None, "", why)
      continue
    if not box.fits():
      rep.row("parity", case, "loss / grad rel err", None, "", "skipped (time box)")
      continue
    t = time.perf_counter()
    try:
      if ref is None:
        ref = _model_loss_and_grads(dataclasses.replace(base, attention="dense"), params, batch)
        done["dense"] = _model_loss_and_grads(
            dataclasses.replace(base, attention="dense", dtype="bfloat16"), params, batch)
      attention = "dense" if concrete == "built-in" else concrete
      if attention not in done:
        done[attention] = _model_loss_and_grads(
            dataclasses.replace(base, attention=attention, dtype="bfloat16"), params, batch)
      (loss, grads), (d_loss, d_grads) = done[attention], done["dense"]
      e_loss, e_grad = rel(loss, ref[0]), rel(grads, ref[1])
      ed_loss, ed_grad = rel(d_loss, ref[0]), rel(d_grads, ref[1])
      finite = math.isfinite(loss) and bool(np.all(np.isfinite(grads)))
      ok = lambda e, ed: ("ok" if backend == "dense" and finite else _verdict(e, ed, finite))
      rep.row("parity", case, "loss rel err (bf16 vs f32)", e_loss,
              f"dense {ed_loss:.2e}; loss {loss:.4f}", ok(e_loss, ed_loss))
      rep.row("parity", case, "param grad rel L2 err", e_grad, f"dense {ed_grad:.2e}",
              ok(e_grad, ed_grad))
    except Exception as e:  # noqa: BLE001
      _error_row(rep, "parity", case, "loss / grad rel err", e)
    box.case_took(time.perf_counter() - t)


def _error_row(rep, section, case, metric, e: BaseException):
  traceback.print_exc(file=sys.stderr)
  msg = " ".join(f"{type(e).__name__}: {e}".split())
  rep.row(section, case, metric, None, "", "error: " + msg[:160])


# ----------------------------------------------------------------------------
# Section: SFT train step MFU
# ----------------------------------------------------------------------------

def matmul_params(c: ModelConfig) -> int:
  D, F, H, K, Dh, V, L = (c.d_model, c.d_ff, c.n_heads, c.n_kv_heads, c.head_dim,
                          c.vocab_size, c.n_layers)
  return L * (D * Dh * (H + 2 * K) + H * Dh * D + 3 * D * F) + V * D


def train_flops(c: ModelConfig, B: int, T: int) -> tuple[float, float]:
  """(model FLOPs, remat-full recompute FLOPs) of one SFT step over B rows of T tokens
  (`rlhf_jax.flops.mfu_train_flops`, the formula every trainer's counters use)."""
  from rlhf_jax import flops  # pylint: disable=g-import-not-at-top
  return flops.mfu_train_flops(c, B, T)


def _make_step(model):
  """The trainer's step and optimizer (rlhf_jax.trainers.sft / optim); when the trainer's
  dependencies are missing (an offline machine's own Python), the same computation here:
  token-mean NLL, value_and_grad, global-norm clipping, AdamW."""
  opt = dict(lr=1e-5, warmup_steps=10, final_lr_ratio=0.1, grad_clip_norm=1.0, b1=0.9,
             b2=0.95, eps=1e-8, weight_decay=0.1)
  try:
    from rlhf_jax.trainers import optim, sft  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    tx = optax.chain(optax.clip_by_global_norm(opt["grad_clip_norm"]),
                     optax.adamw(opt["lr"], b1=opt["b1"], b2=opt["b2"], eps=opt["eps"],
                                 weight_decay=opt["weight_decay"]))

    def step(state, batch):
      def loss_sums(p):
        logits, _ = model.apply({"params": p}, batch["tokens"], batch["segment_ids"])
        return sft_loss_sums(*shift_for_next_token(logits, batch["tokens"],
                                                   batch["loss_mask"]))
      (nll, n), grads = jax.value_and_grad(loss_sums, has_aux=True)(state["params"])
      grads = jax.tree.map(lambda g: g / jnp.maximum(n, 1.0), grads)
      updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
      return ({"step": state["step"] + 1, "params": optax.apply_updates(state["params"],
                                                                        updates),
               "opt_state": opt_state}, {"loss": nll / jnp.maximum(n, 1.0)})
    return step, tx, f"own step ({e})"
  tx, _ = optim.make_optimizer(argparse.Namespace(**opt), 1000)
  return sft.make_train_step(model, tx), tx, "rlhf_jax.trainers.sft.make_train_step"


def sft_section(rep: Report, a, box: TimeBox, shapes: Shapes, platform_: str, peak: float):
  B, T = shapes.sft
  backends = [b for b in a.sft_backends.split(",") if b]
  base = ModelConfig(**shapes.model, max_seq_len=T, dtype="bfloat16", remat=True)
  model_flops, recompute = train_flops(base, B, T)
  n = matmul_params(base)
  print(f"# sft_mfu: {B} x {T} tokens, N = {n / 1e9:.4g}B matmul params, model FLOPs/step "
        f"{model_flops:.4g} (6NBT {6 * n * B * T:.4g} + attention "
        f"{model_flops - 6 * n * B * T:.4g}), remat recompute {recompute:.4g}", flush=True)
  keys = jax.random.split(jax.random.PRNGKey(4), 2)
  batch = dict(tokens=jax.random.randint(keys[0], (B, T), 3, base.vocab_size, jnp.int32),
               segment_ids=jnp.ones((B, T), jnp.int32), loss_mask=jnp.ones((B, T), jnp.int32))
  init_state = None
  for backend in backends:
    concrete, why = backend_status(backend, "causal", platform_)
    case = f"{backend_label(backend, concrete or backend)} {B}x{T}"
    if why:
      rep.row("sft_mfu", case, "tokens/s", None, "", why)
      continue
    if not box.fits():
      rep.row("sft_mfu", case, "tokens/s", None, "", "skipped (time box)")
      continue
    t = time.perf_counter()
    state = None
    try:
      cfg = dataclasses.replace(base, attention="dense" if concrete == "built-in" else concrete)
      step, tx, which = _make_step(Transformer(cfg))
      if init_state is None:  # one compiled init for every backend (the parameters are the same)
        init_state = jax.jit(lambda r, tx=tx: (lambda p: {
            "step": jnp.zeros((), jnp.int32), "params": p, "opt_state": tx.init(p)})(
                init_params(base, r)))
      state = init_state(jax.random.PRNGKey(0))  # afresh: the step donates (overwrites) it
      tc = time.perf_counter()
      compiled = jax.jit(step, donate_argnums=0).lower(state, batch).compile()
      compile_s = time.perf_counter() - tc
      mem = compiled.memory_analysis()
      mem_bytes = ((mem.argument_size_in_bytes + mem.temp_size_in_bytes)
                   if mem is not None else float("nan"))
      log(f"sft_mfu {case}: compiled in {compile_s:.1f}s ({which}), {_bytes(mem_bytes)}")
      for _ in range(shapes.warmup):
        state, metrics = compiled(state, batch)
      jax.block_until_ready(metrics)
      times = []
      for _ in range(shapes.iters):
        ts = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - ts)
      step_s = statistics.median(times)
      loss = float(metrics["loss"])
      achieved = model_flops / step_s
      note = (f"step {step_s * 1e3:.4g} ms (median of {shapes.iters}), compile "
              f"{compile_s:.0f} s, XLA args+temp {_bytes(mem_bytes)}, loss {loss:.3f}"
              + ("" if which.startswith("rlhf_jax") else f"; {which}"))
      rep.row("sft_mfu", case, "tokens/s", B * T / step_s, note,
              "ok" if math.isfinite(loss) else "FAIL (non-finite loss)", step=which)
      rep.row("sft_mfu", case, "MFU %", 100 * achieved / peak,
              f"{_flops(achieved)} of {_flops(peak)}",
              f"HFU {100 * (model_flops + recompute) / step_s / peak:.1f}%")
    except Exception as e:  # noqa: BLE001  (an OOM or a lowering error is a row)
      _error_row(rep, "sft_mfu", case, "tokens/s", e)
    finally:
      del state
      gc.collect()
    box.case_took(time.perf_counter() - t)


# ----------------------------------------------------------------------------
# Section: decode vs the HBM roofline
# ----------------------------------------------------------------------------

def decode_section(rep: Report, a, box: TimeBox, shapes: Shapes, platform_: str, bw: float):
  P, N = shapes.decode
  S = P + N - 1
  batches = ([int(b) for b in a.decode_batches.split(",")] if a.decode_batches
             else list(shapes.decode_batches))
  weight_dtypes = [w for w in (a.decode_weights or shapes.decode_weights).split(",") if w]
  backends = [b for b in a.decode_backends.split(",") if b]
  print(f"# decode: prompt P={P}, N={N} new tokens, cache S={S} slots, sampling at "
        f"temperature 1 (no stop id: every row makes N tokens)", flush=True)
  params32 = None
  for wdt in weight_dtypes:      # float32 first: what the RL rollout passes
    for batch in batches:
      for backend in backends:
        concrete, why = backend_status(backend, "cached", platform_)
        case = f"{backend_label(backend, concrete or backend)} B={batch} weights {wdt}"
        if why:
          rep.row("decode", case, "tokens/s", None, "", why)
          continue
        if not box.fits():
          rep.row("decode", case, "tokens/s", None, "", "skipped (time box)")
          continue
        t = time.perf_counter()
        try:
          cfg = ModelConfig(**shapes.model, max_seq_len=S + 1, dtype="bfloat16",
                            attention=backend)
          if params32 is None:
            params32 = jax.jit(lambda r, cfg=cfg: init_params(cfg, r))(jax.random.PRNGKey(0))
          params = (params32 if wdt == "float32" else
                    jax.tree.map(lambda p, d=jnp.dtype(wdt): p.astype(d), params32))
          prompts = jax.random.randint(jax.random.PRNGKey(batch), (batch, P), 3,
                                       cfg.vocab_size, jnp.int32)
          mask = np.ones((batch, P), np.int32)

          def gen(n, cfg=cfg, params=params, prompts=prompts, mask=mask):
            return sampling.generate(cfg, params, prompts, mask, jax.random.PRNGKey(7),
                                     max_new_tokens=n, eos_id=None, pad_id=0)
          tc = time.perf_counter()
          jax.block_until_ready(gen(N))
          jax.block_until_ready(gen(1))
          first_s = time.perf_counter() - tc
          t_n = timed_median(lambda: gen(N), shapes.decode_iters)
          t_1 = timed_median(lambda: gen(1), shapes.decode_iters)
          dec_s = max(t_n - t_1, 1e-9)
          tokens_s = batch * (N - 1) / dec_s
          w_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
          kv_row = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * S * jnp.dtype(
              cfg.compute_dtype).itemsize
          step_bytes = w_bytes + batch * kv_row
          bound = batch * bw / step_bytes
          rep.row("decode", case, "tokens/s", tokens_s,
                  f"roofline {bound:.0f} tok/s: {_bytes(w_bytes)} weights + "
                  f"{_bytes(batch * kv_row)} KV per step at {_bytes(bw)}/s; step "
                  f"{dec_s / (N - 1) * 1e3:.3g} ms (median of {shapes.decode_iters}), "
                  f"prefill+1 {t_1 * 1e3:.3g} ms, compile+first {first_s:.0f} s",
                  f"{100 * tokens_s / bound:.0f}% of roofline",
                  roofline_tokens_s=bound, step_bytes=step_bytes)
        except Exception as e:  # noqa: BLE001
          _error_row(rep, "decode", case, "tokens/s", e)
        box.case_took(time.perf_counter() - t)


# ----------------------------------------------------------------------------
# Section: asynchronous GRPO (rollout.max_staleness 0 vs 1), colocated on one device
# ----------------------------------------------------------------------------

def _grpo_rate(k: int, shapes: Shapes, workdir: str) -> dict:
  """Runs GRPO (configs/grpo.py:tiny + shapes.async_rl) with max_staleness k; the rate over
  the steps after the warm-up ones (compilation), from metrics.jsonl's elapsed_s."""
  import contextlib  # pylint: disable=import-outside-toplevel
  from rlhf_jax.launch import load_config  # pylint: disable=import-outside-toplevel
  from rlhf_jax.trainers import grpo  # pylint: disable=import-outside-toplevel
  model, prompts, group, new_tokens, steps, warmup = shapes.async_rl
  c = load_config(os.path.join(REPO, "configs", "grpo.py") + ":tiny")
  c.model.update(**model)
  c.update(num_steps=steps, log_every=1, eval_every=0)
  c.checkpoint.every = 10**9
  c.rollout.update(prompts_per_step=prompts, group_size=group, max_new_tokens=new_tokens,
                   max_staleness=k)
  c.grpo.old_logps = "recompute"  # k >= 1 always runs the old-log-prob pass: same work
  with contextlib.redirect_stdout(sys.stderr):  # the trainer's log lines stay off the table
    grpo.run(c, workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  timed = rows[warmup:]
  span = timed[-1]["elapsed_s"] - rows[warmup - 1]["elapsed_s"]
  med = lambda key: statistics.median(r[key] for r in timed)
  return dict(steps_per_s=len(timed) / span, step_s=med("time/step"),
              generate_s=med("time/generate"), update_s=med("time/update"),
              first_s=rows[warmup - 1]["elapsed_s"], timed=len(timed),
              reward=statistics.mean(r["reward_mean"] for r in timed if "reward_mean" in r)
              if any("reward_mean" in r for r in timed) else float("nan"))


def async_section(rep: Report, a, box: TimeBox, shapes: Shapes, platform_: str):
  import tempfile  # pylint: disable=import-outside-toplevel
  model, prompts, group, new_tokens, steps, warmup = shapes.async_rl
  shape = (f"{model.get('n_layers', 'tiny')} layers d={model.get('d_model', 'tiny')}"
           if model else "tiny model")
  print(f"# async_rl: GRPO on grpo.py:tiny's task, {shape}, {prompts} prompts x G={group}, "
        f"{new_tokens} new tokens, {steps} steps (first {warmup} = compilation, not timed), "
        f"grpo.old_logps=recompute, colocated on {jax.device_count()} device(s)", flush=True)
  rates = {}
  with tempfile.TemporaryDirectory() as tmp:
    for k in (0, 1):
      case = f"GRPO max_staleness={k}"
      if not box.fits():
        rep.row("async_rl", case, "steps/s", None, "", "skipped (time box)")
        continue
      t = time.perf_counter()
      try:
        r = _grpo_rate(k, shapes, os.path.join(tmp, f"k{k}"))
        rates[k] = r
        speed = (f"{r['steps_per_s'] / rates[0]['steps_per_s']:.2f}x k=0"
                 if k and 0 in rates else "ok")
        rep.row("async_rl", case, "steps/s", r["steps_per_s"],
                f"median step {r['step_s']:.3g} s (generate {r['generate_s']:.3g} s, update "
                f"{r['update_s']:.3g} s) over {r['timed']} steps; compile+{warmup} steps "
                f"{r['first_s']:.0f} s", speed if math.isfinite(r["step_s"]) else
                "FAIL (non-finite time)", **{k_: v for k_, v in r.items()})
      except Exception as e:  # noqa: BLE001
        _error_row(rep, "async_rl", case, "steps/s", e)
      box.case_took(time.perf_counter() - t)


# ----------------------------------------------------------------------------

def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--dry_run", action="store_true",
                 help="CPU, tiny shapes: every section end to end (what the test runs)")
  p.add_argument("--sections", default=",".join(SECTIONS),
                 help=f"comma-separated, of {','.join(SECTIONS)} (device always runs)")
  p.add_argument("--peak_tflops", type=float, default=0.0,
                 help="peak dense bf16 TFLOP/s (default: PEAKS by device kind)")
  p.add_argument("--hbm_gbps", type=float, default=0.0,
                 help="HBM bandwidth in GB/s (default: PEAKS by device kind)")
  p.add_argument("--budget_s", type=float, default=0.0,
                 help="wall-clock budget of this process, sections time-boxed in it "
                      "(default 450; dry run 900)")
  p.add_argument("--json", default="",
                 help="write results here (default: $OUT/accelerator_check.json if $OUT is set)")
  p.add_argument("--sft_backends", default="cudnn,dense,chunked")
  p.add_argument("--decode_backends", default="auto")
  p.add_argument("--decode_weights", default="",
                 help="parameter dtypes passed to generate, default float32,bfloat16 "
                      "(float32: as the RL rollout does)")
  p.add_argument("--decode_batches", default="", help="default 64,256 (dry run: 4)")
  p.add_argument("--sft_shape", default="", help="BxT, default 8x2048 (dry run: 2x64)")
  a = p.parse_args(argv)
  sections = [s for s in a.sections.split(",") if s]
  unknown = set(sections) - set(SECTIONS)
  if unknown:
    p.error(f"unknown sections {sorted(unknown)}; expected some of {','.join(SECTIONS)}")
  shapes = DRY_SHAPES if a.dry_run else GPU_SHAPES
  a.budget_s = a.budget_s or (900.0 if a.dry_run else 450.0)
  if a.sft_shape:
    b, t = a.sft_shape.lower().split("x")
    shapes = dataclasses.replace(shapes, sft=(int(b), int(t)))

  dev = jax.devices()[0]
  platform_ = dev.platform
  if not a.dry_run and platform_ != "gpu":
    sys.exit(f"check.py: no GPU visible to JAX (platform {platform_!r}, devices "
             f"{jax.devices()}); on a CPU machine run it with --dry_run")
  json_path = a.json or (os.path.join(os.environ["OUT"], "accelerator_check.json")
                         if os.environ.get("OUT") else "")
  try:
    platform_version = " ".join(str(dev.client.platform_version).split())
  except Exception:  # noqa: BLE001
    platform_version = ""
  meta = dict(device_kind=dev.device_kind, platform=platform_, device_count=jax.device_count(),
              jax=jax.__version__, python=platform.python_version(),
              platform_version=platform_version, dry_run=a.dry_run, sections=sections,
              shapes=dataclasses.asdict(shapes), tolerance=TOLERANCE_TEXT, flops=FLOPS_TEXT,
              roofline=ROOFLINE_TEXT, attention_api_missing=api_missing())
  rep = Report(json_path or None, meta)
  box = TimeBox(a.budget_s, ["device"] + [s for s in SECTIONS[1:] if s in sections])

  def out_of_time():
    print(f"| budget | all | time budget of {a.budget_s:.0f} s spent | - | rows above are "
          f"what was measured | stopped |", flush=True)
    rep.rows.append(dict(section="budget", case="all", metric="time budget spent", value=None,
                         reference="", status="stopped"))
    rep.write(done=False)
    os._exit(3)  # pylint: disable=protected-access
  watchdog = threading.Timer(a.budget_s, out_of_time)
  watchdog.daemon = True
  watchdog.start()

  print(f"# accelerator check: {dev.device_kind} x {jax.device_count()} ({platform_}"
        f"{', ' + platform_version if platform_version else ''}), JAX {jax.__version__}, "
        f"Python {platform.python_version()}{', DRY RUN (tiny shapes)' if a.dry_run else ''}")
  if api_missing():
    print(f"# attention API not there yet (rlhf_jax.models.attention lacks {api_missing()}): "
          f"only the model's built-in dense attention runs")
  print(f"# {TOLERANCE_TEXT}")
  print(f"# {FLOPS_TEXT}")
  print(f"# {ROOFLINE_TEXT}", flush=True)
  rep.header()
  box.start("device")
  peak, bw, src = device_section(rep, a, box)
  meta.update(peak_flops=peak, hbm_bytes_s=bw, peaks_from=src)
  for section in SECTIONS[1:]:
    if section not in sections:
      continue
    box.start(section)
    log(f"{section}: {box.section_deadline - time.perf_counter():.0f} s time box")
    try:
      if section == "parity":
        parity_section(rep, a, box, shapes, platform_)
      elif section == "sft_mfu":
        sft_section(rep, a, box, shapes, platform_, peak)
      elif section == "decode":
        decode_section(rep, a, box, shapes, platform_, bw)
      else:
        async_section(rep, a, box, shapes, platform_)
    except Exception as e:  # noqa: BLE001  (one section's failure does not stop the others)
      _error_row(rep, section, "section", "-", e)
  watchdog.cancel()
  rep.write(done=True)
  print(f"# done in {time.perf_counter() - T0:.1f} s"
        + (f"; results: {json_path}" if json_path else ""), flush=True)
  return 1 if rep.failed() else 0


if __name__ == "__main__":
  sys.exit(main())
