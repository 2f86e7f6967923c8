#!/usr/bin/env bash
# Install the peer libraries in their OWN virtual environments (never project
# dependencies): TRL (PyTorch, CPU build) and Tunix (JAX), at the versions the
# issue's reference figures were taken with.
#
#   bash experiments/throughput/setup_peers.sh [PEERS_DIR]   # default .peers/
#
# PEERS_DIR/trl/bin/python and PEERS_DIR/tunix/bin/python are then used by
# experiments/throughput/peers.py. Re-running is a no-op once both are installed.
set -euo pipefail
cd "$(dirname "$0")/../.."
PEERS="${1:-.peers}"
PY="${PYTHON:-python3.11}"
TRL_PINS=(torch==2.13.0 trl==1.16.0)
TUNIX_PINS=(google-tunix==0.1.7 jax==0.10.2 jaxlib==0.10.2)

install() {  # install NAME PINS...
  local name="$1"; shift
  local venv="$PEERS/$name" stamp="$PEERS/$name/.installed"
  if [[ -f "$stamp" ]] && [[ "$(cat "$stamp")" == "$*" ]]; then
    echo "$name: already installed ($*)"; return
  fi
  echo "$name: installing $* into $venv"
  "$PY" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q "$@"
  echo "$*" > "$stamp"
}

install trl "${TRL_PINS[@]}"
install tunix "${TUNIX_PINS[@]}"
"$PEERS/trl/bin/python" -c "import torch, trl, transformers; print('trl', trl.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
"$PEERS/tunix/bin/python" -c "import jax, tunix; from importlib.metadata import version as v; print('tunix', v('google-tunix'), 'jax', jax.__version__, 'flax', v('flax'))"
