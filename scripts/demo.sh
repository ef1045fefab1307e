#!/usr/bin/env bash
# Set up, then run the whole PersLLM method on the example personas (about 35 minutes on a
# 2-core CPU; no step above 7.4 GB of memory). Rerunning resumes. Run from anywhere: bash scripts/demo.sh [key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/persllm pipeline --config configs/demo.yaml "$@"
