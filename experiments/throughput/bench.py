"""Throughput of our trainers on the issue-#7 workloads (a benchmark, not a test).

    .venv/bin/python experiments/throughput/bench.py [--workloads=sft,dpo,grpo,tiny_sft,...]
        [--steps=10] [--warmup=3] [--out=runs/throughput/ours.json]

Each workload runs in its own subprocess (peak RSS per workload, no shared compile
cache): the real trainer (`rlhf_jax.trainers.<name>.run`) on a config at the spec of
experiments/throughput/spec.py, logging every step, with evaluation, sampling and
checkpoints out of the timed steps. Step time = the difference of consecutive
`elapsed_s` in metrics.jsonl (the whole trainer step: data, host syncs, metrics
writing), median over the steps after `--warmup` (compilation). Also: tokens/s, model
FLOPs per step (spec.train_flops), achieved FLOP/s and its fraction of a 1024^3 f32
matmul's rate measured in the same process, peak RSS, and for GRPO the split
generation / log-probs / update and decode tokens/s.

Data are random "words" tokenised by a SentencePiece model of exactly 1024 pieces
trained on them (the tokenizer runs once, before training; every row is full length:
overlength rows are truncated).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import runpy
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
SPEC = runpy.run_path(os.path.join(HERE, "spec.py"))
ALL = ("sft", "dpo", "grpo", "tiny_sft", "tiny_dpo", "tiny_grpo")


# ---------------------------------------------------------------------------
# Data: random words -> jsonl files (tokenised by a 1024-piece SentencePiece model)
# ---------------------------------------------------------------------------

def _words(rng, n):
  letters = "abcdefghijklmnopqrstuvwxyz"
  return " ".join("".join(rng.choice(list(letters), size=rng.integers(2, 8))) for _ in range(n))


def write_data(tmp: str, rng) -> dict:
  """sft.jsonl {"prompt","completion"}, pairs.jsonl {"prompt","chosen","rejected"},
  prompts.jsonl {"prompt","answer"}: long enough that every row is truncated to full length."""
  paths = {k: os.path.join(tmp, f"{k}.jsonl") for k in ("sft", "pairs", "prompts")}
  with open(paths["sft"], "w") as f:
    for _ in range(400):
      f.write(json.dumps({"prompt": _words(rng, 8), "completion": _words(rng, 160)}) + "\n")
  with open(paths["pairs"], "w") as f:
    for _ in range(200):
      f.write(json.dumps({"prompt": _words(rng, 80), "chosen": _words(rng, 80),
                          "rejected": _words(rng, 80)}) + "\n")
  with open(paths["prompts"], "w") as f:
    for _ in range(400):
      f.write(json.dumps({"prompt": _words(rng, 40), "answer": "0"}) + "\n")
  return paths


# ---------------------------------------------------------------------------
# Configs at the spec
# ---------------------------------------------------------------------------

def _common(c, steps: int, tok_path: str):
  m = SPEC["MODEL"]
  c.model.update(vocab_size=m["vocab_size"], d_model=m["d_model"], n_layers=m["n_layers"],
                 n_heads=m["n_heads"], n_kv_heads=m["n_kv_heads"], head_dim=m["head_dim"],
                 d_ff=m["d_ff"], max_seq_len=256, dtype="float32")
  for k in ("tie_embeddings", "rope_theta", "norm_eps"):
    if k in c.model:
      c.model[k] = m[k]
  o = SPEC["OPTIMIZER"]
  c.optimizer.update(lr=o["lr"], b1=o["b1"], b2=o["b2"], eps=o["eps"],
                     weight_decay=o["weight_decay"], grad_clip_norm=o["grad_clip_norm"],
                     warmup_steps=0, final_lr_ratio=1.0)
  c.tokenizer.update(path=tok_path)
  _quiet(c, steps)


def _quiet(c, steps: int):
  c.update(num_steps=steps, log_every=1, eval_every=0)
  c.checkpoint.update(every=10**9, async_save=False)
  if "sample" in c:
    c.sample.every = 0
  if "eval_kl" in c:
    c.eval_kl = False
  if "capability" in c:
    c.capability.path = ""


def make_config(workload: str, steps: int, data: dict, tok_path: str):
  from rlhf_jax.launch import load_config
  w = SPEC["WORKLOADS"].get(workload)
  if workload == "sft":
    c = load_config(os.path.join(REPO, "configs/sft.py:tiny"))
    _common(c, steps, tok_path)
    c.batch_size = w["batch_size"]
    c.data.update(train_path=data["sft"], eval_path="", max_seq_len=w["seq_len"],
                  overlength="truncate", packing=False, loss_on_prompt=True)
  elif workload == "dpo":
    c = load_config(os.path.join(REPO, "configs/dpo.py:tiny"))
    _common(c, steps, tok_path)
    c.batch_size = w["pairs"]
    c.data.update(source="jsonl", train_path=data["pairs"], eval_path="",
                  max_prompt_len=w["prompt_len"], max_completion_len=w["completion_len"])
    c.dpo.update(loss_type="sigmoid", beta=w["beta"], precompute_reference=False)
  elif workload == "grpo":
    c = load_config(os.path.join(REPO, "configs/grpo.py:tiny"))
    _common(c, steps, tok_path)
    c.data.update(source="jsonl", train_path=data["prompts"], eval_path="",
                  max_prompt_len=w["prompt_len"])
    c.rollout.update(prompts_per_step=w["prompts"], group_size=w["group_size"],
                     max_new_tokens=w["max_new_tokens"], temperature=1.0)
    c.grpo.update(variant="grpo", kl_coef=w["beta"], epochs=w["num_iterations"], minibatches=1)
    c.reward.spec = "missing_eos"  # a rule: costs ~nothing
    c.eval_prompts = 0
  elif workload.startswith("tiny_"):
    algo = workload[len("tiny_"):]
    c = load_config(os.path.join(REPO, f"configs/{algo}.py:tiny"))
    _quiet(c, steps)
    if algo == "grpo":  # the tiny GRPO preset from a random init: same shapes, no SFT needed
      c.eval_prompts = 0
  else:
    raise SystemExit(f"unknown workload {workload!r}; expected one of {', '.join(ALL)}")
  return c


def matmul_rate(n: int = 1024, reps: int = 10) -> float:
  """FLOP/s of a jitted n^3 float32 matmul (median of `reps`): the CPU's practical peak."""
  import jax
  import jax.numpy as jnp
  x = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  f = jax.jit(lambda a, b: a @ b)
  f(x, x).block_until_ready()
  ts = []
  for _ in range(reps):
    t = time.perf_counter()
    f(x, x).block_until_ready()
    ts.append(time.perf_counter() - t)
  return 2 * n ** 3 / statistics.median(ts)


