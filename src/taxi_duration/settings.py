"""Where things live and which knobs exist.

Every knob is an environment variable with a default that works on a fresh clone, so that
`make run` needs no configuration. Nothing here touches the file system or a service: the
functions only compute values (no side effects at import time).
"""

from __future__ import annotations

import os
from pathlib import Path

TLC_TRIP_DATA_URL = "https://d37ci6vzurychx.cloudfront.net/trip-data"
DEFAULT_EXPERIMENT = "nyc-taxi-duration"
DEFAULT_REGISTERED_MODEL = "nyc-taxi-duration"  # the flow's default; None there registers nothing
DEFAULT_NOTEBOOK_TIMEOUT_SECONDS = 1800


def project_dir() -> Path:
    """The project checkout: `TAXI_PROJECT_DIR`, else the folder holding `src/`."""
    configured = os.environ.get("TAXI_PROJECT_DIR")
    if configured:
        return Path(configured).resolve()
    return Path(__file__).resolve().parents[2]


def notebooks_dir() -> Path:
    """The parameterized notebooks the pipeline executes."""
    return project_dir() / "notebooks"


def project_path(path: str | Path) -> Path:
    """A path a user gave, absolute: a relative one means the project root.

    The same folder whether the flow (started at the root), a kernel in JupyterLab (started in
    `notebooks/`) or papermill run from anywhere reads it; never the process's working directory.
    """
    return (project_dir() / Path(path).expanduser()).resolve()


def data_dir() -> Path:
    """Cache of downloaded trip files: `TAXI_DATA_DIR`, default `<project>/data`."""
    return project_path(os.environ.get("TAXI_DATA_DIR") or "data")


def outputs_dir() -> Path:
    """Executed notebooks and reports: `TAXI_OUTPUTS_DIR`, default `<project>/outputs`."""
    return project_path(os.environ.get("TAXI_OUTPUTS_DIR") or "outputs")


def stage_cache_dir() -> Path:
    """Where stage cache entries live: `TAXI_CACHE_DIR`, default `<outputs>/.stage-cache`."""
    configured = os.environ.get("TAXI_CACHE_DIR")
    return project_path(configured) if configured else outputs_dir() / ".stage-cache"


def data_source() -> str:
    """Where trip files come from: `TAXI_DATA_SOURCE` (URL prefix or folder), default TLC.

    A relative folder means the project root (`data.trip_source` resolves it).
    """
    return os.environ.get("TAXI_DATA_SOURCE") or TLC_TRIP_DATA_URL


def tracking_uri() -> str:
    """MLflow tracking URI: `MLFLOW_TRACKING_URI`, else a SQLite file in the project.

    The default is absolute on purpose: MLflow resolves relative store paths against the
    working directory, which differs between the flow (project root) and a kernel
    (`notebooks/`), and it refuses a bare `./mlruns` file store.
    """
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_dir() / 'mlflow.db'}"


def local_artifact_root() -> Path:
    """Artifact folder used with the embedded SQLite store (`<project>/mlartifacts`)."""
    return project_dir() / "mlartifacts"


def experiment_name(explicit: str | None = None) -> str:
    """`--experiment`, else `MLFLOW_EXPERIMENT_NAME`, else `nyc-taxi-duration`."""
    return explicit or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT


def scoring_experiment_name(explicit: str | None = None) -> str:
    """Where scoring runs go: `--experiment`, else `TAXI_SCORING_EXPERIMENT`, else `<training experiment>-scoring`.

    Apart from training runs, so a scored month's RMSE never competes with validation RMSEs.
    """
    return explicit or os.environ.get("TAXI_SCORING_EXPERIMENT") or f"{experiment_name()}-scoring"


def _whole_number_knob(name: str, default: int, unit: str, minimum: int) -> int:
    """The environment variable `name` as a whole number >= `minimum`; a clear error otherwise."""
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be a whole number of {unit}, got {raw!r}") from None
    if value < minimum:
        bound = "positive" if minimum == 1 else f"{minimum} or more"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def notebook_timeout_seconds() -> int:
    """Wall-clock limit for one notebook: `TAXI_NOTEBOOK_TIMEOUT` seconds, default 1800."""
    return _whole_number_knob("TAXI_NOTEBOOK_TIMEOUT", DEFAULT_NOTEBOOK_TIMEOUT_SECONDS, "seconds", minimum=1)


DEFAULT_OVERLAP_MAX_TRIPS = 1_000_000


