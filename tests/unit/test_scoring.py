"""Batch scoring's pieces: a month's trips as the model takes them, which registered version a
URI names, the predictions file's rows; and the trip datasets a run records in MLflow."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xgboost as xgb

from taxi_duration import serving
from taxi_duration.data.periods import Month
from taxi_duration.data.synthetic import generate_trips_table, write_trip_file
from taxi_duration.data.tripfiles import DROPOFF_COLUMN, PICKUP_COLUMN
from taxi_duration.modeling import batch_scoring, drift
from taxi_duration.modeling.features import RAW_FEATURES, build_matrices, prepare_trips
from taxi_duration.modeling.model import predict, rmse, train_booster
from taxi_duration.settings import ENVIRONMENT_DEFAULTS
from taxi_duration.tracking import datasets, mlflow_runs, registry

TRIP_COLUMNS = ["ride_id", "pickup_datetime", "PULocationID", "DOLocationID", "trip_distance", "actual_minutes"]


# --- trips_to_score ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("color", "month", "prefix"), [("green", Month(2023, 3), "2023/03_"), ("yellow", Month(2022, 11), "2022/11_")]
)
def test_trips_with_dropoffs_keep_the_one_to_sixty_minute_window(tmp_path, color, month, prefix):
    path = write_trip_file(tmp_path, color, month, 600, seed=3)
    raw = pd.read_parquet(path)
    minutes = (raw[DROPOFF_COLUMN[color]] - raw[PICKUP_COLUMN[color]]).dt.total_seconds().to_numpy() / 60
    kept = np.flatnonzero((minutes >= 1) & (minutes <= 60))
    assert 0 < len(kept) < len(raw)  # the synthetic month has trips on both sides of the window

    trips, has_actuals = batch_scoring.trips_to_score(path, color, month)

    assert has_actuals is True
    assert list(trips.columns) == TRIP_COLUMNS
    assert list(trips.index) == list(range(len(kept)))
    # ride_id names the trip's row in the file.
    assert trips["ride_id"].tolist() == [f"{prefix}{row}" for row in kept]
    np.testing.assert_allclose(trips["actual_minutes"].to_numpy(), minutes[kept], rtol=1e-12)
    assert trips["actual_minutes"].between(1, 60).all()
    np.testing.assert_array_equal(trips["PULocationID"].to_numpy(), raw["PULocationID"].to_numpy()[kept])
    np.testing.assert_array_equal(trips["trip_distance"].to_numpy(), raw["trip_distance"].to_numpy()[kept])
    assert (trips["pickup_datetime"].to_numpy() == raw[PICKUP_COLUMN[color]].to_numpy()[kept]).all()


def test_ride_ids_are_stable_across_reads(tmp_path):
    path = write_trip_file(tmp_path, "green", Month(2023, 3), 200, seed=4)
    first, _ = batch_scoring.trips_to_score(path, "green", Month(2023, 3))
    again, _ = batch_scoring.trips_to_score(path, "green", Month(2023, 3))
    pd.testing.assert_frame_equal(first, again)
    assert first["ride_id"].is_unique


def file_without_actuals(folder, how: str):
    """A synthetic green 2023-05 file whose dropoff times are all null, or that has no dropoff column."""
    month = Month(2023, 5)
    frame = generate_trips_table("green", month, 300, seed=5).to_pandas()
    dropoff = DROPOFF_COLUMN["green"]
    if how == "null":
        frame[dropoff] = pd.Series(pd.NaT, index=frame.index, dtype="datetime64[us]")
    else:
        frame = frame.drop(columns=[dropoff])
    path = folder / "green_tripdata_2023-05.parquet"
    frame.to_parquet(path, index=False)
    return path, month, frame


@pytest.mark.parametrize("how", ["null", "absent"])
def test_a_month_without_dropoffs_is_scored_whole(tmp_path, how):
    path, month, frame = file_without_actuals(tmp_path, how)

    trips, has_actuals = batch_scoring.trips_to_score(path, "green", month)

    assert has_actuals is False
    assert list(trips.columns) == TRIP_COLUMNS
    assert len(trips) == len(frame) == 300  # no trip filtered out: their durations are unknown
    assert trips["actual_minutes"].isna().all()
    assert trips["ride_id"].tolist() == [f"2023/05_{row}" for row in range(300)]
    np.testing.assert_array_equal(trips["DOLocationID"].to_numpy(), frame["DOLocationID"].to_numpy())
    assert batch_scoring.scored_metrics(trips, np.zeros(len(trips)), has_actuals) == {"rmse": None, "mean_error": None}


# --- predictions file ----------------------------------------------------------------------


def a_scoring_model(**overrides) -> batch_scoring.ScoringModel:
    fields = {
        "requested_uri": "models:/m@champion",
        "name": "m",
        "version": "3",
        "model_id": None,
        "source_run_id": "r",
        "train_month": "2023-02",
        "validation_month": "2023-03",
        "validation_rmse": 5.5,
    }
    return batch_scoring.ScoringModel(**{**fields, **overrides})


def test_predictions_frame_and_metrics(tmp_path):
    path = write_trip_file(tmp_path, "green", Month(2023, 3), 200, seed=6)
    trips, has_actuals = batch_scoring.trips_to_score(path, "green", Month(2023, 3))
    predicted = trips["actual_minutes"].to_numpy() + 2.0  # two minutes too long, every trip

    frame = batch_scoring.predictions_frame(trips, predicted, a_scoring_model())

    assert list(frame.columns) == batch_scoring.PREDICTION_COLUMNS
    assert (frame["model_name"] == "m").all() and (frame["model_version"] == "3").all()
    np.testing.assert_array_equal(frame["predicted_minutes"].to_numpy(), predicted)
    assert "predicted_minutes" not in trips.columns  # the trips are left as they were
    metrics = batch_scoring.scored_metrics(trips, predicted, has_actuals)
    assert metrics["rmse"] == pytest.approx(2.0) and metrics["mean_error"] == pytest.approx(2.0)
    assert batch_scoring.predictions_path("green", Month(2023, 3)) == "predictions/green_2023-03.parquet"


def test_trips_the_model_refuses_are_set_aside_and_counted(tmp_path: Path) -> None:
    path = write_trip_file(tmp_path, "green", Month(2023, 3), 200, seed=6)
    month, _ = batch_scoring.trips_to_score(path, "green", Month(2023, 3))
    month["trip_distance"] = month["trip_distance"].astype("float64")
    month.loc[[3, 7, 9], "trip_distance"] = [5000.0, 250.0, -1.0]  # as TLC's files have them
    month["PULocationID"] = month["PULocationID"].astype("Int64")
    month.loc[11, "PULocationID"] = pd.NA

    trips, refused = batch_scoring.scorable_trips(month)

    assert len(trips) == len(month) - 4 and serving.refusal_reasons(trips).isna().all()
    assert set(trips["ride_id"]) == set(month["ride_id"].drop([3, 7, 9, 11]))
    assert refused["ride_id"].tolist() == month["ride_id"].iloc[[3, 7, 9, 11]].tolist()
    assert refused["reason"].tolist() == [
        "trip_distance.too_long",
        "trip_distance.too_long",
        "trip_distance.negative",
        "PULocationID.missing",
    ]
    metrics = batch_scoring.refusal_metrics(refused)
    assert metrics == {
        "refused_trips": 4,
        "refused.trip_distance.too_long": 2,
        "refused.trip_distance.negative": 1,
        "refused.PULocationID.missing": 1,
    }
    assert batch_scoring.refusal_lines(metrics) == [
        "trip_distance over 100 miles: 2",
        "PULocationID missing: 1",
        "trip_distance negative: 1",
    ]
    table = batch_scoring.refusal_table(refused, len(month))
    assert table["refused because"].tolist()[0] == "trip_distance over 100 miles" and table["trips"].sum() == 4
    assert table["the rule"].tolist()[0] == "a finite number of miles from 0 to 100"
    assert batch_scoring.refused_path("green", Month(2023, 3)) == "refused/green_2023-03.parquet"


def test_a_month_without_refusals_counts_none(tmp_path: Path) -> None:
    path = write_trip_file(tmp_path, "green", Month(2023, 3), 100, seed=6)
    month, _ = batch_scoring.trips_to_score(path, "green", Month(2023, 3))

    trips, refused = batch_scoring.scorable_trips(month)

    assert len(trips) == len(month) and refused.empty and "reason" in refused.columns
    assert batch_scoring.refusal_metrics(refused) == {"refused_trips": 0}
    assert batch_scoring.refusal_table(refused, len(month)).empty


def test_scoring_model_names_its_pinned_version():
    model = a_scoring_model()
    assert model.pinned_uri == "models:/m/3"
    assert model.label() == "m v3"


# --- resolve_model against a real registry ---------------------------------------------------

MODEL = registry.DEFAULT_REGISTERED_MODEL


@dataclass(frozen=True)
class Registered:
    uri: str
    run_ids: list[str]
    rmses: list[float]
    model_uris: list[str]  # the servable models registered as v1 and v2, "models:/m-..."


def trips(month: Month, rows: int, seed: int) -> pd.DataFrame:
    return prepare_trips(generate_trips_table("green", month, rows, seed=seed).to_pandas(), "green")


def register(
    uri: str,
    name: str,
    train: pd.DataFrame,
    validation: pd.DataFrame,
    validation_month: str,
    tags: dict[str, str],
    rmse_penalty: float = 0.0,
) -> tuple[str, float, str]:
    """Train, log and gate one run's servable model; return its run id, the RMSE it was gated with, its URI."""
    matrices = build_matrices(train, validation)
    booster = train_booster(matrices.X_train, matrices.y_train, matrices.X_val, matrices.y_val, num_boost_round=3)
    run_rmse = rmse(matrices.y_val, predict(booster, matrices.X_val)) + rmse_penalty
    run_id = mlflow_runs.start_run(uri, "scoring-tests", name, params={}, tags=tags)
    profile = drift.trip_profile("train", matrices.training_column("trip_distance"), matrices.y_train)
    model_uri = mlflow_runs.log_servable_model(
        uri, run_id, serving.servable_model(matrices.vectorizer, booster), serving.input_example(validation), profile
    )
    registry.register_and_gate(
        uri, run_id, model_uri, validation[RAW_FEATURES], matrices.y_val, run_rmse, validation_month
    )
    return run_id, run_rmse, model_uri


