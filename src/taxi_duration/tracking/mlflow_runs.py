"""MLflow helpers shared by the flow (which owns the run) and the training notebook.

Everything goes through `MlflowClient` with an explicit run id instead of MLflow's fluent
"active run": the fluent API ends a run as FINISHED when a process exits, which would let a
notebook kernel close the flow's run before the pipeline has finished.
"""

from __future__ import annotations

import subprocess
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from taxi_duration import settings

if TYPE_CHECKING:
    from types import ModuleType

    import numpy as np
    import pandas as pd
    import scipy.sparse
    import xgboost as xgb
    from mlflow.tracking import MlflowClient
    from sklearn.pipeline import Pipeline


def import_mlflow() -> ModuleType:
    # MLflow imports tqdm.auto, which in a kernel without ipywidgets warns on import;
    # the warning would end up in every training report.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="IProgress not found")
        import mlflow

    return mlflow


def mlflow_client(tracking_uri: str) -> MlflowClient:
    mlflow = import_mlflow()
    _initialize_sqlite_store(tracking_uri, mlflow)
    return mlflow.MlflowClient(tracking_uri=tracking_uri)


_initialized_stores: set[str] = set()


def _initialize_sqlite_store(tracking_uri: str, mlflow: ModuleType) -> None:
    """Create or migrate a SQLite store under a file lock, once per process.

    MLflow creates and migrates its schema on first use; two pipelines doing that at the
    same moment on a new database fail ("table _alembic_tmp_... already exists").
    """
    if tracking_uri in _initialized_stores or not tracking_uri.startswith("sqlite:///"):
        return
    import fcntl

    database = Path(tracking_uri.removeprefix("sqlite:///"))
    database.parent.mkdir(parents=True, exist_ok=True)
    with open(database.with_name(database.name + ".init-lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            # The store creates and migrates the schema when it is first built.
            mlflow.MlflowClient(tracking_uri=tracking_uri).search_experiments(max_results=1)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    _initialized_stores.add(tracking_uri)


def artifact_location_for(tracking_uri: str) -> str | None:
    """Where a new experiment keeps artifacts when MLflow would otherwise pick `./mlruns`.

    Database stores default to a folder relative to the working directory, so the flow and a
    kernel would scatter artifacts in two places; a SQLite store keeps them beside its file.
    A tracking server decides for itself (None).
    """
    scheme = urlparse(tracking_uri).scheme
    if scheme in ("http", "https", "databricks") or tracking_uri == "databricks":
        return None
    if scheme == "sqlite":
        database = Path(tracking_uri.removeprefix("sqlite:///"))
        if database.is_absolute():
            return (database.parent / "mlartifacts").as_uri()
    return settings.local_artifact_root().as_uri()


def ensure_experiment(tracking_uri: str, name: str) -> str:
    """Id of experiment `name`, created (with a stable artifact location) if needed."""
    client = mlflow_client(tracking_uri)
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            raise ValueError(f"MLflow experiment {name!r} is deleted; restore it or choose another name")
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location_for(tracking_uri))
    except MlflowException:
        # Another pipeline created it between our look-up and create.
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def start_run(tracking_uri: str, experiment: str, run_name: str, params: dict[str, Any], tags: dict[str, str]) -> str:
    """Create a RUNNING run with its parameters and tags; return its id."""
    run = mlflow_client(tracking_uri).create_run(
        ensure_experiment(tracking_uri, experiment), run_name=run_name, tags=tags
    )
    log_params(tracking_uri, run.info.run_id, params)
    return run.info.run_id


def set_tags(tracking_uri: str, run_id: str, tags: dict[str, str]) -> None:
    client = mlflow_client(tracking_uri)
    from mlflow.entities import RunTag

    client.log_batch(run_id, tags=[RunTag(key, str(value)) for key, value in tags.items()])


def finish_run(tracking_uri: str, run_id: str, status: str) -> None:
    """Set the run's final status: FINISHED, FAILED or KILLED."""
    mlflow_client(tracking_uri).set_terminated(run_id, status=status)


def log_params(tracking_uri: str, run_id: str, params: dict[str, Any]) -> None:
    client = mlflow_client(tracking_uri)
    from mlflow.entities import Param

    client.log_batch(run_id, params=[Param(key, str(value)) for key, value in params.items()])


def log_metrics(tracking_uri: str, run_id: str, metrics: dict[str, float]) -> None:
    import time

    client = mlflow_client(tracking_uri)
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(key, float(value), now, 0) for key, value in metrics.items()])