def overlap_max_trips() -> int:
    """Largest training month (trips) whose stages may run two notebooks side by side: `TAXI_OVERLAP_MAX_TRIPS`.

    Side by side saves the exploration's time on two cores; above this size the two kernels
    together would need more memory than a modest machine has (about 5 GiB at 3.4 million
    trips), so a bigger month is explored first. 0 never overlaps.
    """
    return _whole_number_knob("TAXI_OVERLAP_MAX_TRIPS", DEFAULT_OVERLAP_MAX_TRIPS, "trips", minimum=0)


LATEST_LOOKBACK_KNOB = "TAXI_LATEST_LOOKBACK_MONTHS"


def latest_lookback_months() -> int:
    """How many training months back a run without YEAR/MONTH asks a URL source: `TAXI_LATEST_LOOKBACK_MONTHS`, default 12.

    A URL source (TLC's site) cannot be listed, so each month's file is asked for in turn;
    a folder source is listed whole and needs no bound.
    """
    return _whole_number_knob(LATEST_LOOKBACK_KNOB, 12, "months", minimum=1)


DEFAULT_TUNE_SEED = 42


def local_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def tune_workers() -> int:
    """Trials of a hyperparameter search at a time: `TAXI_TUNE_WORKERS`, default the cores."""
    return _whole_number_knob("TAXI_TUNE_WORKERS", local_cores(), "worker processes", minimum=1)


def mlflow_workers() -> int:
    """Worker processes of the local MLflow server: `TAXI_MLFLOW_WORKERS`, default 1 (see services)."""
    return _whole_number_knob("TAXI_MLFLOW_WORKERS", 1, "worker processes", minimum=1)


PREFECT_SERVER_MODES = ("local", "ephemeral")


def prefect_server_mode() -> str:
    """Which Prefect server a run uses when PREFECT_API_URL is unset: `TAXI_PREFECT_SERVER`.

    `local` (default): the project's persistent server on 127.0.0.1, started on first use and
    left running (`make services-stop` stops it). `ephemeral`: Prefect's temporary server,
    started and stopped by every run (several seconds each time, no UI afterwards).
    """
    mode = (os.environ.get("TAXI_PREFECT_SERVER") or "local").strip().lower()
    if mode not in PREFECT_SERVER_MODES:
        raise ValueError(f"TAXI_PREFECT_SERVER must be one of {', '.join(PREFECT_SERVER_MODES)}, got {mode!r}")
    return mode


# Defaults for the libraries under us, applied by entry points (flows, CLI) before Prefect is
# imported, because Prefect reads its settings at import. A value the user set wins.
ENVIRONMENT_DEFAULTS = {
    # Several pipelines starting at once on a busy 2-core machine each need longer than
    # Prefect's 20 s to bring up a temporary server.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    # MLflow's own HTTP retries default to 7 with doubling back-off (minutes of silence when
    # the server is down); a few short ones, then a clear error.
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",
    # Prefect's client retries a request 5 times, 2, 4, 8, 16 then 32 s apart (each attempt
    # itself connects up to 4 times over 1.5 s): a server lost mid-run cost a minute per
    # request. Two retries, 2 and 4 s apart: a request to a lost server fails in about 8 s,
    # and a busy one has time to answer (a Prefect server on SQLite answers 503 while another
    # write holds the database: with one retry, months of a backfill starting together failed).
    "PREFECT_CLIENT_MAX_RETRIES": "2",
    # XGBoost's OpenMP threads spin while they wait for work. When the cores are shared (two
    # months of a backfill training at once, other work on the machine) the spinning threads
    # starve the ones with work (bench/wait_policy.py measures it). Sleeping instead changes
    # when threads wait, not what they compute.
    "OMP_WAIT_POLICY": "PASSIVE",
    # A model download (the gate, scoring, a comparison) would draw a progress bar per file.
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    # The package's own warnings (download retries) show in the Prefect UI's run logs.
    "PREFECT_LOGGING_EXTRA_LOGGERS": "taxi_duration",
    # ...and outside a flow run (notebooks, tests) they just go to stderr, without a warning.
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
    # Telemetry off: nothing to phone home to offline.
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    # The ephemeral Prefect server started per run would otherwise check for UI updates.
    "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
}


def apply_environment_defaults() -> None:
    """Set ENVIRONMENT_DEFAULTS unless the user already chose otherwise."""
    for key, value in ENVIRONMENT_DEFAULTS.items():
        os.environ.setdefault(key, value)
