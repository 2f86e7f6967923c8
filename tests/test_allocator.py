"""rlhf-jax re-executes itself once with glibc malloc tuned for XLA:CPU (allocator.py)."""
import os
import subprocess
import sys

import pytest

from rlhf_jax import allocator

PROBE = ("import os, sys; print('ARENA', os.environ.get('MALLOC_ARENA_MAX'), flush=True); "
         "sys.argv = ['rlhf-jax', 'no-such-command']; from rlhf_jax.launch import cli; cli()")


def test_tuned_env_applies_only_on_glibc_linux_without_user_settings():
  base = {"PATH": "/bin"}
  env = allocator.tuned_env(base, "glibc", "linux")
  assert env == {**base, **allocator.TUNED}
  assert allocator.tuned_env(base, "", "linux") is None          # musl / unknown libc
  assert allocator.tuned_env(base, "glibc", "darwin") is None
  assert allocator.tuned_env({**base, "RLHF_JAX_MALLOC": "system"}, "glibc", "linux") is None
  assert allocator.tuned_env({**base, "MALLOC_ARENA_MAX": "4"}, "glibc", "linux") is None
  tc = {**base, "LD_PRELOAD": "/usr/lib/libtcmalloc_minimal.so.4"}
  assert allocator.tuned_env(tc, "glibc", "linux") is None
  assert int(allocator.TUNED["MALLOC_MMAP_MAX_"]) == 0


def _probe(**extra):
  env = {k: v for k, v in os.environ.items()
         if not k.startswith("MALLOC_") and k != "RLHF_JAX_MALLOC"}
  p = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                     env={**env, **extra}, timeout=120)
  return p, [ln for ln in p.stdout.splitlines() if ln.startswith("ARENA")]


@pytest.mark.skipif(allocator.tuned_env({}) is None, reason="not Linux + glibc")
def test_cli_reexecs_once_with_the_tuned_environment():
  p, lines = _probe()
  assert lines == ["ARENA None", "ARENA 1"], p.stdout + p.stderr  # original, then re-exec
  assert p.returncode == 2 and "unknown command 'no-such-command'" in p.stderr


def test_cli_does_not_reexec_when_opted_out():
  p, lines = _probe(RLHF_JAX_MALLOC="system")
  assert lines == ["ARENA None"], p.stdout + p.stderr
  assert p.returncode == 2
