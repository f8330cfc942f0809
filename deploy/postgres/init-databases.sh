#!/usr/bin/env bash
# Run once by the postgres image (docker-entrypoint-initdb.d), when its data volume is first
# initialized; it never runs again on an existing volume (change passwords with ALTER ROLE).
#
# One login role and one database each for MLflow and Prefect: each service owns its own
# tables and cannot touch the other's, and neither uses the superuser. Passwords come from
# the environment (.env through docker-compose.yaml), never from this file.
set -euo pipefail

: "${MLFLOW_DB_PASSWORD:?MLFLOW_DB_PASSWORD is not set (see .env.example)}"
: "${PREFECT_DB_PASSWORD:?PREFECT_DB_PASSWORD is not set (see .env.example)}"

# psql variables (:'name') quote the passwords as SQL literals, whatever characters they hold.
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
  -v mlflow_password="$MLFLOW_DB_PASSWORD" -v prefect_password="$PREFECT_DB_PASSWORD" <<'SQL'
CREATE ROLE mlflow LOGIN PASSWORD :'mlflow_password';
CREATE DATABASE mlflow OWNER mlflow;
CREATE ROLE prefect LOGIN PASSWORD :'prefect_password';
CREATE DATABASE prefect OWNER prefect;
-- Prefect's schema needs pg_trgm; created by the superuser so the prefect role needs no
-- extension rights of its own.
\connect prefect
CREATE EXTENSION IF NOT EXISTS pg_trgm;
SQL
