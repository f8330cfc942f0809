#!/usr/bin/env bash
# postStartCommand of devcontainer.json: the MLflow tracking server of docker-compose.yaml
# (with its PostgreSQL and MinIO) on http://127.0.0.1:5000, forwarded by Codespaces, as in a
# team deployment. The Prefect server, worker and deploy step are not started here: in the
# dev container flows run from .venv (`make run`, `make serve`; `.venv/bin/prefect server
# start` for a UI on 4200). `docker compose up -d` starts the whole stack when wanted.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 .devcontainer/write_dev_env.py

# The docker-in-docker feature starts its daemon with the container; give it a moment.
for _ in $(seq 60); do
  docker info > /dev/null 2>&1 && break
  sleep 1
done
if ! docker info > /dev/null 2>&1; then
  echo "start-mlflow: no Docker daemon after 60 s; MLflow not started (retry: bash .devcontainer/start-mlflow.sh)" >&2
  exit 1
fi

# --wait: return once MLflow (and what it depends on) is healthy, or fail naming the service.
docker compose up -d --wait mlflow
echo "MLflow: http://127.0.0.1:5000 (MLFLOW_TRACKING_URI is set to it in this container)"
