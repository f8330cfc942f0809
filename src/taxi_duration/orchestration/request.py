"""A pipeline run's inputs, resolved and checked once, and the plan of its stages.

`resolve_request` is the one place that turns what a user gave (the command line's arguments,
or a deployment run's parameters) into a `RunRequest`: a frozen, typed value holding the
month, the data source, where MLflow records the run, the registry entry and `force`. Bad
input fails there, with a message that names it. `plan` then decides, once per run, each
stage's cache key, whether 01_explore runs beside 02_features, and which stages execute
rather than being reused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from taxi_duration import data, settings, stagecache, stages
from taxi_duration.periods import Month, PipelineParams

STAGES = stages.STAGES


@dataclass(frozen=True)
class RunRequest:
    """Everything a pipeline run needs before it starts, checked."""

    params: PipelineParams
    source: data.TripSource
    tracking_uri: str
    experiment: str
    registered_model: str | None
    force: bool
    timeout_seconds: int
    overlap_max_trips: int

    @property
    def training_parameters(self) -> dict[str, Any]:
        """What 03_train gets besides the run's own id and folder: where it logs and registers."""
        return stages.training_parameters(self.tracking_uri, self.experiment, self.registered_model)

    @property
    def months(self) -> tuple[Month, Month]:
        return self.params.train_month, self.params.validation_month

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
        }


def resolve_request(
    year: int | str | None,
    month: int | str | None,
    color: str = "green",
    data_source: str | None = None,
    experiment: str | None = None,
    force: bool = False,
    registered_model: str | None = settings.DEFAULT_REGISTERED_MODEL,
) -> RunRequest:
    """The run these inputs ask for; InvalidParameterError, TripDataError or ValueError naming what is wrong.

    With year and month both None (the scheduled deployment, or `--latest`), the newest month
    whose data and following month the source has published.
    """
    source = data.trip_source(data_source)
    data.check_source_location(source.location)
    if year is None and month is None:
        from taxi_duration import schedule

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
    )


@dataclass(frozen=True)
class StagePlan:
    """What a run does with its stages, decided from its request and its (local) trip files."""

    keys: dict[str, str]  # stage -> cache key
    trip_digests: dict[str, str]  # month label -> sha256 of its file
    side_by_side: bool  # 01_explore runs beside 02_features (a small month), else before it
    reuse: dict[str, stagecache.CacheEntry]  # stages whose outputs are reused, and from where

    @property
    def to_execute(self) -> tuple[str, ...]:
        """The stages that run, in pipeline order."""
        return tuple(stage for stage in STAGES if stage not in self.reuse)


def plan(request: RunRequest, trip_files: dict[str, str]) -> StagePlan:
    """The stage plan for `request`, given its months' local files (label -> path)."""
    params = request.params
    digests = stages.trip_digests(trip_files)
    keys = stages.stage_keys(params, digests, request.training_parameters)
    cache = stagecache.StageCache(settings.stage_cache_dir())
    found = {} if request.force else {stage: cache.lookup(stage, keys[stage]) for stage in STAGES}
    side_by_side = data.trip_count(Path(trip_files[params.train_month.label()])) <= request.overlap_max_trips
    return StagePlan(
        keys=keys,
        trip_digests=digests,
        side_by_side=side_by_side,
        reuse={stage: entry for stage, entry in found.items() if entry is not None},
    )


def local_trip_files(request: RunRequest) -> dict[str, str] | None:
    """The months' files if both are already on this machine (not yet validated), else None."""
    files = {month.label(): request.source.local_copy(request.params.color, month) for month in request.months}
    if None in files.values():
        return None
    return {label: str(path) for label, path in files.items()}
