"""Scoring a month with the champion (flows/score.py, 04_score) and serving the champion over HTTP."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from taxi_duration import serving
from taxi_duration.data.tripfiles import read_trips
from taxi_duration.modeling import features, model

pytestmark = pytest.mark.flow

SCORING_EXPERIMENT = "nyc-taxi-duration-scoring"
RAW_COLUMNS = ["PULocationID", "DOLocationID", "trip_distance"]
PROJECT_DIR = Path(__file__).resolve().parents[2]


def _scoring_runs(tracking_uri: str) -> list:
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(SCORING_EXPERIMENT)
    assert experiment is not None, f"no experiment {SCORING_EXPERIMENT!r}"
    return client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])


def _window_trips(path: Path) -> pd.DataFrame:
    """The file's trips in the 1-60 minute window, computed here from the raw file."""
    trips = read_trips(path, "green")
    duration = features.trip_duration_minutes(trips, "green")
    return trips[features.in_duration_window(duration)].assign(duration=duration)


@pytest.mark.realdata
def test_real_2023_05_scored_with_the_2023_03_champion(real_run):
    tail = real_run.scoring_stdout[real_run.scoring_stdout.index("Scoring finished") :]
    assert "green taxis of 2023-05 with nyc-taxi-duration v1 (trained on 2023-03)" in tail
    (run,) = _scoring_runs(real_run.tracking_uri)
    assert run.info.status == "FINISHED"
    assert run.data.params["model_uri"] == "models:/nyc-taxi-duration/1"
    assert run.data.params["requested_model_uri"] == "models:/nyc-taxi-duration@champion"

    # One prediction per 1-60 minute trip of 2023-05 the model can score, with the columns the issue
    # names. The others are TLC's meter errors: 44 trips of over 100 miles (1,415 to 267,006), set
    # aside and counted rather than failing the month.
    run_dir = Path(run.data.tags["taxi.run_dir"])
    predictions = pd.read_parquet(run_dir / "predictions" / "green_2023-05.parquet")
    source_file = real_run.data / "green_tripdata_2023-05.parquet"
    window = _window_trips(source_file)
    too_long = window["trip_distance"] > serving.MAX_TRIP_MILES
    assert int(too_long.sum()) == 44 and serving.refusal_reasons(window[~too_long]).isna().all()
    expected = window[~too_long]
    assert len(predictions) == len(expected)
    refused = pd.read_parquet(run_dir / "refused" / "green_2023-05.parquet")
    assert len(refused) == 44 and set(refused["reason"]) == {"trip_distance.too_long"}
    assert not set(refused["ride_id"]) & set(predictions["ride_id"])
    assert re.search(r"trips refused\s+44 \(trip_distance over 100 miles: 44\)", tail)
    assert list(predictions.columns) == [
        "ride_id",
        "pickup_datetime",
        "PULocationID",
        "DOLocationID",
        "trip_distance",
        "predicted_minutes",
        "actual_minutes",
        "model_name",
        "model_version",
    ]
    assert predictions["ride_id"].is_unique and predictions["ride_id"].str.fullmatch(r"2023/05_\d+").all()
    assert set(predictions["model_name"]) == {"nyc-taxi-duration"} and set(predictions["model_version"]) == {"1"}
    np.testing.assert_allclose(predictions["actual_minutes"].to_numpy(), expected["duration"].to_numpy())

    # Its RMSE is the logged model's on the trips it scored, computed here directly.
    mlflow.set_tracking_uri(real_run.tracking_uri)
    champion = mlflow.sklearn.load_model("models:/nyc-taxi-duration/1")
    direct = model.rmse(expected["duration"].to_numpy(), champion.predict(expected[RAW_COLUMNS]))
    metrics = run.data.metrics
    assert metrics["rmse"] == pytest.approx(direct, rel=1e-9)
    assert re.search(rf"RMSE\s+{direct:.3f} minutes on 2023-05 \(registered with 5\.47\d\)", tail)
    assert metrics["scored_trips"] == len(expected) and metrics["training_trips"] == 69_392
    assert metrics["refused_trips"] == 44 and metrics["refused.trip_distance.too_long"] == 44
    assert metrics["month_trips"] == len(window)  # the drift figures cover every trip of the month

    # The report names the drift figures, and the run logs them.
    report = (run_dir / "04_score.review.html").read_text()
    for figure in (
        "trips (1-60 min)",
        "distance mean (mi)",
        "distance PSI",
        "duration PSI",
        "PU_DO pairs unseen in training",
        "2023-03 (training)",
        "2023-05 (scored)",
        "Refused trips",
        "44 of 66,313 trips refused",
        "trip_distance over 100 miles",
    ):
        assert figure in report, figure
    for key in ("distance_psi", "duration_psi", "unseen_pu_do_share", "trip_count_ratio"):
        assert np.isfinite(metrics[key]), key

    # The scoring run names its file (context scoring) with its digest; the training run its two.
    client = MlflowClient(real_run.tracking_uri)
    (entry,) = client.get_run(run.info.run_id).inputs.dataset_inputs
    sha256 = hashlib.sha256(source_file.read_bytes()).hexdigest()
    assert entry.dataset.name == "green_tripdata_2023-05.parquet" and entry.dataset.digest == sha256[:16]
    assert json.loads(entry.dataset.profile) == {"num_rows": pq.read_metadata(source_file).num_rows, "sha256": sha256}
    assert {tag.key: tag.value for tag in entry.tags}["mlflow.data.context"] == "scoring"
    assert json.loads(entry.dataset.source) == {"uri": str(source_file.resolve())}
    training_run = client.get_run(client.get_model_version("nyc-taxi-duration", "1").run_id)
    contexts = {
        e.dataset.name: {t.key: t.value for t in e.tags}["mlflow.data.context"]
        for e in training_run.inputs.dataset_inputs
    }
    assert contexts == {"green_tripdata_2023-03.parquet": "training", "green_tripdata_2023-04.parquet": "validation"}

    index = (real_run.outputs / "index.html").read_text()
    assert "scores 2023-05 with nyc-taxi-duration v1" in index
    assert f'href="{run_dir.relative_to(real_run.outputs).as_posix()}/04_score.review.html"' in index


