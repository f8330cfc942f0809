# The pipeline image: what the Prefect worker of docker-compose.yaml runs flows in (and what
# registers the deployment of prefect.yaml). Build: `docker compose build prefect-worker`.
#
# One install path: exactly requirements.lock, then the package without dependencies, as
# `make env` does. The lock also holds the test tools and playwright (the Python package
# only; no browser is downloaded here), which the worker never uses; one lock for every
# environment is worth that weight.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TAXI_PROJECT_DIR=/app

# XGBoost's wheel loads the system OpenMP runtime, which the slim image lacks.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app

# Dependencies from the lock alone, so this heavy layer is rebuilt only when the lock changes.
COPY requirements.lock ./
RUN pip install -r requirements.lock

# Editable, like `make env`: settings.project_dir() then resolves to /app (where notebooks/,
# flows/ and prefect.yaml are), as in a checkout. TAXI_PROJECT_DIR above says the same.
COPY pyproject.toml README.md ./
COPY src/ src/
RUN pip install --no-deps -e .

COPY notebooks/ notebooks/
COPY flows/ flows/
COPY prefect.yaml ./

# Runs as an unprivileged user who can write only what runs produce (outputs/, data/; both
# are volumes in docker-compose.yaml) and its home (Jupyter runtime files, caches).
RUN useradd --create-home --uid 10001 pipeline \
    && mkdir -p outputs data \
    && chown pipeline:pipeline outputs data
USER pipeline

# The worker's command (and the deploy step's) is set in docker-compose.yaml.
CMD ["prefect", "version"]
