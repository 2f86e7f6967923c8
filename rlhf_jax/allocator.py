"""glibc malloc settings that keep XLA:CPU's per-step temporaries mapped.

XLA:CPU allocates the temporaries of every execution with malloc and frees them when
it ends. With glibc's defaults, a block above the mmap threshold (at most 32 MB) and
every block of a thread's secondary arena come from fresh mmap'ed pages that are
unmapped again on free, so each training step page-faults its whole working set back
in: ~85k minor faults and ~0.14 s of system time per step of the 4.46M-parameter SFT
benchmark (experiments/throughput/NOTES.md §8). Three glibc tunables keep freed memory
in the process for the next step:

    MALLOC_MMAP_MAX_=0               never serve a request with its own mmap
    MALLOC_TRIM_THRESHOLD_=2**40     never hand the top of the heap back to the OS
    MALLOC_ARENA_MAX=1               one arena (the main heap) for every thread

Measured on the 2-core CPU benchmark (same process, 10 steps): SFT 0.31 -> 0.25 s/step,
page faults 85k -> 1-9k per step -- the gain of preloading tcmalloc, with nothing to
install. The cost: the process keeps its peak heap (RSS does not shrink after a peak)
and threads share one arena lock.

glibc reads these once, when the process starts, so `rlhf-jax` (the console script or
`python -m rlhf_jax.launch`) re-executes itself once with them -- Linux + glibc only, and
not when RLHF_JAX_MALLOC=system, one of them is already set, LD_PRELOAD loads another
allocator (tcmalloc, jemalloc, ...), or the host has a GPU/TPU device node and
JAX_PLATFORMS does not say cpu (there the host does not run the model's math). A marker
variable stops a second re-exec even where the loader drops MALLOC_* (setuid).

What these settings keep is bounded once at start-up: `release_free_memory` (glibc's
malloc_trim, called when a trainer's state is built, `trainers.setup.open_run`) gives
back the pages freed so far -- chiefly the host copy of pretrained weights (4 bytes a
parameter, e.g. 0.54 GB for SmolLM2-135M), which the steps would otherwise carry in RSS.
"""
from __future__ import annotations

import ctypes
import glob
import os
import platform
import sys

TUNED = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2 ** 40),
         "MALLOC_ARENA_MAX": "1"}
OPT_OUT = "RLHF_JAX_MALLOC"  # "system": keep glibc's defaults
MARKER = "RLHF_JAX_MALLOC_REEXEC"  # set in the re-executed process


def accelerator_present() -> bool:
  """A GPU or TPU device node exists on this host (NVIDIA, or /dev/accel* TPUs)."""
  return bool(glob.glob("/dev/nvidia[0-9]*") or glob.glob("/dev/accel[0-9]*"))


def tuned_env(environ=None, libc: str | None = None, system: str | None = None,
              accelerator: bool | None = None):
  """The environment with TUNED added, or None when it does not apply (not Linux/glibc,
  opted out, re-executed already, set by the user, another allocator preloaded, an
  accelerator host not forced onto the CPU)."""
  environ = dict(os.environ if environ is None else environ)
  libc = platform.libc_ver()[0] if libc is None else libc
  system = sys.platform if system is None else system
  if system != "linux" or libc != "glibc":
    return None
  if environ.get(OPT_OUT, "").lower() == "system" or MARKER in environ:
    return None
  if any(k in environ for k in TUNED) or "malloc" in environ.get("LD_PRELOAD", ""):
    return None
  accelerator = accelerator_present() if accelerator is None else accelerator
  if accelerator and environ.get("JAX_PLATFORMS", "").strip().lower() != "cpu":
    return None
  return {**environ, **TUNED, MARKER: "1"}


def _is_cli_process(orig_argv) -> bool:
  """Started as the `rlhf-jax` console script or as `python -m rlhf_jax.launch` (or its
  fault-injecting twin `python -m rlhf_jax.faults`)."""
  args = list(orig_argv[1:])
  if len(args) >= 2 and args[0] == "-m" and args[1] in ("rlhf_jax.launch", "rlhf_jax.faults"):
    return True
  return bool(args) and os.path.basename(args[0]) == "rlhf-jax"


def reexec_with_tuned_malloc() -> None:
  """Replace this process by the same command line with TUNED set (see module doc); a
  no-op when `tuned_env` does not apply or the process is not the CLI itself (a script
  or `python -c` code calling `cli()` is not re-run). Call before anything heavy is
  imported."""
  orig = list(getattr(sys, "orig_argv", [sys.executable] + sys.argv))
  env = tuned_env()
  if env is None or not _is_cli_process(orig):
    return
  argv = [sys.executable] + orig[1:]
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, argv, env)


def release_free_memory() -> bool:
  """Hand the free pages of every malloc arena back to the OS (glibc's malloc_trim(0),
  which also releases whole free pages inside the heap, not only its top); True when
  some were released. A no-op (False) off Linux / glibc. Costs milliseconds, and the next
  allocations there page-fault back in: call it where a phase's temporaries were just
  freed and a larger phase follows (once after start-up; GRPO / PPO before each update,
  < 1% of a SmolLM2 step), not in inner loops."""
  if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
    return False
  try:
    return bool(ctypes.CDLL(None).malloc_trim(0))
  except (OSError, AttributeError):
    return False
