# Environment of the local NDIF stack (sourced by up.sh / down.sh). Every value may be set by the
# caller: the pytest fixture and xlens_align.remote.local.LocalServer pick free ports and a
# temporary RUN_DIR so several stacks (and the developer's own) never collide.
NDIF_SCRIPTS="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
NDIF_REPO="$(cd "$NDIF_SCRIPTS/../.." && pwd)"
SRV_VENV="${SRV_VENV:-$NDIF_REPO/.ndif/srv}"
RUN_DIR="${RUN_DIR:-$NDIF_REPO/.ndif/run}"      # pid files, logs, Ray's temp dir
DEPLOY_FILE="${DEPLOY_FILE:-$RUN_DIR/deploy.yaml}"

REDIS_PORT="${REDIS_PORT:-6379}"
S3_PORT="${S3_PORT:-9000}"
API_PORT="${API_PORT:-8001}"
RAY_GCS_PORT="${RAY_GCS_PORT:-6385}"
RAY_CLIENT_PORT="${RAY_CLIENT_PORT:-10001}"
RAY_DASHBOARD_PORT="${RAY_DASHBOARD_PORT:-8265}"
# The NDIF controller places models only on a node with a "GPU" resource and sizes them against
# the custom resource cuda_memory_bytes: the CPU head advertises one logical GPU of 16 GiB.
FAKE_GPU_BYTES="${FAKE_GPU_BYTES:-17179869184}"
CPU_CACHE_BYTES="${CPU_CACHE_BYTES:-8589934592}"
RAY_NUM_CPUS="${RAY_NUM_CPUS:-4}"               # logical: the controller + one per model actor

export PATH="$SRV_VENV/bin:$PATH"
# the CPU model actor must be importable by Ray's workers, which inherit the raylet's environment
export PYTHONPATH="$NDIF_SCRIPTS/pylib"

export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0      # else Ray swaps 127.0.0.1 for eth0's address
export RAY_USAGE_STATS_ENABLED=0
export GRPC_ENABLE_FORK_SUPPORT=0
export RAY_DEDUP_LOGS=0
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0  # else SIGTERM drains the node for 30 s

export NDIF_HOME="$RUN_DIR/ndif-home"
export NDIF_REDIS_URL="redis://127.0.0.1:$REDIS_PORT"
export NDIF_RAY_ADDRESS="ray://127.0.0.1:$RAY_CLIENT_PORT"
export NDIF_OBJECT_STORE_URL="http://127.0.0.1:$S3_PORT"
export NDIF_OBJECT_STORE_ACCESS_KEY="${NDIF_OBJECT_STORE_ACCESS_KEY:-local}"
export NDIF_OBJECT_STORE_SECRET_KEY="${NDIF_OBJECT_STORE_SECRET_KEY:-local}"
export NDIF_API_URL="http://127.0.0.1:$API_PORT"
export NDIF_API_PORT="$API_PORT"
export NDIF_DEFAULT_DTYPE=float32
export NDIF_DEFAULT_MODEL_ACTOR_CLASS=xlens_cpu_actor.CPUModelActor
export NDIF_CONTROLLER_SYNC_INTERVAL_S=30
# no NDIF_POSTGRES_URL: no API keys are checked; no telemetry URLs: no telemetry
unset NDIF_POSTGRES_URL

export HF_HOME="$RUN_DIR/hf"
export HF_HUB_OFFLINE=1
export TRANSFORMERS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false
