#!/usr/bin/env bash
# Set up (or reuse) .venv and run the test suite (ruff, then pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/ndif/setup.sh   # the local NDIF server the remote tests start (redis-server, .ndif/srv)
.venv/bin/ruff check xlens_align tests benchmarks analyses
exec .venv/bin/python -m pytest -q -ra "$@"
