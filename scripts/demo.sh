#!/usr/bin/env bash
# Set up, then run the whole PersLLM method on the example personas. Measured on a 2-core CPU:
# 31.4 minutes (set-up 1.8 on a fresh clone, base 0.4, build-data 9.9, sft 3.3, dpo 9.9, eval 5.2,
# export, talk and reload 0.9; another run took 32.7 for the pipeline); peak memory per step at
# most 7.77 GiB (dpo); 6.5 GiB of disk in runs/demo.
# Rerunning resumes. Run from anywhere: bash scripts/demo.sh [key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/persllm pipeline --config configs/demo.yaml "$@"
