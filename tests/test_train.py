"""End-to-end SFT runs through the CLI: learning, kill-and-resume bitwise equality,
SIGTERM, and refusal of bad inputs without touching existing checkpoints."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from rlhf_jax.checkpoint import read_checkpoint

pytestmark = pytest.mark.slow

FAST = ["--config.num_steps=12", "--config.checkpoint.every=4", "--config.log_every=2",
        "--config.eval_every=6", "--config.sample.every=6", "--config.eval_batches=2",
        "--config.data.synthetic_train_examples=400", "--config.data.synthetic_eval_examples=64",
        "--config.optimizer.warmup_steps=2", "--config.checkpoint.async_save=False"]


def train(workdir, *extra, fault=None, check=True):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("RLHF_JAX_FAULT", None)
  if fault:
    env["RLHF_JAX_FAULT"] = fault
  out = subprocess.run([sys.executable, "-m", "rlhf_jax.faults" if fault else "rlhf_jax.launch", "train",
                        "--config=configs/sft.py:tiny", f"--workdir={workdir}", *FAST, *extra],
                       env=env, capture_output=True, text=True, timeout=600)
  if check:
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
  return out


def metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(l) for l in f]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("ref"))
  train(wd)
  return wd


def test_workdir_contract(reference_run):
  wd = reference_run
  for name in ("config.json", "metrics.jsonl", "samples.jsonl", "model_config.json",
               "tokenizer.model"):
    assert os.path.exists(os.path.join(wd, name)), name
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(wd, "events")))
  cfg = json.load(open(os.path.join(wd, "config.json")))
  assert cfg["num_steps"] == 12 and cfg["trainer"] == "sft"
  rows = metrics(wd)
  steps = [r["step"] for r in rows]
  assert steps == [0, 2, 4, 6, 8, 10, 12]
  for r in rows[1:]:
    for key in ("loss", "learning_rate", "tokens_per_second", "grad_norm", "flops/total",
                "tokens/trained"):
      assert np.isfinite(r[key]), (key, r)
  assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]
  samples = [json.loads(l) for l in open(os.path.join(wd, "samples.jsonl"))]
  assert {s["step"] for s in samples} == {6, 12}
  assert all({"prompt", "completion", "reference"} <= set(s) for s in samples)
  ckpts = sorted(int(d) for d in os.listdir(os.path.join(wd, "checkpoints")) if d.isdigit())
  assert ckpts == [4, 8, 12]  # every 4, keep 3


def test_kill_and_resume_is_bitwise_identical(reference_run, tmp_path):
  wd = str(tmp_path / "killed")
  out = train(wd, fault="10:KILL", check=False)
  assert out.returncode == -signal.SIGKILL, out.stderr[-2000:]
  step, _ = read_checkpoint(os.path.join(wd, "checkpoints"))
  assert step == 8  # steps 9 and 10 were done but lost with the kill
  out = train(wd)
  assert "resumed from step 8" in out.stdout
  s_ref, ref = read_checkpoint(os.path.join(reference_run, "checkpoints"))
  s_res, res = read_checkpoint(os.path.join(wd, "checkpoints"))
  assert s_ref == s_res == 12
  ref_leaves, res_leaves = (jax_leaves(ref), jax_leaves(res))
  assert len(ref_leaves) == len(res_leaves) > 10
  for a, b in zip(ref_leaves, res_leaves):
    assert a.dtype == b.dtype and np.array_equal(a, b)
  # metrics.jsonl reads like one uninterrupted run (steps re-done after the kill not duplicated)
  assert [r["step"] for r in metrics(wd)] == [r["step"] for r in metrics(reference_run)]
  assert [r.get("loss") for r in metrics(wd)] == [r.get("loss") for r in metrics(reference_run)]
  for key in ("flops/total", "tokens/trained"):  # compute counters: cumulative across the resume
    assert [r.get(key) for r in metrics(wd)] == [r.get(key) for r in metrics(reference_run)]


def jax_leaves(tree):
  import jax
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_sigterm_checkpoints_and_exits_cleanly(tmp_path):
  wd = str(tmp_path / "term")
  out = train(wd, fault="6:TERM", check=False)
  assert out.returncode == 75, out.stderr[-3000:]  # rlhf_jax.EXIT_PREEMPTED: re-queue me
  assert "preempted: saved checkpoint at step 6" in out.stdout
  step, _ = read_checkpoint(os.path.join(wd, "checkpoints"))
  assert step == 6
  # A checkpoint from a different model shape is refused, naming the tensor; nothing is lost.
  before = {d: os.stat(os.path.join(wd, "checkpoints", d)).st_mtime_ns
            for d in os.listdir(os.path.join(wd, "checkpoints"))}
  out = train(wd, "--config.model.d_model=48", check=False)
  assert out.returncode == 1
  err = out.stderr.strip().splitlines()[-1]
  assert err.startswith("error: checkpoint ") and "expects" in err and "shape" in err, err
  assert "params/" in err
  after = {d: os.stat(os.path.join(wd, "checkpoints", d)).st_mtime_ns
           for d in os.listdir(os.path.join(wd, "checkpoints"))}
  assert before == after
  assert json.load(open(os.path.join(wd, "config.json")))["model"]["d_model"] == 96
  out = train(wd)  # the right config resumes and finishes
  assert "resumed from step 6" in out.stdout
  assert read_checkpoint(os.path.join(wd, "checkpoints"))[0] == 12


@pytest.mark.parametrize("extra,fragment", [
    (["--config.data.train_path=/nonexistent/train.jsonl"],
     "error: data file not found: /nonexistent/train.jsonl"),
    (["--config.init_from=/nonexistent/model"], "/nonexistent/model"),
    (["--config.data.max_seq_len=8"], "longer than data.max_seq_len=8"),
])
def test_bad_inputs_give_one_clear_message(tmp_path, extra, fragment):
  out = train(str(tmp_path / "w"), *extra, check=False)
  assert out.returncode == 1, out.stderr[-3000:]
  last = out.stderr.strip().splitlines()[-1]
  assert fragment in last, out.stderr[-3000:]
  assert "Traceback" not in out.stderr


def test_malformed_row_names_file_and_line(tmp_path):
  data = tmp_path / "train.jsonl"
  data.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
  out = train(str(tmp_path / "w"), f"--config.data.train_path={data}", check=False)
  assert out.returncode == 1
  assert f"{data}:2: missing key 'completion'" in out.stderr


def test_import_cli_then_finetune_from_it(reference_run, tmp_path):
  """`rlhf-jax import` an HF dir, then SFT with init_from pointing at the import."""
  import jax

  from rlhf_jax.models import ModelConfig, init_params, load_pretrained, save_pretrained
  cfg = ModelConfig(vocab_size=48, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1,
                    head_dim=16, d_ff=64, tie_embeddings=False)
  params = init_params(cfg, jax.random.PRNGKey(3))
  save_pretrained(cfg, params, tmp_path / "hf")
  out = subprocess.run([sys.executable, "-m", "rlhf_jax.launch", "import", str(tmp_path / "hf"),
                        str(tmp_path / "ours")], capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-2000:]
  cfg2, params2 = load_pretrained(tmp_path / "ours")
  assert cfg2 == cfg
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params),
                                                  jax.tree.leaves(params2)))
  # importing onto an existing directory is refused, leaving it intact
  out = subprocess.run([sys.executable, "-m", "rlhf_jax.launch", "import", str(tmp_path / "hf"),
                        str(tmp_path / "ours")], capture_output=True, text=True)
  assert out.returncode == 1 and str(tmp_path / "ours") in out.stderr
  wd = str(tmp_path / "ft")
  train(wd, f"--config.init_from={tmp_path / 'ours'}",
        f"--config.tokenizer.path={os.path.join(reference_run, 'tokenizer.model')}",
        "--config.data.packing=True")  # also runs the packed-rows path end to end
  built = json.load(open(os.path.join(wd, "model_config.json")))
  assert (built["d_model"], built["tie_embeddings"]) == (32, False)  # the imported model
  rows = metrics(wd)
  assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]
