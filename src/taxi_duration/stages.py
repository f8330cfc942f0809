"""The pipeline's notebook stages: their cache keys, and their runners started ahead.

No Prefect and no MLflow here, on purpose: the command line (flows/pipeline.py) starts the
stages' kernels with this module *before* it imports Prefect and MLflow. Those imports
take about 1.4 s of one core on a 2-core machine; the kernels boot and import on the other
core meanwhile, and the flow takes the runners over when it reaches them (`runners_for`).
"""

from __future__ import annotations

import atexit
import threading
from pathlib import Path
from typing import Any

from taxi_duration import data, notebooks, settings, stagecache
from taxi_duration.periods import PipelineParams

STAGES = ("01_explore", "02_features", "03_train")
# What the notebooks import lazily, through the package (plots, scikit-learn, XGBoost, MLflow):
# a prepared kernel imports these while it waits, besides the notebook's own imports.
KERNEL_PRELOAD = {
    "01_explore": ("matplotlib_inline.backend_inline", "matplotlib.pyplot"),
    "02_features": ("matplotlib_inline.backend_inline", "matplotlib.pyplot", "sklearn.feature_extraction"),
    "03_train": ("matplotlib_inline.backend_inline", "matplotlib.pyplot", "sklearn.feature_extraction",
                 "sklearn.metrics", "xgboost", "mlflow", "mlflow.models", "mlflow.xgboost"),
}

Runners = dict[str, notebooks.PreparedRunner]


def training_parameters(tracking_uri: str, experiment_name: str, registered_model: str | None) -> dict[str, Any]:
    """The parameters 03_train gets besides the run's: where it logs, and which model it registers."""
    return {"tracking_uri": tracking_uri, "experiment_name": experiment_name, "registered_model": registered_model}


def stage_keys(params: PipelineParams, trip_files: dict[str, str], training: dict[str, Any]) -> dict[str, str]:
    """Cache keys: notebook bytes, the parameters that matter, input file digests, upstream keys."""
    train_digest = stagecache.file_sha256(Path(trip_files[params.train_month.label()]))
    validation_digest = stagecache.file_sha256(Path(trip_files[params.validation_month.label()]))
    period = {"year": params.year, "month": params.month, "color": params.color}
    notebook = {stage: settings.notebooks_dir() / f"{stage}.ipynb" for stage in STAGES}
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


def prepare_runners(params: PipelineParams, source: data.TripSource, training: dict[str, Any], force: bool) -> Runners:
    """Runners for the stages that will execute, started now; none unless the month is small.

    Only when both months' files are already local (their digests give the stage keys, so
    reused stages get no kernel) and the training month is small enough for its kernels to
    run side by side (settings.overlap_max_trips); otherwise each stage starts its own.
    """
    files = {month.label(): source.local_copy(params.color, month) for month in (params.train_month, params.validation_month)}
    if None in files.values():
        return {}
    try:
        if data.trip_count(files[params.train_month.label()]) > settings.overlap_max_trips():
            return {}
        keys = stage_keys(params, {label: str(path) for label, path in files.items()}, training)
    except Exception:  # noqa: BLE001 - fetch-trip-files validates the files and says what is wrong
        return {}
    cache = stagecache.StageCache(settings.stage_cache_dir())
    runners: Runners = {}
    try:
        for stage in STAGES:
            if force or cache.lookup(stage, keys[stage]) is None:
                runners[stage] = notebooks.PreparedRunner(
                    settings.notebooks_dir() / f"{stage}.ipynb", preload=KERNEL_PRELOAD[stage]
                )
    except BaseException:
        close_runners(runners)
        raise
    return runners


def close_runners(runners: Runners) -> None:
    """Close every runner (stopping its child and kernel if they still run)."""
    for runner in runners.values():
        runner.close()


# Runners the command line started before the flow existed, with what they were started for.
_ahead: tuple[tuple, Runners] | None = None
_ahead_lock = threading.Lock()


def _inputs(params: PipelineParams, source: data.TripSource, training: dict[str, Any], force: bool) -> tuple:
    """What decides which runners a run needs: runners started for other inputs are not used."""
    return (params, source.location, str(source.cache_dir), tuple(sorted(training.items())), force,
            str(settings.stage_cache_dir()), settings.overlap_max_trips())


def _take_ahead() -> tuple[tuple, Runners] | None:
    """The runners started ahead (with their inputs), now no longer kept here; None if none."""
    global _ahead
    with _ahead_lock:
        ahead, _ahead = _ahead, None
    return ahead


def start_runners_ahead(params: PipelineParams, source: data.TripSource, training: dict[str, Any], force: bool) -> None:
    """Start the runners a run with these inputs will need, for `runners_for` to hand over.

    Those not taken over are closed at exit at the latest (and a runner stops by itself when
    this process is gone).
    """
    global _ahead
    close_runners_ahead()
    runners = prepare_runners(params, source, training, force)
    with _ahead_lock:
        _ahead = (_inputs(params, source, training, force), runners)


def runners_for(params: PipelineParams, source: data.TripSource, training: dict[str, Any], force: bool) -> Runners:
    """The runners for a run: those started ahead for exactly these inputs, else new ones.

    Runners started ahead for other inputs (the flow's parameters differ from what the command
    line foresaw) are closed: a runner serves only the notebook and inputs it was started for.
    """
    ahead = _take_ahead()
    if ahead is not None:
        inputs, runners = ahead
        if inputs == _inputs(params, source, training, force):
            return runners
        close_runners(runners)
    return prepare_runners(params, source, training, force)


def close_runners_ahead() -> None:
    """Close the runners started ahead that no run took over."""
    ahead = _take_ahead()
    if ahead is not None:
        close_runners(ahead[1])


atexit.register(close_runners_ahead)
