#!/usr/bin/env bash
# Set up, then run the whole PersLLM method on the example personas. Measured on a 2-core CPU:
# 34.3 minutes for the pipeline (base 0.5, build-data 3.3, sft 13.5, dpo 9.5, eval 6.6, export, talk
# and reload 0.9), set-up 1.8 more on a fresh clone; peak memory per step at most 7.19 GiB (dpo).
# Rerunning resumes. Run from anywhere: bash scripts/demo.sh [key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/persllm pipeline --config configs/demo.yaml "$@"
