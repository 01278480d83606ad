#!/usr/bin/env bash
# Start a real NDIF server (PyPI ndif 0.1.2) on 127.0.0.1, CPU only, and deploy the models of
# $DEPLOY_FILE. Services: redis-server (queue), moto_server (S3 stand-in), a Ray head (with the
# NDIF controller actor and one CPU model actor per model), the API under gunicorn (with its
# queue dispatcher). Each runs in its own session (setsid): its PID, written to
# $RUN_DIR/pids/<name>.pid, is also the id of the session that down.sh stops. Exit 0 = every
# model is deployed and the API answers. On failure it stops what it started and exits 1.
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/env.sh"
READY_TIMEOUT_S="${READY_TIMEOUT_S:-180}"
PIDS="$RUN_DIR/pids"; LOGS="$RUN_DIR/logs"
mkdir -p "$PIDS" "$LOGS" "$NDIF_HOME" "$HF_HOME" "$RUN_DIR/redis"
t0=$SECONDS
say() { echo "[ndif-up +$((SECONDS - t0))s] $*"; }
started=0
fail() {
  echo "[ndif-up] FAILED: $*" >&2
  echo "[ndif-up] logs in $LOGS" >&2
  if (( started )); then bash "$NDIF_SCRIPTS/down.sh" >&2 || true; fi
  exit 1
}
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
running() { [[ -f "$PIDS/$1.pid" ]] && kill -0 "$(cat "$PIDS/$1.pid")" 2>/dev/null; }
launch() {  # name command...: detached in its own session, PID recorded
  local name=$1; shift
  running "$name" && fail "$name is already running (pid $(cat "$PIDS/$name.pid")): run down.sh first"
  setsid "$@" >"$LOGS/$name.log" 2>&1 </dev/null &
  echo $! >"$PIDS/$name.pid"; started=1
  say "$name started, pid $!"
}
await_port() {  # name port seconds
  local end=$((SECONDS + $3))
  until listening "$2"; do
    running "$1" || { tail -n 20 "$LOGS/$1.log" >&2 || true; fail "$1 exited before listening on port $2"; }
    (( SECONDS < end )) || fail "$1 is not listening on 127.0.0.1:$2 after $3 s"
    sleep 0.2
  done
}

[[ -x "$SRV_VENV/bin/ndif" ]] || fail "no server venv at $SRV_VENV: run scripts/ndif/setup.sh"
command -v redis-server >/dev/null || fail "redis-server is not installed: run scripts/ndif/setup.sh"
[[ -f "$DEPLOY_FILE" ]] || fail "no deploy file $DEPLOY_FILE (see scripts/ndif/deploy.yaml.in)"
for port in "$REDIS_PORT" "$S3_PORT" "$API_PORT" "$RAY_GCS_PORT" "$RAY_CLIENT_PORT" "$RAY_DASHBOARD_PORT"; do
  listening "$port" && fail "port 127.0.0.1:$port is taken"
done

launch redis redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --protected-mode yes \
  --save "" --appendonly no --dir "$RUN_DIR/redis" --daemonize no
launch s3 moto_server -H 127.0.0.1 -p "$S3_PORT"
resources="{\"head\": 10, \"cuda_memory_bytes\": $FAKE_GPU_BYTES, \"cpu_memory_bytes\": $CPU_CACHE_BYTES}"
NDIF_SERVICE=ray launch ray ray start --head --block --node-ip-address=127.0.0.1 \
  --port="$RAY_GCS_PORT" --ray-client-server-port="$RAY_CLIENT_PORT" \
  --num-cpus="$RAY_NUM_CPUS" --num-gpus=1 --resources="$resources" \
  --include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port="$RAY_DASHBOARD_PORT" \
  --temp-dir="$RUN_DIR/ray" --disable-usage-stats
await_port redis "$REDIS_PORT" 30
await_port s3 "$S3_PORT" 60
await_port ray "$RAY_CLIENT_PORT" 120
say "redis, S3 and the Ray head are listening"

# the controller is a detached Ray actor: its launcher returns once it is scheduled
NDIF_SERVICE=ray RAY_ADDRESS="127.0.0.1:$RAY_GCS_PORT" timeout 120 \
  python -m ndif.services.ray.deployments.controller.controller >"$LOGS/controller.log" 2>&1 \
  || fail "the NDIF controller did not launch (see $LOGS/controller.log)"
say "controller launched"

# the API binds to loopback (the command line overrides the config's 0.0.0.0)
NDIF_SERVICE=api launch api gunicorn --config python:ndif.services.api.gunicorn_conf \
  --bind "127.0.0.1:$API_PORT" --graceful-timeout 5 ndif.services.api.app:app
await_port api "$API_PORT" 60
end=$((SECONDS + READY_TIMEOUT_S))
until [[ "$(curl -s -m 5 -o /dev/null -w '%{http_code}' "$NDIF_API_URL/connected" || true)" == 200 ]]; do
  running api || fail "the API exited (see $LOGS/api.log)"
  (( SECONDS < end )) || fail "the API's dispatcher never connected to Ray (GET /connected)"
  sleep 0.5
done
say "API up and connected to Ray"

# deploying in advance is required: ndif 0.1.2 cannot deploy on first request with nnsight 0.8.1
timeout "$READY_TIMEOUT_S" ndif deploy -f "$DEPLOY_FILE" >"$LOGS/deploy.log" 2>&1 \
  || { tail -n 30 "$LOGS/deploy.log" >&2; fail "ndif deploy failed or took over ${READY_TIMEOUT_S} s"; }
say "READY at $NDIF_API_URL"
