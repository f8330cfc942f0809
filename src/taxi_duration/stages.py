"""The pipeline's notebook stages: their names, cache keys, and runners started ahead of their turn."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from taxi_duration import runner, settings, stagecache
from taxi_duration.periods import PipelineParams

STAGES = ("01_explore", "02_features", "03_train")
# What the notebooks import lazily, through the package (plots, scikit-learn, XGBoost, MLflow,
# Prefect's client for the gate's lock):
# a prepared kernel imports these while it waits, besides the notebook's own imports.
KERNEL_PRELOAD = {
    "01_explore": ("matplotlib_inline.backend_inline", "matplotlib.pyplot"),
    "02_features": ("matplotlib_inline.backend_inline", "matplotlib.pyplot", "sklearn.feature_extraction"),
    "03_train": (
        "matplotlib_inline.backend_inline",
        "matplotlib.pyplot",
        "sklearn.feature_extraction",
        "sklearn.metrics",
        "sklearn.pipeline",
        "xgboost",
        "mlflow",
        "mlflow.models",
        "mlflow.xgboost",
        "mlflow.sklearn",
        "prefect.concurrency.sync",
        "prefect.client.orchestration",
    ),
}

Runners = dict[str, runner.PreparedRunner]


def training_parameters(tracking_uri: str, experiment_name: str, registered_model: str | None) -> dict[str, Any]:
    """The parameters 03_train gets besides the run's: where it logs, and which model it registers."""
    return {"tracking_uri": tracking_uri, "experiment_name": experiment_name, "registered_model": registered_model}


def notebook_path(stage: str) -> Path:
    """The parameterized notebook a stage executes (01_explore ... 04_score)."""
    return settings.notebooks_dir() / f"{stage}.ipynb"


def provenance(stages: tuple[str, ...]) -> dict[str, Any]:
    """What code a run executes: the checkout's git commit and each stage notebook's sha256.

    Recorded in run.json, so a comparison can show what changed and a reopened notebook can
    say when the checkout is no longer the code the run ran.
    """
    from taxi_duration import tracking

    return {
        "git_commit": tracking.git_commit(),
        "notebooks": {stage: stagecache.file_sha256(notebook_path(stage)) for stage in stages},
    }


def trip_digests(trip_files: dict[str, str]) -> dict[str, str]:
    """sha256 of each month's file (label -> digest): what the stage keys and the MLflow datasets name."""
    return {label: stagecache.file_sha256(Path(path)) for label, path in trip_files.items()}


def stage_keys(params: PipelineParams, digests: dict[str, str], training: dict[str, Any]) -> dict[str, str]:
    """Cache keys: notebook bytes, the parameters that matter, input file digests, upstream keys."""
    train_digest = digests[params.train_month.label()]
    validation_digest = digests[params.validation_month.label()]
    period = {"year": params.year, "month": params.month, "color": params.color}
    notebook = {stage: notebook_path(stage) for stage in STAGES}
    keys = {
        "01_explore": stagecache.stage_key("01_explore", notebook["01_explore"], period, {"train": train_digest}, {}),
        "02_features": stagecache.stage_key(
            "02_features", notebook["02_features"], period, {"train": train_digest, "validation": validation_digest}, {}
        ),
    }
    # Training reads only what 02_features wrote; where it logs (store, experiment) matters
    # too, since a reuse does not log the model again.
    keys["03_train"] = stagecache.stage_key(
        "03_train", notebook["03_train"], training, {}, {"02_features": keys["02_features"]}
    )
    return keys


def start_runners(to_execute: tuple[str, ...] | list[str]) -> Runners:
    """Runners for the stages that will execute, started now: their kernels boot and import meanwhile.

    The flow starts them only for a month whose files are local and small enough for its
    kernels to run side by side (taxi_duration.orchestration.pipeline); otherwise each stage
    starts its own when its turn comes.
    """
    runners: Runners = {}
    try:
        for stage in to_execute:
            runners[stage] = runner.PreparedRunner(notebook_path(stage), preload=KERNEL_PRELOAD[stage])
    except BaseException:
        close_runners(runners)
        raise
    return runners


def close_runners(runners: Runners) -> None:
    """Close every runner (stopping its child and kernel if they still run)."""
    for prepared in runners.values():
        prepared.close()
