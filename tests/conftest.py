"""Shared test settings: where the real data lives.

Real data (../shared/data beside the repo; RLHF_JAX_DATA overrides the
directory) is optional for a user's clone -- tests that need it skip with the
reason -- but always present on CI (CI=true), where its absence fails.
"""
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("RLHF_JAX_DATA", REPO.parent / "shared" / "data"))
ON_CI = os.environ.get("CI", "").lower() == "true"

# XLA:CPU compiling faster: the suite's time is mostly the compilation of small programs.
# LLVM's code generation at -O1 instead of XLA's default -O3 (the same HLO optimisation
# passes; the last bit of a float result can differ, as between two CPUs) takes ~20% less
# CPU time per trainer test; tests that compare runs bitwise run both under the same flags.
# (-O0 would save more but rounds differently enough to move a sampler log-prob by 1.7e-4,
# past test_sampling's 1e-4.) Set before JAX starts its backend; the subprocesses the
# tests start inherit it (`xla_flags` for those that set their own XLA_FLAGS).
# RLHF_JAX_TEST_FAST_COMPILE=0 compiles as users do.
FAST_COMPILE_FLAGS = ("--xla_backend_optimization_level=1"
                      if os.environ.get("RLHF_JAX_TEST_FAST_COMPILE", "1") != "0" else "")
if FAST_COMPILE_FLAGS:
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE_FLAGS}".strip()


def xla_flags(devices: int) -> str:
  """XLA_FLAGS for a subprocess with `devices` simulated CPU devices (+ the fast-compile
  flags)."""
  return f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE_FLAGS}".strip()


# One persistent XLA compilation cache for the whole suite, its xdist workers and the
# training subprocesses the tests start: the same tiny-model step compiled by many tests
# is compiled once (same executable, so results are unchanged). RLHF_JAX_TEST_CACHE=""
# turns it off.
_CACHE = os.environ.get("RLHF_JAX_TEST_CACHE", str(REPO / ".cache" / "jax-tests"))
if _CACHE:
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
  import jax
  jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


class CharTokenizer:
  """A minimal tokenizer independent of the library's: one id per UTF-8 byte, specials 0-2,
  chat template "role: content\\n" ... "assistant: ". For data-pipeline tests."""
  pad_id, bos_id, eos_id = 0, 1, 2
  add_bos = True
  vocab_size = 259

  def encode(self, text):
    return [3 + b for b in text.encode()]

  def decode(self, ids):
    return bytes(i - 3 for i in ids if i >= 3).decode()

  def apply_chat_template(self, messages, add_generation_prompt=True):
    out = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
    return out + ("assistant: " if add_generation_prompt else "")


class NoBosTokenizer(CharTokenizer):
  add_bos = False


def shared_data_file(name: str) -> Path:
  """Path of a file in the shared data dir; skip (user clone) or fail (CI) if absent."""
  path = DATA / name
  if not path.is_file():
    if ON_CI:
      pytest.fail(f"{path} missing on CI (set RLHF_JAX_DATA to the shared data dir)")
    pytest.skip(f"{path} not found; set RLHF_JAX_DATA to the shared data directory")
  return path


def read_metrics(workdir):
  """The rows of WORKDIR/metrics.jsonl."""
  import json
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="session")
def tfds_data_dir(tmp_path_factory):
  """One TFDS data_dir for the whole session: data sets built once, reused."""
  return str(tmp_path_factory.mktemp("tfds"))


def override(config, **over):
  """Set dotted keys on a ConfigDict: override(c, **{"grpo.variant": "dapo"})."""
  for key, value in over.items():
    node = config
    *path, leaf = key.split(".")
    for p in path:
      node = node[p]
    node[leaf] = value
  return config


@pytest.fixture(scope="session")
def sft_add_run(tmp_path_factory):
  """A short SFT run on 1-digit addition (~25% greedy accuracy): the starting policy
  (and reference) of the online-RL tests. Made once per test session: under xdist the
  first worker that needs it trains it (in this session's shared temporary directory,
  under a lock) and the others read it; tests only read it."""
  import fcntl

  from rlhf_jax.launch import load_config
  from rlhf_jax.trainers import sft
  if os.environ.get("PYTEST_XDIST_WORKER"):  # .../pytest-N/popen-gwK: share pytest-N
    root = tmp_path_factory.getbasetemp().parent
  else:
    root = tmp_path_factory.mktemp("shared")
  wd, done = root / "sft_add", root / "sft_add.done"
  with open(root / "sft_add.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
    if not done.exists():
      c = load_config("configs/sft.py:tiny")
      c.data.update(synthetic_task="add", synthetic_max_len=2)
      c.update(num_steps=60, eval_every=0)
      c.checkpoint.async_save = False
      sft.run(c, str(wd))
      done.touch()
  return str(wd)


# Longest files first. `make test` runs pytest-xdist with --dist loadfile
# --no-loadscope-reorder: whole files go to the two workers in collection order, each
# worker taking the next file when it is free; starting with the longest ones (the
# longest-processing-time-first rule) keeps a long file from starting last and running
# alone at the end. Measured per-file times (junit XML, 2026-12-04), slowest first; files
# not listed keep their usual order after these. Refresh with --junitxml when it drifts.
SLOW_FILES_FIRST = (
    "test_grpo_train", "test_preference_train", "test_async_rl", "test_multihost",
    "test_reliability", "test_train", "test_lora", "test_accelerator_check",
    "test_sampling_scale", "test_ppo_train", "test_multiturn", "test_logprobs_chunked",
    "test_attention", "test_bad_inputs", "test_memory_aot", "test_evaluation",
    "test_sharding", "test_gemma3", "test_gemma_trainers", "test_prm", "test_prefix_sharing",
    "test_model_families", "test_length_buckets", "test_sampling", "test_model",
    "test_sampling_continuous", "test_ai_feedback", "test_flops", "test_grad_accum",
    "test_laptop", "test_is_correction", "test_pretrained")


def pytest_collection_modifyitems(session, config, items):
  rank = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: file order kept