def train_tokenizer(tmp: str, data: dict) -> str:
  from rlhf_jax.tokenizer import train_sentencepiece
  texts = []
  for name in ("sft", "pairs", "prompts"):
    with open(data[name]) as f:
      for line in f:
        texts.extend(v for v in json.loads(line).values() if isinstance(v, str))
  corpus = os.path.join(tmp, "corpus.txt")
  with open(corpus, "w") as f:
    f.write("\n".join(texts))
  train_sentencepiece(corpus, os.path.join(tmp, "tok"),
                      vocab_size=SPEC["MODEL"]["vocab_size"], model_type="bpe")
  return os.path.join(tmp, "tok.model")


def _apply(c, overrides: dict):
  """Dotted config overrides {"model.d_model": 512, ...} (the scaling study)."""
  for key, value in overrides.items():
    *path, leaf = key.split(".")
    parent = c
    for part in path:
      parent = parent[part]
    if leaf not in parent:
      raise SystemExit(f"--set: unknown config key {key!r}")
    parent[leaf] = value


def run_one(workload: str, steps: int, warmup: int, overrides: dict | None = None) -> dict:
  import jax
  import numpy as np
  from rlhf_jax.trainers import dpo, grpo, ppo, reward_model, sft
  trainers = dict(sft=sft, dpo=dpo, grpo=grpo, ppo=ppo, rm=reward_model)
  with tempfile.TemporaryDirectory() as tmp:
    data = write_data(tmp, np.random.default_rng(0))
    tok = train_tokenizer(tmp, data)
    c = make_config(workload, warmup + steps, data, tok)
    _apply(c, overrides or {})
    workdir = os.path.join(tmp, "run")
    t0 = time.perf_counter()
    trainers[workload.removeprefix("tiny_")].run(c, workdir)
    wall = time.perf_counter() - t0
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      rows = [json.loads(line) for line in f]
  rows = [r for r in rows if r.get("step", 0) >= 1]
  elapsed = [r["elapsed_s"] for r in rows]
  dts = [b - a for a, b in zip(elapsed, elapsed[1:])][warmup - 1:]  # step k: e_k - e_{k-1}
  sec = statistics.median(dts)
  out = dict(workload=workload, seconds_per_step=sec, timed_steps=len(dts),
             wall_s=wall, peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
             jax=jax.__version__, devices=f"{jax.device_count()}x{jax.devices()[0].platform}")
  w = dict(SPEC["WORKLOADS"].get(workload) or {})
  m = {**SPEC["MODEL"], **{k: c.model[k] for k in SPEC["MODEL"] if k in c.model}}
  if workload == "sft":
    w.update(batch_size=c.batch_size, seq_len=c.data.max_seq_len)
  elif workload == "dpo":
    w.update(pairs=c.batch_size)
  elif workload == "grpo":
    w.update(group_size=c.rollout.group_size, prompts=c.rollout.prompts_per_step,
             max_new_tokens=c.rollout.max_new_tokens)
  out["config_overrides"] = overrides or {}
  if workload in SPEC["WORKLOADS"]:
    out["num_params"] = SPEC["num_params"](m)
  tf = lambda n, L: SPEC["train_flops"](n, L, m)
  ff = lambda n, L: SPEC["forward_flops"](n, L, m)
  if workload == "sft":
    tokens = w["batch_size"] * w["seq_len"]
    flops = tf(tokens, w["seq_len"])
  elif workload == "dpo":
    L = w["prompt_len"] + w["completion_len"]
    tokens = 2 * w["pairs"] * L  # chosen + rejected rows; + a reference forward of each
    flops = tf(tokens, L) + ff(tokens, L)
  elif workload == "grpo":
    B, L = w["prompts"] * w["group_size"], w["prompt_len"] + w["max_new_tokens"]
    tokens = B * L
    # update (fwd+bwd) + the reference forward; generation is counted apart (decode)
    flops = tf(tokens, L) + ff(tokens, L)
    timed = rows[-len(dts):]
    for k in ("generate", "reward", "logprobs", "update", "step"):
      out[f"{k}_s"] = statistics.median(r[f"time/{k}"] for r in timed)
    out["generation_share"] = out["generate_s"] / out["step_s"]
    out["decode_tokens_per_s"] = statistics.median(r["rollout_tokens_per_second"] for r in timed)
  else:
    tokens = flops = None
  if tokens:
    rate = matmul_rate()
    out.update(tokens_per_step=tokens, tokens_per_s=tokens / sec, model_flops_per_step=flops,
               achieved_flops=flops / sec, matmul_peak_flops=rate,
               fraction_of_matmul_peak=flops / sec / rate)
  return out


