#!/usr/bin/env bash
# Set up (or reuse) .venv and run the main job: `xlens-align demo` on the embedded default models and text.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/xlens-align demo "$@"