@pytest.fixture(scope="module")
def registered(tmp_path_factory, empty_tracking_store) -> Registered:
    """Two versions of the registered model: v1 (trained on 2023-02, champion), v2 (no train-month tag)."""
    folder = tmp_path_factory.mktemp("scoring-registry")
    shutil.copyfile(empty_tracking_store, folder / "mlflow.db")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch, xgb.config_context(nthread=1):
        for key, value in ENVIRONMENT_DEFAULTS.items():
            patch.setenv(key, value)
        # log_servable_model writes these through mlflow.set_tracking_uri / set_experiment.
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.setenv("MLFLOW_EXPERIMENT_ID", "")
        patch.delenv("MLFLOW_EXPERIMENT_ID")
        first = register(
            uri,
            "first",
            trips(Month(2023, 2), 300, 1),
            trips(Month(2023, 3), 200, 1),
            "2023-03",
            {"taxi.train_month": "2023-02"},
        )
        # Gated with an RMSE far worse than v1 can score on its month: v1 stays champion.
        second = register(
            uri,
            "second",
            trips(Month(2023, 3), 300, 2),
            trips(Month(2023, 4), 200, 2),
            "2023-04",
            {},
            rmse_penalty=100.0,
        )
        mlflow_runs.import_mlflow().set_tracking_uri(None)
    return Registered(uri, [first[0], second[0]], [first[1], second[1]], [first[2], second[2]])


