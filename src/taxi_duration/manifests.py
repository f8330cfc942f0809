"""Typed stage manifests: what a stage's notebook records in `<stage>.manifest.json`.

A notebook writes one record (`write`); the flow, the comparison and the gallery read it back
typed (`read`). On disk the JSON keeps the keys the notebooks wrote before these records existed,
so older run folders still read, plus `kind` (which record it is) and, for a stage that logs to
the pipeline's MLflow run, `run_record` (what a reuse of the stage replays on the new run).

A file without `kind` (written before it existed) is recognised by its keys, never by the stage's
name. A stage the project does not ship writes, and reads as, the base `StageManifest`: its
`files` (what a reuse brings back), its `metrics`, and whatever else it records in `extra`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Self, TypeVar

from taxi_duration import runfiles
from taxi_duration.data.periods import InvalidParameterError, Month, parse_month


class ManifestError(ValueError):
    """A manifest whose content is not what its kind records; the message names the key."""


_MISSING: Any = object()


T = TypeVar("T")


class _Fields:
    """A manifest's JSON object, taken key by key; what no field takes is kept as `extra`."""

    def __init__(self, data: Mapping[str, Any], what: str) -> None:
        if not isinstance(data, Mapping):
            raise ManifestError(f"a {what} is a JSON object, got {type(data).__name__}")
        self._left = dict(data)
        self._what = what

    def error(self, key: str, expected: str, value: Any) -> ManifestError:
        return ManifestError(f"{self._what}: {key!r} should be {expected}, got {value!r}")

    def take(self, key: str, default: Any = _MISSING) -> Any:
        if key in self._left:
            return self._left.pop(key)
        if default is _MISSING:
            raise ManifestError(f"{self._what}: {key!r} is missing")
        return default

    def optional(self, key: str, read: Callable[[str], T]) -> T | None:
        """None when the key is absent or null, else what `read` makes of it."""
        if self._left.get(key) is None:
            self._left.pop(key, None)
            return None
        return read(key)

    def text(self, key: str) -> str:
        value = self.take(key)
        if not isinstance(value, str):
            raise self.error(key, "a string", value)
        return value

    def month(self, key: str) -> Month:
        value = self.take(key)
        try:
            return parse_month(value)
        except InvalidParameterError:
            raise self.error(key, "a month written YYYY-MM", value) from None

    def mapping(self, key: str, default: Any = _MISSING) -> dict[str, Any]:
        value = self.take(key, default)
        if not isinstance(value, Mapping):
            raise self.error(key, "an object", value)
        return dict(value)

    def numbers(self, key: str, default: Any = _MISSING) -> dict[str, float]:
        values = self.mapping(key, default)
        for name, value in values.items():
            if not _is_number(value):
                raise self.error(f"{key}.{name}", "a number", value)
        return values

    def texts(self, key: str, default: Any = _MISSING) -> dict[str, str]:
        values = self.mapping(key, default)
        for name, value in values.items():
            if not isinstance(value, str):
                raise self.error(f"{key}.{name}", "a string", value)
        return values

    def rows(self, key: str, parse: Callable[[list[Mapping[str, Any]]], T]) -> T:
        value = self.take(key)
        if not isinstance(value, list) or not all(isinstance(row, Mapping) for row in value):
            raise self.error(key, "a list of objects", value)
        try:
            return parse(value)
        except (KeyError, TypeError, ValueError) as problem:
            raise self.error(key, "rows of the record's fields", problem) from None

    def numbers_left(self) -> dict[str, float]:
        """Every number not taken yet: the figures of a kind that writes them at the top level."""
        numbers = {key: value for key, value in self._left.items() if _is_number(value)}
        for key in numbers:
            del self._left[key]
        return numbers

    def rest(self) -> dict[str, Any]:
        return dict(self._left)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class RunRecord:
    """What a stage logged on the pipeline's MLflow run, so that a run reusing the stage logs it too."""

    params: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    artifacts: dict[str, list[str]] = field(default_factory=dict)  # MLflow artifact folder -> run-folder paths
    tags_when_reused: dict[str, str] = field(default_factory=dict)  # set only on a run that reused the stage

    def to_json(self) -> dict[str, Any]:
        return {
            "params": dict(self.params),
            "metrics": dict(self.metrics),
            "tags": dict(self.tags),
            "artifacts": {folder: list(paths) for folder, paths in self.artifacts.items()},
            "tags_when_reused": dict(self.tags_when_reused),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RunRecord:
        fields = _Fields(data, "run_record")
        artifacts = fields.mapping("artifacts", {})
        for folder, paths in artifacts.items():
            if not isinstance(paths, list) or not all(isinstance(path, str) for path in paths):
                raise fields.error(f"artifacts.{folder}", "a list of run-folder paths", paths)
        record = cls(
            params=fields.mapping("params", {}),
            metrics=fields.numbers("metrics", {}),
            tags=fields.texts("tags", {}),
            artifacts={folder: list(paths) for folder, paths in artifacts.items()},
            tags_when_reused=fields.texts("tags_when_reused", {}),
        )
        if fields.rest():
            raise ManifestError(f"run_record: unknown keys {sorted(fields.rest())}")
        return record


@dataclass(frozen=True, kw_only=True)
class StageManifest:
    """Any stage's manifest: the base every kind extends, and what an unknown stage's reads as."""

    KIND: ClassVar[str] = "stage"
    # The keys every manifest of the kind held before `kind` was written: how an older file is recognised.
    LEGACY_KEYS: ClassVar[frozenset[str]] = frozenset()

    stage: str
    files: dict[str, str] = field(default_factory=dict)  # name -> path relative to the run folder
    metrics: dict[str, float] = field(default_factory=dict)
    run_record: RunRecord | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # keys the kind does not type, kept as written

    def to_json(self) -> dict[str, Any]:
        content = {**self.extra, **self._content(), "stage": self.stage, "kind": self.KIND}
        if self.run_record is not None:
            content["run_record"] = self.run_record.to_json()
        return content

    def _content(self) -> dict[str, Any]:
        return {"files": dict(self.files), "metrics": dict(self.metrics)}

    @classmethod
    def _read(cls, fields: _Fields) -> dict[str, Any]:
        return {"files": fields.texts("files", {}), "metrics": fields.numbers("metrics", {})}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Self:
        fields = _Fields(data, f"{cls.KIND} manifest")
        fields.take("kind", None)
        stage = fields.text("stage")
        run_record = fields.optional("run_record", fields.mapping)
        values = cls._read(fields)
        return cls(
            stage=stage,
            run_record=None if run_record is None else RunRecord.from_json(run_record),
            extra=fields.rest(),
            **values,
        )


@dataclass(frozen=True)
class ZoneCount:
    """One of a month's busiest zones (TLC's zone id) on one side of the trip."""

    zone: str
    trips: int
    share: float

    @classmethod
    def rows(cls, records: Iterable[Mapping[str, Any]]) -> tuple[ZoneCount, ...]:
        return tuple(cls(str(row["zone"]), int(row["trips"]), float(row["share"])) for row in records)


@dataclass(frozen=True)
class DistanceError:
    """The validation error of one trip-distance bucket ('miles' its label, e.g. '[0.0, 1.0)')."""

    miles: str
    trips: int
    rmse: float
    mean_error: float

    @classmethod
    def rows(cls, records: Iterable[Mapping[str, Any]]) -> tuple[DistanceError, ...]:
        return tuple(
            cls(str(row["miles"]), int(row["trips"]), float(row["rmse"]), float(row["mean_error"])) for row in records
        )


@dataclass(frozen=True, kw_only=True)
class ExploreManifest(StageManifest):
    """A training month's profile. Its figures (`metrics`: rows, columns, ...) sit at the top level
    of the JSON, as they always have."""

    KIND: ClassVar[str] = "explore"
    LEGACY_KEYS: ClassVar[frozenset[str]] = frozenset(
        {"trip_file", "filter", "nulls", "duration_quantiles", "busiest_zones"}
    )

    trip_file: str
    duration_filter: dict[str, float]  # "filter": trips each side of the 1-60 min window drops, counts and shares
    nulls: dict[str, float]  # non-zero null counts per column
    duration_quantiles: dict[str, float]  # minutes at p01 ... p99
    busiest_zones: dict[str, tuple[ZoneCount, ...]]  # "pickup" / "dropoff", busiest first

    def _content(self) -> dict[str, Any]:
        return {
            **self.metrics,
            **({"files": dict(self.files)} if self.files else {}),
            "trip_file": self.trip_file,
            "filter": dict(self.duration_filter),
            "nulls": dict(self.nulls),
            "duration_quantiles": dict(self.duration_quantiles),
            "busiest_zones": {
                side: [{"zone": z.zone, "trips": z.trips, "share": z.share} for z in zones]
                for side, zones in self.busiest_zones.items()
            },
        }

    @classmethod
    def _read(cls, fields: _Fields) -> dict[str, Any]:
        zones = fields.mapping("busiest_zones")
        try:
            busiest = {side: ZoneCount.rows(rows) for side, rows in zones.items()}
        except (KeyError, TypeError, ValueError) as problem:
            raise fields.error("busiest_zones", "rows of zone, trips and share", problem) from None
        return {
            "trip_file": fields.text("trip_file"),
            "duration_filter": fields.numbers("filter"),
            "nulls": fields.numbers("nulls"),
            "duration_quantiles": fields.numbers("duration_quantiles"),
            "busiest_zones": busiest,
            "files": fields.texts("files", {}),
            "metrics": fields.numbers_left(),
        }


@dataclass(frozen=True, kw_only=True)
class FeaturesManifest(StageManifest):
    """The matrices built from a training and a validation month. Its figures (`metrics`: rows,
    non-zeros, vocabulary, ...) sit at the top level of the JSON; `year` and `month` there are the
    training month's."""

    KIND: ClassVar[str] = "features"
    LEGACY_KEYS: ClassVar[frozenset[str]] = frozenset(
        {"color", "train_month", "validation_month", "train_file", "validation_file", "files"}
    )

    color: str
    train_month: Month
    validation_month: Month
    train_file: str
    validation_file: str

    def _content(self) -> dict[str, Any]:
        return {
            **self.metrics,
            "year": self.train_month.year,
            "month": self.train_month.month,
            "color": self.color,
            "train_month": self.train_month.label(),
            "validation_month": self.validation_month.label(),
            "train_file": self.train_file,
            "validation_file": self.validation_file,
            "files": dict(self.files),
        }

    @classmethod
    def _read(cls, fields: _Fields) -> dict[str, Any]:
        fields.take("year", None)  # the training month's, written for readers of the JSON
        fields.take("month", None)
        return {
            "color": fields.text("color"),
            "train_month": fields.month("train_month"),
            "validation_month": fields.month("validation_month"),
            "train_file": fields.text("train_file"),
            "validation_file": fields.text("validation_file"),
            "files": fields.texts("files"),
            "metrics": fields.numbers_left(),
        }


@dataclass(frozen=True, kw_only=True)
class TrainingManifest(StageManifest):
    """A trained model: where MLflow keeps it, its validation figures, and the registry's decision."""

    KIND: ClassVar[str] = "training"
    LEGACY_KEYS: ClassVar[frozenset[str]] = frozenset({"mlflow_run_id", "model_uri", "metrics", "error_by_distance"})

    mlflow_run_id: str  # the run the model was logged in
    model_uri: str  # the servable model (raw trip fields in, minutes out)
    booster_uri: str | None = None  # the XGBoost booster alone
    previous_best: dict[str, Any] | None = None  # the best earlier run on the same validation month
    error_by_distance: tuple[DistanceError, ...] = ()
    promotion: dict[str, str] | None = None  # the gate's taxi.promotion.* tags; None: nothing registered

    def _content(self) -> dict[str, Any]:
        return {
            **({"files": dict(self.files)} if self.files else {}),
            "metrics": dict(self.metrics),
            "mlflow_run_id": self.mlflow_run_id,
            "model_uri": self.model_uri,
            "booster_uri": self.booster_uri,
            "previous_best": self.previous_best,
            "error_by_distance": [
                {"miles": row.miles, "trips": row.trips, "rmse": row.rmse, "mean_error": row.mean_error}
                for row in self.error_by_distance
            ],
            "promotion": None if self.promotion is None else dict(self.promotion),
        }

    @classmethod
    def _read(cls, fields: _Fields) -> dict[str, Any]:
        return {
            "files": fields.texts("files", {}),
            "metrics": fields.numbers("metrics"),
            "mlflow_run_id": fields.text("mlflow_run_id"),
            "model_uri": fields.text("model_uri"),
            "booster_uri": fields.optional("booster_uri", fields.text),
            "previous_best": fields.optional("previous_best", fields.mapping),
            "error_by_distance": fields.rows("error_by_distance", DistanceError.rows),
            "promotion": fields.optional("promotion", fields.texts),
        }


@dataclass(frozen=True)
class ScoredModel:
    """The registered version a month was scored with, as the scoring run recorded it."""

    uri: str  # pinned: models:/NAME/VERSION
    requested_uri: str  # what was asked for, e.g. models:/nyc-taxi-duration@champion
    name: str
    version: str
    # From the version's tags: text as registered (a model registered by hand may carry none).
    train_month: str | None
    validation_month: str | None
    validation_rmse: float | None


@dataclass(frozen=True, kw_only=True)
class ScoringManifest(StageManifest):
    """A month scored with a registered model: the model, the figures, the predictions' files.
    `year` and `month` in the JSON are the scored month's."""

    KIND: ClassVar[str] = "scoring"
    LEGACY_KEYS: ClassVar[frozenset[str]] = frozenset(
        {"scored_month", "scored_file", "has_actuals", "model", "metrics"}
    )

    color: str
    scored_month: Month
    scored_file: str
    has_actuals: bool
    model: ScoredModel

    def _content(self) -> dict[str, Any]:
        return {
            "year": self.scored_month.year,
            "month": self.scored_month.month,
            "color": self.color,
            "scored_month": self.scored_month.label(),
            "scored_file": self.scored_file,
            "has_actuals": self.has_actuals,
            "model": {
                "uri": self.model.uri,
                "requested_uri": self.model.requested_uri,
                "name": self.model.name,
                "version": self.model.version,
                "train_month": self.model.train_month,
                "validation_month": self.model.validation_month,
                "validation_rmse": self.model.validation_rmse,
            },
            "metrics": dict(self.metrics),
            "files": dict(self.files),
        }

    @classmethod
    def _read(cls, fields: _Fields) -> dict[str, Any]:
        fields.take("year", None)  # the scored month's, written for readers of the JSON
        fields.take("month", None)
        has_actuals = fields.take("has_actuals")
        if not isinstance(has_actuals, bool):
            raise fields.error("has_actuals", "true or false", has_actuals)
        model = fields.mapping("model")
        try:
            rmse = model.get("validation_rmse")
            scored_model = ScoredModel(
                uri=str(model["uri"]),
                requested_uri=str(model["requested_uri"]),
                name=str(model["name"]),
                version=str(model["version"]),
                train_month=None if model.get("train_month") is None else str(model["train_month"]),
                validation_month=None if model.get("validation_month") is None else str(model["validation_month"]),
                validation_rmse=None if rmse is None else float(rmse),
            )
        except (KeyError, TypeError, ValueError) as problem:
            raise fields.error("model", "the scoring model's uri, requested_uri, name and version", problem) from None
        return {
            "color": fields.text("color"),
            "scored_month": fields.month("scored_month"),
            "scored_file": fields.text("scored_file"),
            "has_actuals": has_actuals,
            "model": scored_model,
            "metrics": fields.numbers("metrics"),
            "files": fields.texts("files"),
        }


KINDS: dict[str, type[StageManifest]] = {
    kind.KIND: kind for kind in (StageManifest, ExploreManifest, FeaturesManifest, TrainingManifest, ScoringManifest)
}


def parse(data: Mapping[str, Any]) -> StageManifest:
    """The typed record of a manifest's JSON: by its `kind`, or for an older file by its keys."""
    kind = data.get("kind")
    if kind is not None:
        if kind not in KINDS:
            raise ManifestError(f"unknown manifest kind {kind!r}; known: {', '.join(KINDS)}")
        return KINDS[kind].from_json(data)
    for record in KINDS.values():
        if record.LEGACY_KEYS and record.LEGACY_KEYS <= data.keys():
            return record.from_json(data)
    return StageManifest.from_json(data)


def read(run_dir: Path, stage: str) -> StageManifest:
    """A stage's manifest in a run folder, typed (MissingRunFileError if the stage has not written one)."""
    data = runfiles.read_manifest(run_dir, stage)
    try:
        return parse({"stage": stage, **data})
    except ManifestError as problem:
        raise ManifestError(f"{runfiles.manifest_path(run_dir, stage)}: {problem}") from None


def write(run_dir: Path, record: StageManifest) -> Path:
    """Write a stage's record as `<stage>.manifest.json` in the run folder (atomically)."""
    return runfiles.write_manifest(run_dir, record.stage, record.to_json())


Record = TypeVar("Record", bound=StageManifest)


def of_kind(records: Iterable[StageManifest | None], kind: type[Record]) -> Record | None:
    """The first record of `kind` among a run's manifests (None: no stage wrote one)."""
    return next((record for record in records if isinstance(record, kind)), None)
