"""Metric sinks behind one writer: metrics.jsonl, TensorBoard and (optional) Weights &
Biases, the latter in its offline mode (no network): every numeric value reaches the
W&B run log, one W&B run per workdir continued on resume, a clear error without the
package."""
import glob
import json
import os
import sys
import time

import pytest
from ml_collections import ConfigDict

from rlhf_jax import config as config_lib
from rlhf_jax import metrics as metrics_lib


def _cfg(project="rlhf-jax-test", mode="offline"):
  c = config_lib.base_config("sft")
  c.logging.update(wandb_project=project, wandb_mode=mode)
  return c


@pytest.fixture(autouse=True)
def _quiet_wandb(monkeypatch):
  monkeypatch.setenv("WANDB_SILENT", "true")
  monkeypatch.delenv("WANDB_MODE", raising=False)


def _run_log(workdir, run_id, needles, timeout=90.0) -> bytes:
  """The bytes of the W&B offline run logs once they hold every needle (wandb-core writes
  the log asynchronously; finish() can return before the last records are on disk)."""
  deadline = time.time() + timeout
  while True:
    # offline-run-<time>-<id>; a resumed run started within the same second as the
    # previous one gets offline-run-<time>-<id>-1 (seen on CI, 2026-12-04)
    files = glob.glob(os.path.join(workdir, "wandb", f"offline-run-*-{run_id}*",
                                   f"run-{run_id}*.wandb"))
    log = b"".join(open(f, "rb").read() for f in files)
    if (files and all(n in log for n in needles)) or time.time() > deadline:
      return log
    time.sleep(0.2)


def test_no_project_means_no_extra_sink(tmp_path):
  assert metrics_lib.config_sinks(_cfg(project=""), str(tmp_path)) == []
  c = config_lib.base_config("sft")
  config_lib.validate(c)
  c.logging.wandb_mode = "sometimes"
  with pytest.raises(config_lib.ConfigError, match="logging.wandb_mode"):
    config_lib.validate(c)


def test_wandb_offline_gets_every_numeric_value_and_resumes_the_same_run(tmp_path):
  wd = str(tmp_path)
  c = _cfg()
  sinks = metrics_lib.config_sinks(c, wd)
  assert [type(s).__name__ for s in sinks] == ["WandbSink"]
  w = metrics_lib.MetricsWriter(wd, 0, extra_sinks=sinks)
  w.write(1, {"loss": 0.3333333333333333, "tag": "x"})
  w.write(2, {"loss": 0.2857142857142857, "grad_norm": 1.5})
  w.close()
  run_id = sinks[0].run_id
  assert open(os.path.join(wd, metrics_lib.WANDB_ID_FILE)).read().strip() == run_id
  needles = (b"loss", b"grad_norm", b"0.3333333333333333", b"0.2857142857142857",
             b"rlhf-jax-test")
  log = _run_log(wd, run_id, needles)
  for needle in needles:
    assert needle in log, needle
  rows = metrics_lib.read_jsonl(os.path.join(wd, "metrics.jsonl"))
  assert [r["step"] for r in rows] == [1, 2] and rows[0]["tag"] == "x"
  # resume at step 2: the same W&B run id continues
  sinks2 = metrics_lib.config_sinks(c, wd)
  assert sinks2[0].run_id == run_id
  w2 = metrics_lib.MetricsWriter(wd, 2, extra_sinks=sinks2)
  w2.write(3, {"loss": 0.1234567890123})
  w2.close()
  log = _run_log(wd, run_id, (b"0.1234567890123",))
  assert b"0.1234567890123" in log, (  # what W&B wrote, if the value is missing
      sorted(glob.glob(os.path.join(wd, "wandb", "*", "*"))), len(log))


def test_missing_wandb_package_is_one_clear_error(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
  with pytest.raises(RuntimeError, match=r"logging.wandb_project='rlhf-jax-test' needs the "
                                         r"wandb package: pip install 'rlhf_jax\[wandb\]'"):
    metrics_lib.config_sinks(_cfg(), str(tmp_path))


def test_a_sink_is_anything_with_write_and_close(tmp_path):
  class Memory:
    def __init__(self):
      self.rows, self.closed = [], False

    def write(self, step, row):
      self.rows.append((step, dict(row)))

    def close(self):
      self.closed = True

  m = Memory()
  w = metrics_lib.MetricsWriter(str(tmp_path), 0, extra_sinks=[m])
  w.write(5, {"loss": 2.0})
  w.close()
  assert m.rows == [(5, {"step": 5, "loss": 2.0})] and m.closed
  disabled = Memory()
  w = metrics_lib.MetricsWriter(str(tmp_path / "other"), 0, enabled=False, extra_sinks=[disabled])
  w.write(1, {"loss": 1.0})
  assert disabled.rows == []
  assert json.loads(open(tmp_path / "metrics.jsonl").read())["loss"] == 2.0
  assert isinstance(config_lib.base_config("sft").logging, ConfigDict)