def test_champion_alias_resolves_to_its_version_with_its_tags(registered):
    model = batch_scoring.resolve_model(registered.uri, batch_scoring.DEFAULT_MODEL_URI)

    assert batch_scoring.DEFAULT_MODEL_URI == f"models:/{MODEL}@champion"
    assert (model.requested_uri, model.name, model.version) == (batch_scoring.DEFAULT_MODEL_URI, MODEL, "1")
    assert model.source_run_id == registered.run_ids[0]
    assert model.validation_month == "2023-03"
    assert model.validation_rmse == registered.rmses[0]
    assert model.train_month == "2023-02"
    assert model.pinned_uri == f"models:/{MODEL}/1"


@pytest.mark.parametrize("version", ["1", "2"])
def test_a_version_number_resolves_to_that_version(registered, version):
    index = int(version) - 1

    model = batch_scoring.resolve_model(registered.uri, f"  models:/{MODEL}/{version} ")

    assert (model.name, model.version) == (MODEL, version)
    assert model.source_run_id == registered.run_ids[index]
    assert model.validation_month == ["2023-03", "2023-04"][index]
    assert model.validation_rmse == registered.rmses[index]
    assert model.train_month == ["2023-02", None][index]  # the second run has no taxi.train_month tag


def test_the_version_names_its_logged_model(registered):
    model = batch_scoring.resolve_model(registered.uri, f"models:/{MODEL}/2")
    assert model.model_id == registered.model_uris[1].removeprefix("models:/")


