"""A pipeline run's inputs, resolved and checked once; its run values; and the plan of its stages.

`resolve_request` is the one place that turns what a user gave (the command line's arguments,
or a deployment run's parameters) into a `RunRequest`: a frozen, typed value holding the
month, the data source, where MLflow records the run, the registry entry and `force`. Bad
input fails there, with a message that names it. `run_values` is the one place that builds
what the training run offers its stages (each gets those its parameters cell declares).
`plan_stages` then decides, once per run and the same way for any pipeline, what each stage
receives (checked against its parameters cell before any kernel starts), its cache key, how
many notebooks may run at once, and which stages execute rather than being reused.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from taxi_duration import runner, settings
from taxi_duration.data import tripfiles
from taxi_duration.data.periods import Month, PipelineParams
from taxi_duration.orchestration import declarations, lost_server, stage_cache
from taxi_duration.orchestration.declarations import Stage

TRAINING = "training"  # the pipeline (notebooks/pipeline.yaml) a RunRequest runs
# run_dir and mlflow_run_id before the MLflow run exists: locations, so the keys do not depend on them.
NOT_YET = "(not created yet)"

T = TypeVar("T")
R = TypeVar("R")


class Request(Protocol):
    @property
    def flow_parameters(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class RunRequest:
    """Everything a pipeline run needs before it starts, checked."""

    params: PipelineParams
    source: tripfiles.TripSource
    tracking_uri: str
    experiment: str
    registered_model: str | None
    force: bool
    timeout_seconds: int
    overlap_max_trips: int
    pipeline: tuple[Stage, ...]  # the training stages, as notebooks/pipeline.yaml declares them
    tune_trials: int = 0  # trials of the hyperparameter search; 0: no search (a stage declared `when: tune_trials`)
    tune_workers: int = 1  # trials at a time
    tune_seed: int = settings.DEFAULT_TUNE_SEED
    dask: bool = False  # trials on a local Dask cluster
    dask_address: str | None = None  # trials on the Dask scheduler there

    @property
    def stages(self) -> tuple[Stage, ...]:
        """The stages this run has: the declared ones less those whose `when` value it leaves off."""
        return declarations.in_run(self.pipeline, run_values(self, {}))

    @property
    def months(self) -> dict[str, Month]:
        """The months the run reads, by role (stages.MONTH_ROLES)."""
        return {"train": self.params.train_month, "validation": self.params.validation_month}

    @property
    def flow_parameters(self) -> dict[str, Any]:
        """The pipeline flow's parameters that ask for this run, as Prefect shows and records them."""
        return {
            "year": self.params.year,
            "month": self.params.month,
            "color": self.params.color,
            "data_source": self.source.location,
            "experiment": self.experiment,
            "force": self.force,
            "registered_model": self.registered_model,
            "tune_trials": self.tune_trials,
            "tune_workers": self.tune_workers,
            "tune_seed": self.tune_seed,
            "dask": self.dask,
            "dask_address": self.dask_address,
        }


def resolve_request(
    year: int | str | None,
    month: int | str | None,
    color: str = "green",
    data_source: str | None = None,
    experiment: str | None = None,
    force: bool = False,
    registered_model: str | None = settings.DEFAULT_REGISTERED_MODEL,
    tune_trials: int = 0,
    tune_workers: int | None = None,
    tune_seed: int = settings.DEFAULT_TUNE_SEED,
    dask: bool = False,
    dask_address: str | None = None,
) -> RunRequest:
    """The run these inputs ask for; InvalidParameterError, TripDataError or ValueError naming what is wrong.

    `tune_trials` > 0 adds the hyperparameter search, `tune_workers` trials at a time (None:
    $TAXI_TUNE_WORKERS, else the cores), in local processes, on a local Dask cluster (`dask`) or
    on the scheduler at `dask_address`.

    With year and month both None (the scheduled deployment, or `--latest`), the newest month
    whose data and following month the source has published.
    """
    if tune_trials < 0:
        raise ValueError(f"tune_trials must be 0 (no search) or more, got {tune_trials}")
    workers = settings.tune_workers() if tune_workers is None else tune_workers
    if workers < 1:
        raise ValueError(f"tune_workers must be at least 1, got {workers}")
    if dask and dask_address:
        raise ValueError("dask starts a local Dask cluster and dask_address uses an existing one: choose one")
    source = tripfiles.trip_source(data_source)
    tripfiles.check_source_location(source.location)
    if year is None and month is None:
        from taxi_duration.orchestration import schedule

        newest = schedule.newest_trainable_month(source.location, color)
        print(f"No month given: training on {newest}, the newest month with its following month published")
        year, month = newest.year, newest.month
    return RunRequest(
        params=PipelineParams.parse(year, month, color),
        source=source,
        tracking_uri=settings.tracking_uri(),
        experiment=settings.experiment_name(experiment),
        registered_model=registered_model,
        force=force,
        timeout_seconds=settings.notebook_timeout_seconds(),
        overlap_max_trips=settings.overlap_max_trips(),
        pipeline=declarations.pipeline(TRAINING),
        tune_trials=tune_trials,
        tune_workers=workers,
        tune_seed=tune_seed,
        dask=dask,
        dask_address=dask_address or None,
    )