@pytest.mark.realdata
def test_a_reopened_scoring_notebook_reproduces_the_scoring_run(real_run, tmp_path):
    import papermill

    from taxi_duration import runfiles
    from taxi_duration.review import reopen
    from taxi_duration.review.past_runs import find_run

    (run,) = _scoring_runs(real_run.tracking_uri)
    past = find_run(run.info.run_id[:8], real_run.outputs)
    assert (past.kind, reopen.default_stage(past)) == ("score", "04_score")
    reopened = reopen.reopen(past, "04_score", notebooks_dir=tmp_path)
    assert reopened.parameters["model_uri"] == "models:/nyc-taxi-duration/1"  # pinned: the version it scored with
    papermill.execute_notebook(
        str(reopened.notebook), str(tmp_path / "executed.ipynb"), cwd=str(reopened.notebook.parent), progress_bar=False
    )
    scratch = reopened.notebook.parent / reopen.SCRATCH_RUN_FOLDER
    assert runfiles.read_manifest(scratch, "04_score")["metrics"]["rmse"] == pytest.approx(
        run.data.metrics["rmse"], rel=1e-9
    )
    assert (scratch / "predictions" / "green_2023-05.parquet").is_file()
    assert "make reopen RUN=" + past.short_id + " STAGE=04_score" in (past.folder / "04_score.review.html").read_text()


VALID_TRIP = {"PULocationID": 74, "DOLocationID": 75, "trip_distance": 1.2}
# One bad trip per rule, as a client sends it over HTTP, and how the refusal names it.
REFUSALS = [
    ({**VALID_TRIP, "trip_distance": -1.2}, "trip_distance -1.2 is negative"),
    ({**VALID_TRIP, "trip_distance": None}, "trip_distance is missing"),
    ({"PULocationID": 74, "DOLocationID": 75}, "trip_distance is missing"),
    ({**VALID_TRIP, "trip_distance": 250000.0}, "trip_distance 250000.0 is over 100 miles"),
    ({**VALID_TRIP, "PULocationID": 999}, "PULocationID 999 is not a TLC zone"),
    ({**VALID_TRIP, "DOLocationID": 0}, "DOLocationID 0 is not a TLC zone"),
    ({**VALID_TRIP, "PULocationID": 74.5}, "PULocationID 74.5 is not a whole number"),
    ({**VALID_TRIP, "DOLocationID": None}, "DOLocationID is missing"),
    ({**VALID_TRIP, "PULocationID": "74"}, "PULocationID '74' is not a number"),
]


