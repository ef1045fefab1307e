#!/usr/bin/env bash
# Set up, then run the whole PersLLM method on the example personas. Measured on a 2-core CPU:
# 34.2 minutes for the pipeline (base 0.3, build-data 5.3, sft 12.7, dpo 7.7, eval 7.6, export, talk
# and reload 0.6), set-up 1.8 more on a fresh clone; peak memory per step at most 7.11 GiB (sft).
# Rerunning resumes. Run from anywhere: bash scripts/demo.sh [key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/persllm pipeline --config configs/demo.yaml "$@"