@dataclass(frozen=True)
class _Handed:
    request: object
    owned: lost_server.OwnedRun


_handed: contextvars.ContextVar[_Handed | None] = contextvars.ContextVar("taxi_handed_request", default=None)


def call_flow(flow: Callable[..., T], request: Request, owned: lost_server.OwnedRun) -> T:
    """Run `flow` once for a request the command line has resolved and checked already.

    Prefect records the run under the flow's own name and with its usual parameters
    (`request.flow_parameters`); its body takes `request` as it is (`handed_request`) instead
    of resolving those parameters again, and records in `owned` where its MLflow run got to.
    Raises lost_server.PrefectServerLost when the Prefect server stops answering.
    """
    token = _handed.set(_Handed(request, owned))
    try:
        return lost_server.run_flow(flow, request.flow_parameters, owned)
    finally:
        _handed.reset(token)


def handed_request(kind: type[R]) -> tuple[R, lost_server.OwnedRun] | None:
    """The request `call_flow` handed the flow starting now, and its OwnedRun; None when called otherwise."""
    handed = _handed.get()
    if handed is None or not isinstance(handed.request, kind):
        return None
    _handed.set(None)  # taken: a flow this one calls resolves its own parameters
    return handed.request, handed.owned


def run_values(
    request: RunRequest, trip_files: Mapping[str, str], run_dir: str = NOT_YET, mlflow_run_id: str = NOT_YET
) -> dict[str, Any]:
    """What a training run offers its stages; each gets the values its parameters cell declares.

    `trip_files`: the months' local, validated files by role; each becomes `<role>_file`.
    """
    params = request.params
    return {
        "year": params.year,
        "month": params.month,
        "color": params.color,
        "data_source": request.source.location,
        "data_dir": str(request.source.cache_dir),
        **{f"{role}_file": path for role, path in trip_files.items()},
        "run_dir": run_dir,
        "mlflow_run_id": mlflow_run_id,
        "tracking_uri": request.tracking_uri,
        "experiment_name": request.experiment,
        "registered_model": request.registered_model,
        "tune_trials": request.tune_trials,
        "tune_workers": request.tune_workers,
        "tune_seed": request.tune_seed,
        "dask": request.dask,
        "dask_address": request.dask_address,
    }


@dataclass(frozen=True)
class StagePlan:
    """What a run does with its stages, decided from its run values and its (local) trip files."""

    stages: tuple[Stage, ...]  # the run's (declarations.in_run), each after its upstream
    keys: dict[str, str]  # stage -> cache key
    trip_digests: dict[str, str]  # month role -> sha256 of its file
    limit: int  # notebooks at once: 2 lets report-only stages run beside others (a small month), 1 none
    reuse: dict[str, stage_cache.CacheEntry]  # stages whose outputs are reused, and from where

    @property
    def to_execute(self) -> tuple[Stage, ...]:
        """The stages that run, in pipeline order."""
        return tuple(stage for stage in self.stages if stage.name not in self.reuse)


def plan_stages(
    pipeline: tuple[Stage, ...], values: Mapping[str, Any], trip_files: Mapping[str, str], force: bool, max_trips: int
) -> StagePlan:
    """The plan of `pipeline` for a run offering `values`, given its months' local files (role -> path).

    Every stage's parameters are checked against its parameters cell here, before any kernel
    starts (runner.NotebookParameterError). Two notebooks may run at once when the first month
    has at most `max_trips` trips (settings.overlap_max_trips: two kernels on a bigger month
    need more memory than a modest machine has).
    """
    pipeline = declarations.in_run(pipeline, values)
    digests = declarations.trip_digests(trip_files)
    keys: dict[str, str] = {}
    for stage in pipeline:
        received = runner.stage_parameters(stage.notebook, values, stage.parameters)
        keys[stage.name] = stage_cache.stage_key(stage, received, digests, keys)
    cache = stage_cache.StageCache(settings.stage_cache_dir())
    found = {} if force else {stage.name: cache.lookup(stage.name, keys[stage.name]) for stage in pipeline}
    first_month = next(iter(trip_files.values()))
    return StagePlan(
        stages=pipeline,
        keys=keys,
        trip_digests=digests,
        limit=2 if tripfiles.trip_count(Path(first_month)) <= max_trips else 1,
        reuse={stage: entry for stage, entry in found.items() if entry is not None},
    )


def plan(request: RunRequest, trip_files: Mapping[str, str]) -> StagePlan:
    """The training pipeline's plan for `request`, given its months' local files (role -> path)."""
    return plan_stages(
        request.pipeline,
        run_values(request, trip_files),
        trip_files,
        request.force,
        request.overlap_max_trips,
    )


def local_trip_files(request: RunRequest) -> dict[str, str] | None:
    """The months' files by role if all are already on this machine (not yet validated), else None."""
    files = {role: request.source.local_copy(request.params.color, month) for role, month in request.months.items()}
    if None in files.values():
        return None
    return {role: str(path) for role, path in files.items()}
