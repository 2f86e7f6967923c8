#!/usr/bin/env bash
# PRM on real GSM8K step labels, then 4 GRPO steps with PRM rewards (tiny, CPU).
# Usage: bash experiments/prm/run.sh [RUNS_DIR]   (default runs/prm)
set -euo pipefail
R=${1:-runs/prm}
mkdir -p "$R"
rlhf-jax train --config=configs/prm.py:tiny --workdir="$R/prm"
# A tiny policy (SFT on 1-digit addition) whose completions the PRM scores.
rlhf-jax train --config=configs/sft.py:tiny --workdir="$R/sft" \
  --config.data.synthetic_task=add --config.data.synthetic_max_len=2 \
  --config.num_steps=60 --config.eval_every=0
SPEC='[{"name": "prm", "workdir": "'"$R/prm"'", "aggregate": "min"},
 {"name": "prm", "workdir": "'"$R/prm"'", "stat": "num_steps", "label": "prm_num_steps", "weight": 0},
 {"name": "prm", "workdir": "'"$R/prm"'", "stat": "step_mean", "label": "prm_step_mean", "weight": 0},
 {"name": "prm", "workdir": "'"$R/prm"'", "stat": "step_min", "label": "prm_step_min", "weight": 0},
 {"name": "prm", "workdir": "'"$R/prm"'", "stat": "frac_wrong", "label": "prm_frac_wrong", "weight": 0}]'
rlhf-jax train --config=configs/grpo.py:tiny --workdir="$R/grpo" --config.init_from="$R/sft" \
  --config.reward.spec="$SPEC" --config.num_steps=4 --config.log_every=1 --config.eval_every=0
