#!/usr/bin/env bash
# Stop what up.sh started, by the PIDs in $RUN_DIR/pids only (never by process name). Each PID
# leads its own session, so a service is every live process of that session: SIGTERM the leader,
# then the rest of the session, then SIGKILL whatever is left after the grace period.
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/env.sh"
PIDS="$RUN_DIR/pids"
LEADER_GRACE_S="${LEADER_GRACE_S:-3}"
GRACE_S="${GRACE_S:-8}"
session() { ps -o pid=,stat= -s "$1" 2>/dev/null | awk '$2 !~ /^Z/ {print $1}'; }
wait_empty() {  # sid seconds
  local end=$((SECONDS + $2))
  while [[ -n "$(session "$1")" ]] && (( SECONDS < end )); do sleep 0.2; done
  [[ -z "$(session "$1")" ]]
}
stop() {
  local name=$1 file="$PIDS/$1.pid" sid left
  [[ -f $file ]] || return 0
  sid=$(cat "$file")
  if [[ -n "$(session "$sid")" ]]; then
    kill -TERM "$sid" 2>/dev/null
    if ! wait_empty "$sid" "$LEADER_GRACE_S"; then
      left=$(session "$sid"); [[ -n $left ]] && kill -TERM $left 2>/dev/null
      if ! wait_empty "$sid" "$GRACE_S"; then
        left=$(session "$sid"); [[ -n $left ]] && kill -KILL $left 2>/dev/null
        wait_empty "$sid" 10 || { echo "[ndif-down] $name (session $sid) still has: $(session "$sid" | xargs)"; return 1; }
      fi
    fi
    echo "[ndif-down] $name stopped (session $sid)"
  fi
  rm -f "$file"
}
rc=0
for name in "${@:-api ray s3 redis}"; do
  for one in $name; do stop "$one" || rc=1; done
done
exit $rc
