#!/usr/bin/env bash
# Prepares one node of an LD3 Ray cluster: Python environment, this repository's packages, and ~/.ld3_env,
# the environment every later shell and Ray process of the node reads. The cluster launcher runs it on
# every node at each `ray up` (setup_commands of ray_cluster.yaml and ray_cluster.local.yaml); it is
# idempotent. Settings, as environment variables on the command line in the cluster YAML:
#   LD3_STORAGE       required: shared state that every node reaches at the same address, an S3 prefix
#                     (s3://bucket/ld3) or a folder every node mounts at the same path (NFS)
#   LD3_VENV          the virtualenv of every command and Ray process (default ~/ld3-venv, created if missing)
#   LD3_INSTALL       yes (default): install this repository with its model extras and Ray into LD3_VENV,
#                     pinned by constraints.txt; no: LD3_VENV already has them (nothing is downloaded)
#   LD3_MLFLOW_PORT   port of the MLflow tracking server on the head (default 5000)
#   MLFLOW_BACKEND_STORE_URI  the server's database (default SQLite in ~/mlflow on the head)
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
: "${LD3_STORAGE:?set LD3_STORAGE in the setup command of the cluster YAML (an s3:// prefix or a shared folder)}"
venv=${LD3_VENV:-$HOME/ld3-venv}
venv=${venv/#\~/$HOME}

make_venv() {
  if ! python3 -c 'import ensurepip' 2>/dev/null; then
    sudo apt-get -o DPkg::Lock::Timeout=600 update -q
    sudo apt-get -o DPkg::Lock::Timeout=600 install -y -q python3-venv
  fi
  python3 -m venv "$venv"
}

append_once() {  # append_once LINE FILE: add LINE to FILE unless it is already there
  grep -qxF "$1" "$2" 2>/dev/null || echo "$1" >> "$2"
}

test -x "$venv/bin/python" || make_venv
if [ "${LD3_INSTALL:-yes}" = yes ]; then
  "$venv/bin/python" -m pip install -q -U pip
  "$venv/bin/python" -m pip install -q -c "$repo/constraints.txt" "$repo[models]" "ray[default]"
fi

# Workers get the head's address from the launcher ($RAY_HEAD_IP); the head asks Ray for its own.
head_ip=${RAY_HEAD_IP:-$("$venv/bin/python" -c 'import ray.util; print(ray.util.get_node_ip_address())')}
mlflow_port=${LD3_MLFLOW_PORT:-5000}
{
  printf 'export PYTHONPATH=%q\n' "$repo"  # the synced checkout is the code every node runs
  printf 'export LD3_STORAGE=%q\n' "$LD3_STORAGE"
  printf 'export LD3_CACHE_DIR=%q\n' "$LD3_STORAGE/teacher-cache"
  printf 'export LD3_STORAGE_DIR=%q\n' "$LD3_STORAGE/ray_results"
  printf 'export LD3_MLFLOW_PORT=%q\n' "$mlflow_port"
  printf 'export MLFLOW_BACKEND_STORE_URI=%q\n' "${MLFLOW_BACKEND_STORE_URI:-sqlite:///$HOME/mlflow/mlflow.db}"
  printf 'export MLFLOW_TRACKING_URI=%q\n' "http://$head_ip:$mlflow_port"
} > ~/.ld3_env.part
mv ~/.ld3_env.part ~/.ld3_env  # atomic: a broken write never leaves a half file behind

append_once "source $venv/bin/activate" ~/.bashrc
append_once 'source ~/.ld3_env' ~/.bashrc
