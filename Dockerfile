# The pipeline image: what the Prefect worker of docker-compose.yaml runs flows in (and what
# registers the deployment of prefect.yaml). Build: `docker compose build prefect-worker`.
#
# One install path, as `make env` takes it: uv, pinned, from the package index, then a hashed
# lock installed exactly. Here it is requirements/runtime.txt: what the pipeline, its flows and
# the worker need, without JupyterLab or the test tools.
FROM python:3.11-slim

# The same uv as `make env` (Makefile's UV_VERSION; a unit test checks they agree).
ARG UV_VERSION=0.13.9

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    UV_NO_CACHE=1 \
    TAXI_PROJECT_DIR=/app \
    VIRTUAL_ENV=/app/.venv \
    PATH=/app/.venv/bin:$PATH

# XGBoost's wheel loads the system OpenMP runtime, which the slim image lacks.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app

# uv goes into the image's own Python, outside the environment it builds: syncing the runtime
# lock (which does not name uv) would otherwise remove it.
RUN pip install uv==${UV_VERSION}
# Dependencies from the lock alone, so this heavy layer is rebuilt only when the lock changes.
COPY requirements/runtime.txt requirements/
RUN python -m venv /app/.venv && uv pip sync --require-hashes requirements/runtime.txt

# Editable, like `make env`: settings.project_dir() then resolves to /app (where notebooks/,
# flows/ and prefect.yaml are), as in a checkout. TAXI_PROJECT_DIR above says the same.
COPY pyproject.toml README.md ./
COPY src/ src/
RUN uv pip install --no-deps -e .

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
