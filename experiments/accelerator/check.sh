#!/usr/bin/env bash
# The accelerator check in one call of at most 8 minutes on a lent H100 / H200: installs the
# project with JAX for CUDA 12 into a venv, then runs experiments/accelerator/check.py, which
# prints one table (attention-backend parity, SFT MFU, decode vs the HBM roofline; the
# README.md beside this file says what every row means).
#
#   bash experiments/accelerator/check.sh [--dry_run] [check.py flags, e.g. --hbm_gbps=3350]
#
#   --dry_run        CPU, tiny shapes, every section end to end, no install: runs with
#                    $CHECK_PYTHON, else .venv/bin/python, else python3 (what the test does)
# Environment:
#   CHECK_PYTHON     run with this Python as it is (no install)
#   CHECK_VENV       the venv to make (default /tmp/rlhf_jax_check_venv; reused when it
#                    already imports jax)
#   CHECK_BUDGET_S   the whole call's budget in seconds, install included (default 470)
#   OUT              if set: $OUT/accelerator_check.json (every row, written as it comes)
#                    and $OUT/accelerator_check.log (this whole output)
#
# Without a reachable package index (an offline machine) it falls back to the machine's own
# python3 and its JAX, with this checkout on PYTHONPATH, and says so.
set -euo pipefail

usage() { sed -n '2,/^set -/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; }
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
BUDGET_S=${CHECK_BUDGET_S:-470}
DRY_RUN=0
for arg in "$@"; do
  case $arg in
    --dry_run) DRY_RUN=1 ;;
    -h | --help) usage; exit 0 ;;
  esac
done
say() { printf '[check.sh %4ds] %s\n' "$SECONDS" "$*" >&2; }

# A Python that imports jax, flax and optax (the check's own needs; the SFT row also wants
# the trainer's, else it runs an equivalent step and says so).
usable() { "$1" -c 'import jax, flax, optax' >/dev/null 2>&1; }

install_venv() {  # $1 = venv dir; returns non-zero when it cannot install
  local venv=$1 base ignore=()
  base=$(command -v python3.11 || command -v python3) || return 1
  if [[ $("$base" -c 'import sys; print(sys.version_info[:2] == (3, 11))') != True ]]; then
    ignore=(--ignore-requires-python)  # pyproject pins 3.11; the pinned wheels exist for others
    say "no python3.11: installing with $("$base" --version 2>&1) and --ignore-requires-python"
  fi
  if ! "$base" -m pip index versions jax --timeout 5 --retries 0 >/dev/null 2>&1; then
    say "no package index reachable from $base (offline?)"
    return 1
  fi
  "$base" -m venv "$venv" || return 1
  say "installing '.[cuda12]' into $venv"
  timeout 300 "$venv/bin/python" -m pip install -q --disable-pip-version-check \
    "${ignore[@]}" -e '.[cuda12]' || return 1
}

if [[ -n ${CHECK_PYTHON:-} ]]; then
  PY=$CHECK_PYTHON
elif [[ $DRY_RUN == 1 ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
else
  VENV=${CHECK_VENV:-/tmp/rlhf_jax_check_venv}
  if usable "$VENV/bin/python" || install_venv "$VENV"; then
    PY=$VENV/bin/python
  else
    PY=python3
    say "install failed: falling back to $(command -v python3) as it is; its JAX is the one measured"
  fi
  usable "$PY" || { say "$PY cannot import jax, flax and optax: nothing to run"; exit 2; }
  export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
  export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/rlhf_jax_check_jax_cache}
fi
say "python: $PY ($("$PY" -c 'import jax; print("jax", jax.__version__)' 2>&1 | tail -1))"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

args=()
limit=0
if [[ $DRY_RUN == 0 ]]; then
  left=$((BUDGET_S - SECONDS))
  if ((left < 90)); then
    say "only ${left}s of the ${BUDGET_S}s budget left after the install: stopping"
    exit 3
  fi
  args=(--budget_s=$((left - 15)))  # check.py's watchdog stops it first, with its rows
  limit=$left
fi
cmd=("$PY" experiments/accelerator/check.py "${args[@]}" "$@")
if ((limit > 0)); then cmd=(timeout -k 5 "$limit" "${cmd[@]}"); fi
if [[ -n ${OUT:-} ]]; then
  mkdir -p "$OUT"
  "${cmd[@]}" 2>&1 | tee "$OUT/accelerator_check.log"
else
  "${cmd[@]}"
fi
say "done"
