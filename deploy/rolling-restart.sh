#!/usr/bin/env bash
# Restart (or reload) rerankctl replicas one at a time, each back to /ready before the next goes down.
#   deploy/rolling-restart.sh [--reload] RUN_DIR[:HEALTH_PORT] ...
# With nginx in front (deploy/nginx/rerankctl.conf) no request fails: a draining replica answers 503 and
# nginx retries another. --reload swaps each replica's model generation without stopping it at all.
set -euo pipefail
RERANKCTL=${RERANKCTL:-rerankctl}
mode=restart
if [ "${1:-}" = "--reload" ]; then mode=reload; shift; fi
[ $# -gt 0 ] || { echo "usage: $0 [--reload] RUN_DIR[:HEALTH_PORT] ..." >&2; exit 2; }
for replica in "$@"; do
  run_dir=${replica%%:*}
  port=${replica#*:}
  [ "$port" = "$replica" ] && port=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["health_port"])' "$run_dir/rerankctl.pid.json")
  echo "== $mode $run_dir"
  RERANKER_RUN_DIR=$run_dir "$RERANKCTL" "$mode"
  for _ in $(seq 1 600); do   # up to 60 s for it to answer correctly again
    if curl -fsS "http://127.0.0.1:$port/ready" >/dev/null 2>&1; then break; fi
    sleep 0.1
  done
  curl -fsS "http://127.0.0.1:$port/ready" >/dev/null || { echo "$run_dir did not come back" >&2; exit 1; }
done
echo "all replicas done"
