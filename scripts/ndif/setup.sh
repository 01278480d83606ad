#!/usr/bin/env bash
# Install what a local NDIF server needs, idempotently:
#   * redis-server (Debian package) when it is not on PATH;
#   * the server's own virtual environment ($SRV_VENV, default .ndif/srv, ignored by git): the
#     pinned dependencies as wheels only (a source build of numpy 2.5 fails on Python 3.11), then
#     ndif itself without its dependencies (ndif 0.1.2 declares Python >= 3.12 but runs on 3.11).
# The client side (nnsight) is a dependency of xlens-align and lives in .venv.
# Safe to run again: it reinstalls only when this script or the requirements changed.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
SRV_VENV="${SRV_VENV:-$ROOT/.ndif/srv}"
PY=${PYTHON:-python3}

if ! command -v redis-server >/dev/null 2>&1; then
  echo "[ndif-setup] installing redis-server (apt-get)"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends redis-server >/dev/null
  command -v redis-server >/dev/null || { echo "[ndif-setup] redis-server still missing" >&2; exit 1; }
fi

stamp="$SRV_VENV/.xlens-ndif-installed"
want=$(cat "$HERE/setup.sh" "$HERE/server-requirements.txt" | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$SRV_VENV/bin/ndif" ]; then
  exit 0
fi
echo "[ndif-setup] building the server venv $SRV_VENV"
[ -x "$SRV_VENV/bin/python" ] || "$PY" -m venv "$SRV_VENV"
pip() { "$SRV_VENV/bin/python" -m pip "$@"; }
pip install -q --only-binary=:all: -r "$HERE/server-requirements.txt"
pip install -q --no-deps --ignore-requires-python "ndif==0.1.2"
"$SRV_VENV/bin/python" -c "import ndif, nnsight, ray, moto, gunicorn" \
  || { echo "[ndif-setup] the server venv does not import" >&2; exit 1; }
echo "$want" >"$stamp"
echo "[ndif-setup] done"