def readme_curl_payload() -> dict:
    """The JSON the README's curl example sends to the served model."""
    readme = (PROJECT_DIR / "README.md").read_text()
    match = re.search(r"curl -s http://127\.0\.0\.1:5002/invocations .*?-d '(?P<payload>[^']+)'", readme, re.DOTALL)
    assert match, "the README shows a curl request to the served model"
    return json.loads(match["payload"])


def champion_files(tracking_uri: str, folder: Path) -> Path:
    """The registered champion's files (MLmodel, its input example...), downloaded into `folder`."""
    import mlflow.artifacts

    mlflow.set_tracking_uri(tracking_uri)  # the registry's models:/ URIs resolve through it
    return Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri="models:/nyc-taxi-duration@champion",
            dst_path=str(folder / "champion"),
            tracking_uri=tracking_uri,
        )
    )


def _post(url: str, payload: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.mark.realdata
def test_champion_served_over_http_answers_like_the_scoring_notebook(real_run, free_port, tmp_path):
    (run,) = _scoring_runs(real_run.tracking_uri)
    predictions = pd.read_parquet(Path(run.data.tags["taxi.run_dir"]) / "predictions" / "green_2023-05.parquet")
    sample = predictions.sample(200, random_state=3)
    port = free_port()
    bin_dir = Path(sys.executable).parent
    # What the README shows: mlflow models serve on the champion, in this environment.
    with open(tmp_path / "serve.log", "wb") as log:  # the server holds its own copy of the file
        server = subprocess.Popen(
            [
                str(bin_dir / "mlflow"),
                "models",
                "serve",
                "-m",
                "models:/nyc-taxi-duration@champion",
                "--env-manager",
                "local",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            env={
                **os.environ,
                "MLFLOW_TRACKING_URI": real_run.tracking_uri,
                "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
            },
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5):
                    break
            except OSError:
                assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "the model server did not answer /ping within 180 s"
                time.sleep(0.5)

        invocations = f"http://127.0.0.1:{port}/invocations"
        status, body = _post(invocations, {"dataframe_split": sample[RAW_COLUMNS].to_dict(orient="split", index=False)})
        assert status == 200, body
        np.testing.assert_allclose(body["predictions"], sample["predicted_minutes"].to_numpy(), rtol=1e-6)

        # The README's request, as its curl sends it, and the registered model's input example.
        status, body = _post(invocations, readme_curl_payload())
        assert status == 200 and len(body["predictions"]) == 2, body
        example = json.loads(
            (champion_files(real_run.tracking_uri, tmp_path) / "serving_input_example.json").read_text()
        )
        status, body = _post(invocations, example)
        assert status == 200 and len(body["predictions"]) == len(example["dataframe_split"]["data"]) == 5, body

        # Each rule: the whole batch is refused with a 400 naming the row, the field and the rule.
        for trip, words in REFUSALS:
            status, body = _post(invocations, {"dataframe_records": [VALID_TRIP, trip]})
            assert status == 400 and body["error_code"] == "INVALID_PARAMETER_VALUE", (trip, body)
            assert "refused the whole batch: 1 of its 2 trips" in body["message"], body
            assert f"row 1: {words}" in body["message"] and "The rules: " in body["message"], (trip, body)
        status, body = _post(invocations, {"dataframe_records": [{"PULocationID": 74, "trip_distance": 1.2}]})
        assert status == 400 and "lack the column(s) DOLocationID" in body["message"], body

        # What the rules let through: 74.0 is zone 74; TLC's zones 264 and 265; 0 and 100 miles.
        status, body = _post(invocations, {"dataframe_records": [VALID_TRIP, {**VALID_TRIP, "PULocationID": 74.0}]})
        assert status == 200 and body["predictions"][0] == body["predictions"][1], body
        status, body = _post(
            invocations,
            {
                "dataframe_records": [
                    {"PULocationID": 264, "DOLocationID": 265, "trip_distance": 0.0},
                    {"PULocationID": 265, "DOLocationID": 264, "trip_distance": 100},
                ]
            },
        )
        assert status == 200 and len(body["predictions"]) == 2, body

        # An empty batch, however sent, gets an empty answer.
        for empty in (
            {"dataframe_records": []},
            {"dataframe_split": {"columns": RAW_COLUMNS, "data": []}},
            {"inputs": []},
        ):
            status, body = _post(invocations, empty)
            assert (status, body) == (200, {"predictions": []}), (empty, body)
        assert server.poll() is None
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


@pytest.mark.realdata
def test_mlflow_models_predict_refuses_a_bad_batch_too(real_run, tmp_path):
    bin_dir = Path(sys.executable).parent
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": real_run.tracking_uri,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
    }

    def predict(payload: dict) -> subprocess.CompletedProcess:
        (tmp_path / "input.json").write_text(json.dumps(payload))
        return subprocess.run(
            [
                str(bin_dir / "mlflow"),
                "models",
                "predict",
                "-m",
                "models:/nyc-taxi-duration@champion",
                "-i",
                str(tmp_path / "input.json"),
                "-t",
                "json",
                "--env-manager",
                "local",
            ],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )

    refused = predict({"dataframe_records": [VALID_TRIP, {**VALID_TRIP, "PULocationID": 74.5}]})
    assert refused.returncode != 0
    assert "row 1: PULocationID 74.5 is not a whole number" in refused.stderr, refused.stderr[-3000:]
    answered = predict(readme_curl_payload())
    assert answered.returncode == 0, answered.stderr[-3000:]
    assert len(json.loads(answered.stdout.strip().splitlines()[-1])["predictions"]) == 2


def test_scoring_cli_reuses_refuses_and_scores_a_month_without_durations(
    green_run, pipeline_cli, synthetic_source, tmp_path
):
    # A copy of the green run's store: its champion (v1, trained on synthetic 2023-03) scores here.
    shutil.copyfile(green_run.tracking_uri.removeprefix("sqlite:///"), tmp_path / "mlflow.db")
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {
        "MLFLOW_TRACKING_URI": tracking_uri,
        "TAXI_OUTPUTS_DIR": str(tmp_path / "outputs"),
        "TAXI_DATA_DIR": str(tmp_path / "data"),
    }

    def score(*args: str) -> subprocess.CompletedProcess:
        return pipeline_cli("--year", "2023", *args, env=env, script="score.py")

    first = score("--month", "5", "--data-source", str(synthetic_source))
    assert first.returncode == 0, first.stderr[-3000:]
    assert "Scoring finished: green taxis of 2023-05 with nyc-taxi-duration v1" in first.stdout
    expected = _window_trips(synthetic_source / "green_tripdata_2023-05.parquet")
    assert re.search(rf"trips scored\s+{len(expected):,}", first.stdout)

    # The same month, file and model version: 04_score is reused, and says so.
    again = score("--month", "5", "--data-source", str(synthetic_source))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "reused, unchanged 04_score" in again.stdout
    first_run, second_run = _scoring_runs(tracking_uri)
    assert second_run.data.tags["taxi.stage.04_score.reused_from_run"] == first_run.info.run_id
    assert second_run.data.metrics["rmse"] == first_run.data.metrics["rmse"]

    # A model the registry does not have is refused before anything runs.
    refused = score("--month", "5", "--data-source", str(synthetic_source), "--model", "models:/nyc-taxi-duration@nope")
    assert refused.returncode == 2 and "alias 'nope'" in refused.stderr, refused.stderr[-2000:]
    assert len(_scoring_runs(tracking_uri)) == 2

    # A month whose dropoff times are not published yet: every trip is scored, accuracy unavailable.
    unpublished = tmp_path / "unpublished"
    unpublished.mkdir()
    trips = pd.read_parquet(synthetic_source / "green_tripdata_2023-05.parquet")
    trips.drop(columns=["lpep_dropoff_datetime"]).to_parquet(unpublished / "green_tripdata_2023-06.parquet")
    partial = score("--month", "6", "--data-source", str(unpublished))
    assert partial.returncode == 0, partial.stderr[-3000:]
    assert "RMSE              unavailable: 2023-06 has no actual durations yet" in partial.stdout
    latest = _scoring_runs(tracking_uri)[-1]
    assert "rmse" not in latest.data.metrics and latest.data.metrics["scored_trips"] == len(trips)
    run_dir = Path(latest.data.tags["taxi.run_dir"])
    scored = pd.read_parquet(run_dir / "predictions" / "green_2023-06.parquet")
    assert len(scored) == len(trips) and scored["actual_minutes"].isna().all()
    assert "Accuracy unavailable" in (run_dir / "04_score.review.html").read_text()

    index = (tmp_path / "outputs" / "index.html").read_text()
    assert index.count("scores 2023-05 with nyc-taxi-duration v1") == 2 and "scores 2023-06" in index
