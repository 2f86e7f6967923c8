"""rlhf-jax re-executes itself once with glibc malloc tuned for XLA:CPU (allocator.py)."""
import os
import subprocess
import sys

import pytest

from rlhf_jax import allocator

# Runs at every interpreter start (the original and any re-exec): one line per start.
SITECUSTOMIZE = ("import os, sys\n"
                 "print('START', os.environ.get('MALLOC_ARENA_MAX'), flush=True)\n")


def test_tuned_env_applies_only_on_glibc_linux_without_user_settings():
  base = {"PATH": "/bin"}
  tuned = lambda env, libc="glibc", system="linux", acc=False: allocator.tuned_env(
      env, libc, system, acc)
  assert tuned(base) == {**base, **allocator.TUNED, allocator.MARKER: "1"}
  assert int(allocator.TUNED["MALLOC_MMAP_MAX_"]) == 0
  assert tuned(base, libc="") is None                                   # musl / unknown
  assert tuned(base, system="darwin") is None
  assert tuned({**base, "RLHF_JAX_MALLOC": "system"}) is None           # opted out
  assert tuned({**base, allocator.MARKER: "1"}) is None                 # re-executed already
  assert tuned({**base, "MALLOC_ARENA_MAX": "4"}) is None               # the user's own
  assert tuned({**base, "LD_PRELOAD": "/usr/lib/libtcmalloc_minimal.so.4"}) is None
  assert tuned(base, acc=True) is None                                  # GPU/TPU host
  assert tuned({**base, "JAX_PLATFORMS": "cpu"}, acc=True) is not None  # ... forced to CPU


def test_only_the_cli_process_is_reexecuted():
  py = sys.executable
  assert allocator._is_cli_process([py, "-m", "rlhf_jax.launch", "train"])
  assert allocator._is_cli_process([py, "/venv/bin/rlhf-jax", "sweep", "x.py"])
  assert not allocator._is_cli_process([py, "-c", "from rlhf_jax.launch import cli; cli()"])
  assert not allocator._is_cli_process([py, "my_script.py"])


def _run(tmp_path, extra):
  (tmp_path / "sitecustomize.py").write_text(SITECUSTOMIZE)
  env = {k: v for k, v in os.environ.items()
         if not k.startswith("MALLOC_") and k not in ("RLHF_JAX_MALLOC", allocator.MARKER,
                                                      "LD_PRELOAD")}
  env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
  p = subprocess.run([sys.executable, "-m", "rlhf_jax.launch", "no-such-command"],
                     capture_output=True, text=True, env={**env, **extra}, timeout=120)
  return p, [ln for ln in p.stdout.splitlines() if ln.startswith("START")]


@pytest.mark.skipif(allocator.tuned_env({}) is None,
                    reason="the tuned allocator does not apply on this host "
                           "(not Linux + glibc, or an accelerator host)")
def test_cli_reexecs_once_with_the_tuned_environment(tmp_path):
  p, starts = _run(tmp_path, {})
  assert starts == ["START None", "START 1"], p.stdout + p.stderr  # original, then re-exec
  assert p.returncode == 2 and "unknown command 'no-such-command'" in p.stderr


def test_cli_does_not_reexec_when_opted_out(tmp_path):
  p, starts = _run(tmp_path, {"RLHF_JAX_MALLOC": "system"})
  assert starts == ["START None"], p.stdout + p.stderr
  assert p.returncode == 2


RELEASE = """
import numpy as np
from rlhf_jax import allocator
def rss():
  return int([l for l in open('/proc/self/status') if l.startswith('VmRSS')][0].split()[1]) * 1024
a = [np.ones(2 ** 20, np.float32) for _ in range(64)]  # 256 MB in 1 MB blocks on the heap
b = np.ones(2 ** 20, np.float32)  # allocated last: the heap's top is not free
held = rss()
del a
kept = rss()
released = allocator.release_free_memory()
print(held, kept, rss(), released)
"""


@pytest.mark.skipif(sys.platform != "linux" or allocator.platform.libc_ver()[0] != "glibc",
                    reason="glibc only")
def test_release_free_memory_gives_back_what_the_tuned_settings_keep():
  """Under the tuned settings freed blocks stay in RSS (also below the heap's top);
  `release_free_memory` hands them back once."""
  from conftest import REPO
  env = {**os.environ, **allocator.TUNED, "PYTHONPATH": str(REPO)}
  out = subprocess.run([sys.executable, "-c", RELEASE], env=env, capture_output=True,
                       text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  held, kept, after, released = out.stdout.split()
  held, kept, after = int(held), int(kept), int(after)
  assert kept > held - 50e6                      # freed, but still resident
  assert released == "True" and after < kept - 200e6  # given back