def log_files(tracking_uri: str, run_id: str, paths: Iterable[Path], artifact_path: str) -> None:
    """Archive local files under `artifact_path/` of the run.

    MLflow retries a failing upload itself (MLFLOW_HTTP_REQUEST_MAX_RETRIES); when it gives
    up, say which file, where it still is, and which server refused it.
    """
    client = mlflow_client(tracking_uri)
    for path in paths:
        try:
            client.log_artifact(run_id, str(path), artifact_path=artifact_path)
        except Exception as error:  # MlflowException, requests errors: all mean "not archived"
            raise TrackingUnavailableError(
                f"could not archive {Path(path).name} in MLflow run {run_id} at {tracking_uri} after retries "
                f"({type(error).__name__}: {str(error)[:300]}). The file is kept at {path}; "
                "rerun once the tracking server is healthy (finished stages are reused)."
            ) from error


def git_commit(directory: Path | None = None) -> str | None:
    """The checkout's HEAD commit, or None outside a git checkout."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=directory or settings.project_dir(),
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if result.returncode != 0:
        return None
    return result.stdout.strip() or None


def model_pip_requirements() -> list[str]:
    """Exact requirements of the logged model, given so MLflow need not infer them (slow).

    XGBoost is named as the CPU-only `xgboost-cpu` where it is published (Linux, Windows) and
    as `xgboost` on macOS, where that build is CPU-only already: an environment built from
    these requirements loads the model on any of them without CUDA libraries.
    """
    from importlib.metadata import PackageNotFoundError, version

    try:
        xgboost_version = version("xgboost-cpu")
    except PackageNotFoundError:
        xgboost_version = version("xgboost")
    # skops: the servable model is saved in its format (mlflow.sklearn's default), not as a pickle.
    exact = [f"{name}=={version(name)}" for name in ("mlflow", "scikit-learn", "scipy", "numpy", "pandas", "skops")]
    return [
        *exact,
        f"xgboost-cpu=={xgboost_version}; sys_platform != 'darwin'",
        f"xgboost=={xgboost_version}; sys_platform == 'darwin'",
    ]


def log_xgboost_model(
    tracking_uri: str,
    run_id: str,
    booster: xgb.Booster,
    input_example_matrix: scipy.sparse.csr_matrix,
    predictions: np.ndarray,
) -> str:
    """Log the booster as `model` with a signature on the given run; return the model URI."""
    import_mlflow()  # first, so its warning filter covers the imports below
    import mlflow
    import mlflow.xgboost
    from mlflow.models import infer_signature

    mlflow.set_tracking_uri(tracking_uri)
    # MLflow 3 files the LoggedModel under the fluent "current" experiment, not the run's:
    # without this it lands in "Default" when the run was passed in by id.
    mlflow.set_experiment(experiment_id=mlflow_client(tracking_uri).get_run(run_id).info.experiment_id)
    signature = infer_signature(input_example_matrix, predictions)
    info = mlflow.xgboost.log_model(
        booster,
        name="model",
        signature=signature,
        pip_requirements=model_pip_requirements(),
        run_id=run_id,
    )
    return info.model_uri


SERVABLE_MODEL_NAME = "servable_model"
# The training month's profile (taxi_duration.modeling.drift) travels in the servable model's metadata,
# so scoring a later month can measure drift without fetching the training month again.
TRAINING_PROFILE_KEY = "taxi_training_profile"


def log_servable_model(
    tracking_uri: str, run_id: str, pipeline: Pipeline, example: pd.DataFrame, training_profile: dict[str, Any]
) -> str:
    """Log the raw-trips Pipeline (taxi_duration.serving) on the run; return its model URI.

    It carries this package as code, so it loads wherever its pip requirements are installed.
    """
    import_mlflow()
    import mlflow
    import mlflow.sklearn

    import taxi_duration
    from taxi_duration import serving

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(experiment_id=mlflow_client(tracking_uri).get_run(run_id).info.experiment_id)
    info = mlflow.sklearn.log_model(
        pipeline,
        name=SERVABLE_MODEL_NAME,
        signature=serving.model_signature(pipeline.predict(example)),
        input_example=example,
        pip_requirements=model_pip_requirements(),
        code_paths=[str(Path(taxi_duration.__file__).parent)],
        metadata={TRAINING_PROFILE_KEY: training_profile},
        # skops loads only the types it is told to trust: besides scikit-learn's, these.
        skops_trusted_types=list(serving.SKOPS_TRUSTED_TYPES),
        run_id=run_id,
    )
    return info.model_uri


def experiment_id_of(tracking_uri: str, run_id: str) -> str:
    return mlflow_client(tracking_uri).get_run(run_id).info.experiment_id


def previous_best(tracking_uri: str, run_id: str, color: str, validation_month: str) -> dict[str, Any] | None:
    """The best finished run of the same experiment, colour and validation month (not `run_id`).

    Same validation month means same data, so the RMSEs are comparable.
    """
    client = mlflow_client(tracking_uri)
    experiment_id = client.get_run(run_id).info.experiment_id
    runs = client.search_runs(
        [experiment_id],
        filter_string=(
            f"tags.`taxi.color` = '{color}' and tags.`taxi.validation_month` = '{validation_month}' "
            "and attributes.status = 'FINISHED'"
        ),
        order_by=["metrics.rmse ASC"],
        max_results=50,
    )
    for run in runs:
        if run.info.run_id != run_id and "rmse" in run.data.metrics:
            return {"run_id": run.info.run_id, "rmse": run.data.metrics["rmse"], "run_name": run.info.run_name}
    return None


class TrackingUnavailableError(RuntimeError):
    """The MLflow tracking server cannot be reached."""


def check_reachable(tracking_uri: str, timeout_seconds: float = 10.0, attempts: int = 3) -> None:
    """Fail early, and clearly, when a tracking server is down, before any run is created.

    Local stores (SQLite, files) need no check. A server gets a few tries of its /health
    endpoint, a second apart.
    """
    if urlparse(tracking_uri).scheme not in ("http", "https"):
        return
    import time

    import requests

    last_problem = ""
    for attempt in range(attempts):
        try:
            response = requests.get(f"{tracking_uri.rstrip('/')}/health", timeout=timeout_seconds)
            if response.status_code == 200:
                return
            last_problem = f"HTTP {response.status_code}"
        except requests.RequestException as error:
            last_problem = f"{type(error).__name__}: {error}"
        if attempt + 1 < attempts:
            time.sleep(1.0)
    raise TrackingUnavailableError(
        f"the MLflow tracking server at {tracking_uri} did not answer its health check after {attempts} tries "
        f"({last_problem}). Start it, fix MLFLOW_TRACKING_URI, or unset it to track into the project's SQLite store."
    )


def process_tags() -> dict[str, str]:
    """Who is running this pipeline: lets a later start tell a live run from an orphan."""
    import os
    import socket

    return {
        "taxi.host": socket.gethostname(),
        "taxi.pid": str(os.getpid()),
        "taxi.pid_started": str(_process_start(os.getpid())),
    }


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (from /proc), to detect pid reuse."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            # Field 22; the command name (field 2) may hold spaces, so split after its ')'.
            return stat.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def mark_orphaned_runs_killed(tracking_uri: str, experiment: str) -> list[str]:
    """Mark KILLED the RUNNING runs of this host whose pipeline process is gone (SIGKILL, OOM, reboot).

    Only runs started by this host's pipelines (tagged taxi.host) are judged; a run from
    another machine, or from a process that is still alive, is left alone.
    """
    import os
    import socket

    client = mlflow_client(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    host = socket.gethostname()
    runs = client.search_runs(
        [found.experiment_id],
        filter_string=f"attributes.status = 'RUNNING' and tags.`taxi.host` = '{host}'",
        max_results=200,
    )
    killed = []
    for run in runs:
        pid = run.data.tags.get("taxi.pid", "")
        started = run.data.tags.get("taxi.pid_started")
        alive = pid.isdigit() and os.path.exists(f"/proc/{pid}") and str(_process_start(int(pid))) == str(started)
        if alive:
            continue
        client.set_tag(
            run.info.run_id,
            "taxi.killed_reason",
            f"pipeline process {pid or '?'} on {host} was gone when a later pipeline started",
        )
        client.set_terminated(run.info.run_id, status="KILLED")
        killed.append(run.info.run_id)
    return killed


def running_runs_of_this_process(tracking_uri: str, experiment: str) -> list[Any]:
    """The runs of `experiment` this very process started (by its process_tags) that are still RUNNING."""
    client = mlflow_client(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    mine = " and ".join(f"tags.`{key}` = '{value}'" for key, value in process_tags().items())
    return client.search_runs([found.experiment_id], f"attributes.status = 'RUNNING' and {mine}", max_results=50)