TCMALLOC_PATHS = ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
                  "/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4",
                  "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4")


def allocator_env(name: str) -> dict:
  """Environment for the worker: "library" = what `rlhf-jax` sets for itself (glibc malloc
  tuned, rlhf_jax/allocator.py; {} where it does not apply), "system" = glibc's
  defaults, "tcmalloc" = LD_PRELOAD of tcmalloc."""
  if name == "library":
    sys.path.insert(0, REPO)
    from rlhf_jax import allocator
    env = allocator.tuned_env({k: v for k, v in os.environ.items() if k not in allocator.TUNED})
    return {k: env[k] for k in allocator.TUNED} if env else {}
  if name == "system":
    return {"RLHF_JAX_MALLOC": "system"}
  if name == "tcmalloc":
    for path in TCMALLOC_PATHS:
      if os.path.exists(path):
        return {"LD_PRELOAD": path}
    raise SystemExit("--allocator=tcmalloc: no libtcmalloc found (Debian/Ubuntu: apt install "
                     f"libtcmalloc-minimal4); looked in {', '.join(TCMALLOC_PATHS)}")
  raise SystemExit(f"--allocator={name!r}: expected library, system or tcmalloc")


def run_ours(workload: str, steps: int, warmup: int, env: dict | None = None,
             overrides: dict | None = None) -> dict:
  """One workload in a fresh subprocess (its own peak RSS); the result dict, or
  {"workload", "error"} when it failed."""
  if env is None:  # ours as `rlhf-jax` runs it
    env = allocator_env("library")
  base = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
  p = subprocess.run([sys.executable, os.path.abspath(__file__), f"--one={workload}",
                      f"--steps={steps}", f"--warmup={warmup}",
                      f"--set={json.dumps(overrides or {})}"], capture_output=True,
                     text=True, cwd=REPO, env={**base, **(env or {})})
  lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
  if p.returncode or not lines:
    return dict(workload=workload, error=f"exit {p.returncode}: {p.stderr[-1500:]}")
  return json.loads(lines[-1][len("RESULT "):])


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--workloads", default="sft,dpo,grpo")
  ap.add_argument("--steps", type=int, default=SPEC["TIMED_STEPS"])
  ap.add_argument("--warmup", type=int, default=SPEC["WARMUP_STEPS"])
  ap.add_argument("--out", default="")
  ap.add_argument("--set", default="{}", help='JSON config overrides, e.g. '
                  '\'{"model.d_model": 512}\' (applied after the spec)')
  ap.add_argument("--allocator", default="library", choices=("library", "system", "tcmalloc"),
                  help="library: glibc malloc tuned as `rlhf-jax` runs (rlhf_jax/allocator.py); "
                  "system: glibc defaults; tcmalloc: LD_PRELOAD libtcmalloc_minimal (NOTES.md)")
  ap.add_argument("--one", default="", help=argparse.SUPPRESS)  # worker mode
  args = ap.parse_args(argv)
  if args.warmup < 1:
    raise SystemExit("--warmup must be >= 1 (the first step compiles)")
  if args.one:
    print("RESULT " + json.dumps(run_one(args.one, args.steps, args.warmup,
                                         json.loads(args.set))), flush=True)
    return 0
  results = []
  for w in args.workloads.split(","):
    if w not in ALL:
      raise SystemExit(f"unknown workload {w!r}; expected some of {', '.join(ALL)}")
    t0 = time.perf_counter()
    r = run_ours(w, args.steps, args.warmup, env=allocator_env(args.allocator),
                 overrides=json.loads(args.set))
    results.append(r)
    if r.get("error"):
      print(f"{w}: FAILED\n{r['error']}", file=sys.stderr)
      continue
    extra = (f"  gen {r['generation_share']:.0%}, decode {r['decode_tokens_per_s']:,.0f} tok/s"
             if "generation_share" in r else "")
    tok = f"{r['tokens_per_s']:>8,.0f} tok/s  {r['fraction_of_matmul_peak']:.0%} of matmul peak" \
        if "tokens_per_s" in r else ""
    print(f"{w:<10} {r['seconds_per_step']:.3f} s/step {tok}  RSS {r['peak_rss_mb']:,.0f} MB"
          f"{extra}  ({time.perf_counter() - t0:.0f} s)", flush=True)
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(results, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
