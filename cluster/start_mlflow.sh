#!/usr/bin/env bash
# Starts (or restarts) the MLflow tracking server on the head of an LD3 Ray cluster: database from
# MLFLOW_BACKEND_STORE_URI, artifacts under $LD3_STORAGE/mlflow-artifacts, proxied so clients need no
# access to the artifact store. Run by head_start_ray_commands before `ray start`, with the environment
# that cluster/setup_node.sh wrote (~/.ld3_env); fails if the server does not answer.
# The server runs in its own process group (its id in ~/mlflow/server.pid), so a restart stops the server
# and its web workers, and so does `kill -- -$(cat ~/mlflow/server.pid)`.
set -euo pipefail
: "${LD3_STORAGE:?~/.ld3_env is missing: cluster/setup_node.sh has not run on this node}"

pid_file=~/mlflow/server.pid
mkdir -p ~/mlflow
if [ -f "$pid_file" ]; then  # the server of the previous `ray up`: stop it and wait until its port is free
  group=$(cat "$pid_file")
  kill -- "-$group" 2>/dev/null || true
  for _ in $(seq 30); do kill -0 -- "-$group" 2>/dev/null || break; sleep 1; done
  kill -KILL -- "-$group" 2>/dev/null || true
  rm -f "$pid_file"
fi

# Host headers the server answers (MLflow refuses others against DNS rebinding; its default, localhost and
# private IPs, misses heads with public addresses): the address in every node's MLFLOW_TRACKING_URI, and
# this machine's own name for the health check below and for a forwarded port.
head=${MLFLOW_TRACKING_URI#*://}
head=${head%%/*}
allowed="$head,${head%:*},localhost:$LD3_MLFLOW_PORT,localhost,127.0.0.1:$LD3_MLFLOW_PORT,127.0.0.1"
setsid mlflow server --backend-store-uri "$MLFLOW_BACKEND_STORE_URI" \
  --artifacts-destination "$LD3_STORAGE/mlflow-artifacts" --allowed-hosts "$allowed" \
  --host 0.0.0.0 --port "$LD3_MLFLOW_PORT" --workers 1 > ~/mlflow/server.log 2>&1 < /dev/null &
echo $! > "$pid_file"

healthy() { curl -sf "http://127.0.0.1:$LD3_MLFLOW_PORT/health" > /dev/null; }
for _ in $(seq 90); do healthy && break; sleep 2; done
if ! healthy; then
  echo "MLflow server did not start; ~/mlflow/server.log ends with:" >&2
  tail -n 20 ~/mlflow/server.log >&2
  exit 1
fi
