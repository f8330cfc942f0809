"""Batch scoring: which model a URI names, a month's trips as the model takes them, the predictions file.

The scoring notebook and the scoring flow both resolve a model URI here, once: `models:/NAME@ALIAS` and
`models:/NAME/VERSION` become one registered version (the alias may move later; a scoring run
records the version it used), whose training month, validation month and validation RMSE
come from the tags the promotion gate set (taxi_duration.tracking.registry).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from taxi_duration import serving
from taxi_duration.data.periods import Month
from taxi_duration.data.tripfiles import DISTANCE_COLUMN, DROPOFF_COLUMN, LOCATION_COLUMNS, PICKUP_COLUMN
from taxi_duration.tracking import mlflow_runs, registry

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd
    from mlflow.entities.model_registry import ModelVersion

DEFAULT_MODEL_URI = f"models:/{registry.DEFAULT_REGISTERED_MODEL}@{registry.CHAMPION_ALIAS}"
PREDICTIONS_DIR = "predictions"
REFUSED_DIR = "refused"
REFUSED_PREFIX = "refused."  # metrics "refused.<field>.<rule>": trips refused per reason (serving.REASONS)
PREDICTION_COLUMNS = [
    "ride_id",
    "pickup_datetime",
    *LOCATION_COLUMNS,
    DISTANCE_COLUMN,
    "predicted_minutes",
    "actual_minutes",
    "model_name",
    "model_version",
]
_REGISTERED = re.compile(r"models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))")


class ModelNotFoundError(LookupError):
    """The model URI names no registered version in this tracking store."""


@dataclass(frozen=True)
class ScoringModel:
    """One registered version, as a scoring run names and records it."""

    requested_uri: str  # what the user asked for, e.g. models:/nyc-taxi-duration@champion
    name: str
    version: str
    model_id: str | None  # the LoggedModel behind the version (MLflow 3)
    source_run_id: str | None  # the training run
    train_month: str | None
    validation_month: str | None
    validation_rmse: float | None  # the RMSE the gate registered it with

    @property
    def pinned_uri(self) -> str:
        """The version itself, whatever the alias points at later."""
        return f"models:/{self.name}/{self.version}"

    def label(self) -> str:
        return f"{self.name} v{self.version}"


def resolve_model(tracking_uri: str, model_uri: str) -> ScoringModel:
    """The registered version `model_uri` names; ValueError for another URI form, ModelNotFoundError if absent."""
    from mlflow.exceptions import MlflowException

    match = _REGISTERED.fullmatch(model_uri.strip())
    if match is None:
        raise ValueError(
            f"model URI {model_uri!r} is not a registered model: use models:/NAME@ALIAS or models:/NAME/VERSION "
            f"(default {DEFAULT_MODEL_URI})"
        )
    client = mlflow_runs.mlflow_client(tracking_uri)
    name, alias, version = match["name"], match["alias"], match["version"]
    try:
        found = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except MlflowException as error:
        what = f"alias {alias!r}" if alias else f"version {version}"
        raise ModelNotFoundError(
            f"{model_uri}: {name} has no {what} in {tracking_uri} ({error.message.strip()}); "
            "train and register a model first (make run)"
        ) from error
    tags = found.tags or {}
    try:
        source_run_id = registry.version_run_id(tracking_uri, name, str(found.version))
    except registry.RegistryError:  # registered from outside a run: no training month to show
        source_run_id = None
    train_month = client.get_run(source_run_id).data.tags.get("taxi.train_month") if source_run_id else None
    rmse_tag = tags.get(registry.VERSION_TAG_VALIDATION_RMSE)
    return ScoringModel(
        requested_uri=model_uri,
        name=name,
        version=str(found.version),
        model_id=_model_id(found),
        source_run_id=source_run_id,
        train_month=train_month,
        validation_month=tags.get(registry.VERSION_TAG_VALIDATION_MONTH),
        validation_rmse=None if rmse_tag is None else float(rmse_tag),
    )


def _model_id(found: ModelVersion) -> str | None:
    """The LoggedModel behind a version: MLflow's SQL registry does not keep `model_id` on the
    version, so the gate records it as the version's `taxi.model_uri` tag too."""
    if getattr(found, "model_id", None):
        return found.model_id
    try:
        return registry.logged_model_id((found.tags or {}).get(registry.VERSION_TAG_MODEL_URI) or "")
    except ValueError:
        return None


