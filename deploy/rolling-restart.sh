#!/usr/bin/env bash
# Restart (or reload) rerankctl replicas one at a time, each back to /ready before the next goes down.
#   deploy/rolling-restart.sh [--reload] RUN_DIR[:HEALTH_PORT] ...
# With nginx in front (deploy/nginx/rerankctl.conf) no request fails, even with a replica already down: a
# draining replica answers 503 and nginx retries another; a replica is never taken down while no other listed
# replica is ready; and after one is back, the script waits RERANKCTL_SETTLE_S (6 s, longer than nginx's
# fail_timeout of 5 s) so that the balancer has taken it back before the next one goes. --reload swaps each
# replica's model generation without stopping it (nothing is refused, so there is nothing to wait out).
set -euo pipefail
RERANKCTL=${RERANKCTL:-rerankctl}
SETTLE=${RERANKCTL_SETTLE_S:-6}
mode=restart
if [ "${1:-}" = "--reload" ]; then mode=reload; shift; fi
[ $# -gt 0 ] || { echo "usage: $0 [--reload] RUN_DIR[:HEALTH_PORT] ..." >&2; exit 2; }

health_port() {  # RUN_DIR[:PORT] -> PORT
  local replica=$1 run_dir=${1%%:*} port=${1#*:}
  if [ "$port" = "$replica" ]; then
    port=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["health_port"])' \
      "$run_dir/rerankctl.pid.json" 2>/dev/null) || port=""
  fi
  echo "$port"
}
ready() { [ -n "$1" ] && curl -fsS --max-time 2 "http://127.0.0.1:$1/ready" >/dev/null 2>&1; }

for replica in "$@"; do
  run_dir=${replica%%:*}
  port=$(health_port "$replica")
  if [ "$mode" = restart ]; then
    others=0
    for other in "$@"; do
      [ "$other" = "$replica" ] && continue
      if ready "$(health_port "$other")"; then others=$((others + 1)); fi
    done
    if [ "$others" -eq 0 ] && [ $# -gt 1 ]; then
      echo "not restarting $run_dir: no other replica is ready, and the balancer would have none" >&2
      exit 1
    fi
  fi
  echo "== $mode $run_dir"
  RERANKER_RUN_DIR=$run_dir "$RERANKCTL" "$mode"
  for _ in $(seq 1 600); do   # up to 60 s for it to answer correctly again
    if ready "$port"; then break; fi
    sleep 0.1
  done
  ready "$port" || { echo "$run_dir did not come back" >&2; exit 1; }
  if [ "$mode" = restart ]; then sleep "$SETTLE"; fi   # the balancer's fail_timeout, passed
done
echo "all replicas done"
