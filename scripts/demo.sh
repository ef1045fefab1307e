#!/usr/bin/env bash
# Set up, then run the whole PersLLM method on the example personas. Measured on a 2-core CPU:
# 34.5 minutes (set-up 1.8, base 0.5, build-data 12.0, sft 3.6, dpo 10.3, eval 5.3, export, talk and
# reload 1.0); peak memory per step at most 7.42 GiB (dpo); 6.5 GiB of disk in runs/demo.
# Rerunning resumes. Run from anywhere: bash scripts/demo.sh [key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/persllm pipeline --config configs/demo.yaml "$@"