def trips_to_score(path: Path, color: str, month: Month) -> tuple[pd.DataFrame, bool]:
    """The month's trips as the scoring notebook scores them, and whether their actual durations are known.

    With dropoff times: the trips in the model's 1-60 minute window, with `actual_minutes`.
    Without (a month whose dropoffs are not published yet): every trip, `actual_minutes` NaN.
    `ride_id` is YYYY/MM_<row in the file>, stable across reruns of the same file.
    """
    import numpy as np
    import pandas as pd

    from taxi_duration.data import tripfiles
    from taxi_duration.modeling import features

    columns = [PICKUP_COLUMN[color], DROPOFF_COLUMN[color], *LOCATION_COLUMNS, DISTANCE_COLUMN]
    available = set(tripfiles.available_columns(path))
    frame = tripfiles.read_trips(path, color, [column for column in columns if column in available], actuals=False)
    frame["ride_id"] = f"{month.year:04d}/{month.month:02d}_" + pd.Series(
        np.arange(len(frame)), index=frame.index
    ).astype(str)
    dropoff = DROPOFF_COLUMN[color]
    has_actuals = dropoff in frame.columns and bool(frame[dropoff].notna().any())
    if has_actuals:
        frame["actual_minutes"] = features.trip_duration_minutes(frame, color)
        frame = frame[features.in_duration_window(frame["actual_minutes"])]
    else:
        frame["actual_minutes"] = np.nan
    trips = frame.rename(columns={PICKUP_COLUMN[color]: "pickup_datetime"})
    return trips[["ride_id", "pickup_datetime", *LOCATION_COLUMNS, DISTANCE_COLUMN, "actual_minutes"]].reset_index(
        drop=True
    ), has_actuals


def scorable_trips(trips: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The trips the model scores, and those it refuses (serving's input rules) with their `reason`.

    A month is scored whole but for these: the served model would refuse a batch holding one.
    """
    reasons = serving.refusal_reasons(trips)
    refused = reasons.notna()
    return (
        trips[~refused].reset_index(drop=True),
        trips[refused].assign(reason=reasons[refused].astype(str)).reset_index(drop=True),
    )


def refusal_metrics(refused: pd.DataFrame) -> dict[str, int]:
    """`refused_trips` and the count per reason, most first: {"refused.trip_distance.too_long": 44, ...}."""
    counts = refused["reason"].value_counts()
    return {
        "refused_trips": len(refused),
        **{f"{REFUSED_PREFIX}{reason}": int(count) for reason, count in counts.items()},
    }


def refusal_lines(metrics: dict[str, Any]) -> list[str]:
    """'trip_distance over 100 miles: 44' per reason in `metrics` (refusal_metrics'), most first."""
    counts = {
        key.removeprefix(REFUSED_PREFIX): value for key, value in metrics.items() if key.startswith(REFUSED_PREFIX)
    }
    return [
        f"{serving.reason_text(reason)}: {int(count):,}"
        for reason, count in sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    ]


def refusal_table(refused: pd.DataFrame, month_trips: int) -> pd.DataFrame:
    """The report's table: per reason, the trips refused, their share of the month, the rule they break."""
    import pandas as pd

    counts = refused["reason"].value_counts()
    return pd.DataFrame(
        {
            "refused because": [serving.reason_text(reason) for reason in counts.index],
            "trips": counts.to_numpy(),
            "share of the month": (counts.to_numpy() / month_trips).round(6) if month_trips else 0.0,
            "the rule": [serving.rule_text(reason.split(".", 1)[0]) for reason in counts.index],
        }
    )


def refused_path(color: str, month: Month) -> str:
    """Where a scoring run's refused trips (with their reason) go, relative to its folder."""
    return f"{REFUSED_DIR}/{color}_{month.label()}.parquet"


def predictions_frame(trips: pd.DataFrame, predicted: np.ndarray, model: ScoringModel) -> pd.DataFrame:
    """The predictions file's rows: one per scored trip, PREDICTION_COLUMNS."""
    frame = trips.copy()
    frame["predicted_minutes"] = predicted
    frame["model_name"] = model.name
    frame["model_version"] = model.version
    return frame[PREDICTION_COLUMNS]


def predictions_path(color: str, month: Month) -> str:
    """Where a scoring run's predictions go, relative to its folder."""
    return f"{PREDICTIONS_DIR}/{color}_{month.label()}.parquet"


def scored_metrics(trips: pd.DataFrame, predicted: np.ndarray, has_actuals: bool) -> dict[str, Any]:
    """RMSE and mean error on the scored trips, or None where the actual durations are unknown."""
    import numpy as np

    from taxi_duration.modeling.model import rmse

    if not has_actuals:
        return {"rmse": None, "mean_error": None}
    actual = trips["actual_minutes"].to_numpy(dtype="float64")
    return {"rmse": rmse(actual, predicted), "mean_error": float(np.mean(predicted - actual))}
