# The MLflow tracking server of docker-compose.yaml: MLflow, the PostgreSQL driver and every
# shared dependency at the versions of requirements/runtime.txt (a constraints file: it pins
# what is installed without installing the rest of the lock), plus boto3 for the S3 (MinIO)
# artifact store. A client newer than its server can call endpoints the server lacks, so
# server and pipeline move together when the lock changes. Nothing of the pipeline is here.
FROM python:3.11-slim

# The same uv as `make env` and the pipeline image.
ARG UV_VERSION=0.13.9
# Not in the lock (the pipeline never talks to S3 itself: the server proxies artifacts).
ARG BOTO3_VERSION=1.44.8

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    UV_NO_CACHE=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    DO_NOT_TRACK=true

COPY requirements/runtime.txt /tmp/runtime.txt
# psycopg 3 is the driver named in docker-compose.yaml's postgresql+psycopg:// URI. uv, not
# pip: hashes in a constraints file put pip in hash-checking mode, which boto3 (not in the
# lock) fails.
RUN pip install uv==${UV_VERSION} \
    && uv pip install --system -c /tmp/runtime.txt mlflow "psycopg[binary]" "boto3==${BOTO3_VERSION}" \
    && rm /tmp/runtime.txt

RUN useradd --create-home --uid 10001 mlflow
USER mlflow
WORKDIR /home/mlflow

EXPOSE 5000
# The command (stores, hosts, workers) is set in docker-compose.yaml.
CMD ["mlflow", "server", "--help"]