@pytest.mark.parametrize(
    "model_uri", [f"models:/{MODEL}@challenger", f"models:/{MODEL}/99", "models:/no-such-model@champion"]
)
def test_an_unknown_alias_or_version_is_not_found(registered, model_uri):
    with pytest.raises(batch_scoring.ModelNotFoundError) as raised:
        batch_scoring.resolve_model(registered.uri, model_uri)
    assert model_uri in str(raised.value) and "make run" in str(raised.value)
    assert isinstance(raised.value, LookupError)


@pytest.mark.parametrize(
    "model_uri",
    [
        "runs:/abc/model",
        "models:/m-0123456789abcdef",
        f"models:/{MODEL}/latest",
        f"models:/{MODEL}",
        "/some/folder/model",
        f"models:/{MODEL}@champion/1",
    ],
)
def test_a_uri_that_names_no_registered_version_is_refused(model_uri, tmp_path):
    store = tmp_path / "never-opened.db"
    with pytest.raises(ValueError, match="is not a registered model") as raised:
        batch_scoring.resolve_model(f"sqlite:///{store}", model_uri)
    assert batch_scoring.DEFAULT_MODEL_URI in str(raised.value)
    assert not store.exists()


# --- log_trip_datasets ---------------------------------------------------------------------


def test_trip_datasets_are_recorded_as_run_inputs(tmp_path, empty_tracking_store, monkeypatch):
    for key, value in ENVIRONMENT_DEFAULTS.items():
        monkeypatch.setenv(key, value)
    shutil.copyfile(empty_tracking_store, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = mlflow_runs.start_run(uri, "dataset-tests", "datasets", params={}, tags={})
    sha_train = hashlib.sha256(b"february").hexdigest()
    sha_score = hashlib.sha256(b"may").hexdigest()
    url = "https://d37ci6vzurychx.cloudfront.net/trip-data/green_tripdata_2023-02.parquet"
    folder_file = str(tmp_path / "green_tripdata_2023-05.parquet")

    datasets.log_trip_datasets(
        uri,
        run_id,
        [
            datasets.TripDataset("green_tripdata_2023-02.parquet", url, sha_train, 64_809, "training"),
            datasets.TripDataset("green_tripdata_2023-05.parquet", folder_file, sha_score, 1_234, "scoring"),
        ],
    )

    inputs = mlflow_runs.mlflow_client(uri).get_run(run_id).inputs.dataset_inputs
    by_name = {entry.dataset.name: entry for entry in inputs}
    assert sorted(by_name) == ["green_tripdata_2023-02.parquet", "green_tripdata_2023-05.parquet"]
    train, score = by_name["green_tripdata_2023-02.parquet"], by_name["green_tripdata_2023-05.parquet"]
    assert train.dataset.digest == sha_train[:16] and len(train.dataset.digest) == datasets.DATASET_DIGEST_LENGTH
    assert score.dataset.digest == sha_score[:16]
    assert json.loads(train.dataset.profile) == {"num_rows": 64_809, "sha256": sha_train}
    assert json.loads(score.dataset.profile) == {"num_rows": 1_234, "sha256": sha_score}
    assert (train.dataset.source_type, json.loads(train.dataset.source)) == ("http", {"url": url})
    assert (score.dataset.source_type, json.loads(score.dataset.source)) == ("local", {"uri": folder_file})
    assert {tag.key: tag.value for tag in train.tags} == {"mlflow.data.context": "training"}
    assert {tag.key: tag.value for tag in score.tags} == {"mlflow.data.context": "scoring"}


def test_the_closing_lines_name_the_refused_trips_per_reason() -> None:
    from taxi_duration.orchestration.scoring_flow import format_score_summary

    result = {
        "color": "green",
        "scored_month": "2023-05",
        "model": "m v1",
        "model_train_month": "2023-03",
        "has_actuals": True,
        "model_validation_rmse": 5.471,
        "predictions": "p",
        "report": "r",
        "mlflow_run_id": "abc",
        "experiment": "e",
        "tracking_uri": "u",
        "reused_stages": {},
        "gallery": "g",
        "metrics": {
            "scored_trips": 66_269,
            "rmse": 5.6,
            "unseen_pu_do_share": 0.05,
            "refused_trips": 45,
            "refused.trip_distance.too_long": 44,
            "refused.DOLocationID.not_a_zone": 1,
        },
    }

    lines = format_score_summary(result).splitlines()

    assert "  trips scored          66,269" in lines
    assert "  trips refused             45 (trip_distance over 100 miles: 44; DOLocationID not a TLC zone: 1)" in lines
