"""Each notebook executed with papermill on small synthetic data, as the pipeline runs it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from taxi_duration import runfiles, settings
from taxi_duration.modeling import model
from taxi_duration.runner import NotebookExecutionError, execute_notebook
from taxi_duration.tracking import mlflow_runs

pytestmark = pytest.mark.notebooks
INLINE_PNG = re.compile(r'<img [^>]*src="data:image/png;base64,')
TIMEOUT = 300


def _run(stage, run_dir, parameters):
    return execute_notebook(
        settings.notebooks_dir() / f"{stage}.ipynb", run_dir / f"{stage}.ipynb", parameters, TIMEOUT
    )


def _outputs(executed_notebook):
    notebook = json.loads(executed_notebook.read_text())
    return [output for cell in notebook["cells"] for output in cell.get("outputs", [])]


def _data_parameters(source, run_dir, data_dir, color="green"):
    return {
        "year": 2023,
        "month": 3,
        "color": color,
        "data_source": str(source),
        "data_dir": str(data_dir),
        "run_dir": str(run_dir),
    }


@pytest.mark.parametrize("color", ["green", "yellow"])
def test_explore_profiles_the_month_with_plots(synthetic_source, isolated_stores, tmp_path, color):
    run_dir = tmp_path / "run"
    result = _run("01_explore", run_dir, _data_parameters(synthetic_source, run_dir, isolated_stores["data"], color))

    manifest = runfiles.read_manifest(run_dir, "01_explore")
    assert manifest["rows"] == 3000
    assert 0 < manifest["filter"]["kept"] < 3000
    assert manifest["share_dropped_by_filter"] == pytest.approx(1 - manifest["filter"]["kept"] / 3000)
    images = [output for output in _outputs(result.executed_notebook) if "image/png" in output.get("data", {})]
    assert len(images) >= 4, "trips per day, nulls, duration and zone plots"
    assert len(INLINE_PNG.findall(result.reports.full.read_text())) == len(images)
    assert len(INLINE_PNG.findall(result.reports.review.read_text())) == len(images)


def test_features_then_train_log_to_the_given_run(synthetic_source, isolated_stores, tmp_path):
    run_dir = tmp_path / "run"
    # As the flow runs it: with the files the flow fetched and validated, which it reads as given
    # (its data source is a folder that does not exist, so a fetch would fail).
    given = {
        role: str(synthetic_source / f"green_tripdata_2023-0{month}.parquet")
        for role, month in (("train_file", 3), ("validation_file", 4))
    }
    parameters = _data_parameters(tmp_path / "no-such-source", run_dir, isolated_stores["data"])
    _run("02_features", run_dir, {**parameters, **given})
    features = runfiles.read_manifest(run_dir, "02_features")
    assert (features["train_file"], features["validation_file"]) == (given["train_file"], given["validation_file"])
    assert (features["train_month"], features["validation_month"]) == ("2023-03", "2023-04")
    assert features["train_rows"] > 2500 and features["val_rows"] > 2500
    assert (run_dir / "preprocessor.b").is_file()

    # Artifacts beside the test's store, as the flow files them (never in the checkout's ./mlruns).
    # Tagged as the flow tags its runs: scoring reads the training month from there.
    run_id = mlflow_runs.start_run(
        isolated_stores["tracking_uri"],
        "notebook-test",
        "notebook-test",
        params={},
        tags={"taxi.train_month": "2023-03"},
    )
    _run(
        "03_train",
        run_dir,
        {
            "run_dir": str(run_dir),
            "tracking_uri": isolated_stores["tracking_uri"],
            "mlflow_run_id": run_id,
            "registered_model": "nyc-taxi-duration",
        },
    )  # as the flow asks

    client = MlflowClient(isolated_stores["tracking_uri"])
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING", "the notebook must leave the caller's run open: the flow owns its status"
    assert run.data.metrics["train_nnz"] == features["train_nnz"]
    assert run.data.metrics["rmse"] < run.data.metrics["baseline_rmse"]
    assert run.data.params["max_depth"] == "30"
    assert [a.path for a in client.list_artifacts(run_id, "preprocessor")] == ["preprocessor/preprocessor.b"]
    trained = runfiles.read_manifest(run_dir, "03_train")
    mlflow.set_tracking_uri(isolated_stores["tracking_uri"])
    assert mlflow.xgboost.load_model(trained["booster_uri"]).num_features() == features["n_features"]
    # The registered champion is the servable model: raw validation trips in, the same RMSE out.
    champion = client.get_model_version_by_alias("nyc-taxi-duration", "champion")
    assert champion.tags["taxi.model_uri"] == trained["model_uri"]
    servable = mlflow.sklearn.load_model(trained["model_uri"])
    records = runfiles.load_validation_records(run_dir)
    assert list(records.columns) == ["PULocationID", "DOLocationID", "trip_distance"]
    assert model.rmse(runfiles.load_matrices(run_dir).y_val, servable.predict(records)) == pytest.approx(
        run.data.metrics["rmse"], rel=1e-6
    )

    # 04_score scores the next month with that champion, into its own folder: a month holding trips
    # the served model refuses, as TLC's files do, which are set aside and counted.
    source, bad = month_with_bad_trips(synthetic_source, tmp_path / "source")
    score_dir = tmp_path / "score"
    result = _run(
        "04_score",
        score_dir,
        {
            "year": 2023,
            "month": 5,
            "color": "green",
            "data_source": str(source),
            "data_dir": str(tmp_path / "score-cache"),
            "run_dir": str(score_dir),
            "tracking_uri": isolated_stores["tracking_uri"],
        },
    )
    scored = runfiles.read_manifest(score_dir, "04_score")
    assert scored["model"]["uri"] == f"models:/nyc-taxi-duration/{champion.version}"
    assert scored["model"]["train_month"] == "2023-03" and scored["has_actuals"] is True
    predictions = pd.read_parquet(score_dir / scored["files"]["predictions"])
    assert len(predictions) == scored["metrics"]["scored_trips"]
    refused = pd.read_parquet(score_dir / scored["files"]["refused"])
    assert refused["reason"].tolist() == list(bad.values()) and not set(refused["ride_id"]) & set(
        predictions["ride_id"]
    )
    assert {key: value for key, value in scored["metrics"].items() if key.startswith("refused")} == {
        "refused_trips": 3,
        "refused.trip_distance.too_long": 1,
        "refused.trip_distance.negative": 1,
        "refused.PULocationID.not_a_zone": 1,
    }
    assert scored["metrics"]["month_trips"] == len(predictions) + 3  # drift covers every trip of the month
    assert scored["metrics"]["rmse"] == pytest.approx(
        model.rmse(predictions["actual_minutes"].to_numpy(), predictions["predicted_minutes"].to_numpy())
    )
    assert scored["metrics"]["training_trips"] == features["train_rows"]
    assert 0 <= scored["metrics"]["unseen_pu_do_share"] <= 1 and scored["metrics"]["distance_psi"] >= 0
    review = result.reports.review.read_text()
    assert "distance PSI" in review and "duration PSI" in review and "(its validation month)" in review
    assert "3 of" in review and "trips refused" in review and "trip_distance over 100 miles" in review
    assert len(INLINE_PNG.findall(review)) == 3, "error by distance, distance and duration distributions"


def month_with_bad_trips(source: Path, folder: Path) -> tuple[Path, dict[int, str]]:
    """The synthetic 2023-05 file with three trips of the 1-60 minute window made unscorable, and their reasons by row."""
    trips = pd.read_parquet(source / "green_tripdata_2023-05.parquet")
    minutes = (trips["lpep_dropoff_datetime"] - trips["lpep_pickup_datetime"]).dt.total_seconds() / 60
    rows = np.flatnonzero(minutes.between(1, 60).to_numpy())[[5, 10, 20]]
    trips.loc[rows[0], "trip_distance"] = 5000.0
    trips.loc[rows[1], "PULocationID"] = 999
    trips.loc[rows[2], "trip_distance"] = -2.0
    folder.mkdir(parents=True)
    trips.to_parquet(folder / "green_tripdata_2023-05.parquet", index=False)
    reasons = ["trip_distance.too_long", "PULocationID.not_a_zone", "trip_distance.negative"]
    return folder, dict(zip(rows.tolist(), reasons, strict=True))


def test_train_standalone_starts_and_finishes_its_own_run(synthetic_source, isolated_stores, tmp_path):
    run_dir = tmp_path / "run"
    _run("02_features", run_dir, _data_parameters(synthetic_source, run_dir, isolated_stores["data"]))
    _run("03_train", run_dir, {"run_dir": str(run_dir)})  # tracking from MLFLOW_TRACKING_URI, no run id

    trained = runfiles.read_manifest(run_dir, "03_train")
    client = MlflowClient(isolated_stores["tracking_uri"])
    run = client.get_run(trained["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["color"] == "green"
    # Exploration does not touch production: nothing registered, no gate decision.
    assert client.search_registered_models() == [] and trained["promotion"] is None
    assert not any(key.startswith("taxi.promotion.") for key in run.data.tags)


def test_train_without_features_fails_naming_the_cell_and_keeps_the_notebook(isolated_stores, tmp_path):
    run_dir = tmp_path / "empty-run"
    with pytest.raises(NotebookExecutionError) as raised:
        _run("03_train", run_dir, {"run_dir": str(run_dir)})

    message = str(raised.value)
    assert "03_train.ipynb" in message and "MissingRunFileError" in message and "cell" in message
    assert raised.value.result.executed_notebook.is_file()
    review = raised.value.result.reports.review.read_text()
    assert "This notebook failed" in review and "MissingRunFileError" in review
