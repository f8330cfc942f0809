# The MLflow tracking server of docker-compose.yaml: MLflow, the PostgreSQL driver and every
# shared dependency at the versions of requirements.lock (a constraints file: it pins what
# is installed without installing the rest of the lock), plus boto3 for the S3 (MinIO)
# artifact store. A client newer than its server can call endpoints the server lacks, so
# server and pipeline move together when the lock changes. Nothing of the pipeline is here.
FROM python:3.11-slim

# Not in the lock (the pipeline never talks to S3 itself: the server proxies artifacts).
ARG BOTO3_VERSION=1.44.8

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    DO_NOT_TRACK=true

COPY requirements.lock /tmp/requirements.lock
# psycopg 3 is the driver named in docker-compose.yaml's postgresql+psycopg:// URI.
RUN pip install -c /tmp/requirements.lock mlflow "psycopg[binary]" "boto3==${BOTO3_VERSION}" \
    && rm /tmp/requirements.lock

RUN useradd --create-home --uid 10001 mlflow
USER mlflow
WORKDIR /home/mlflow

EXPOSE 5000
# The command (stores, hosts, workers) is set in docker-compose.yaml.
CMD ["mlflow", "server", "--help"]
