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

from taxi_duration import features, model
from taxi_duration.data import read_trips

pytestmark = pytest.mark.flow

SCORING_EXPERIMENT = "nyc-taxi-duration-scoring"
RAW_COLUMNS = ["PULocationID", "DOLocationID", "trip_distance"]


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
    tail = real_run.scoring_stdout[real_run.scoring_stdout.index("Scoring finished"):]
    assert "green taxis of 2023-05 with nyc-taxi-duration v1 (trained on 2023-03)" in tail
    (run,) = _scoring_runs(real_run.tracking_uri)
    assert run.info.status == "FINISHED"
    assert run.data.params["model_uri"] == "models:/nyc-taxi-duration/1"
    assert run.data.params["requested_model_uri"] == "models:/nyc-taxi-duration@champion"

    # One prediction per 1-60 minute trip of 2023-05, with the columns the issue names.
    run_dir = Path(run.data.tags["taxi.run_dir"])
    predictions = pd.read_parquet(run_dir / "predictions" / "green_2023-05.parquet")
    source_file = real_run.data / "green_tripdata_2023-05.parquet"
    expected = _window_trips(source_file)
    assert len(predictions) == len(expected)
    assert list(predictions.columns) == ["ride_id", "pickup_datetime", "PULocationID", "DOLocationID", "trip_distance",
                                         "predicted_minutes", "actual_minutes", "model_name", "model_version"]
    assert predictions["ride_id"].is_unique and predictions["ride_id"].str.fullmatch(r"2023/05_\d+").all()
    assert set(predictions["model_name"]) == {"nyc-taxi-duration"} and set(predictions["model_version"]) == {"1"}
    np.testing.assert_allclose(predictions["actual_minutes"].to_numpy(), expected["duration"].to_numpy())

    # Its RMSE is the logged model's, computed here directly.
    mlflow.set_tracking_uri(real_run.tracking_uri)
    champion = mlflow.sklearn.load_model("models:/nyc-taxi-duration/1")
    direct = model.rmse(expected["duration"].to_numpy(), champion.predict(expected[RAW_COLUMNS]))
    metrics = run.data.metrics
    assert metrics["rmse"] == pytest.approx(direct, rel=1e-9)
    assert re.search(rf"RMSE\s+{direct:.3f} minutes on 2023-05 \(registered with 5\.47\d\)", tail)
    assert metrics["scored_trips"] == len(expected) and metrics["training_trips"] == 69_392

    # The report names the drift figures, and the run logs them.
    report = (run_dir / "04_score.review.html").read_text()
    for figure in ("trips (1-60 min)", "distance mean (mi)", "distance PSI", "duration PSI",
                   "PU_DO pairs unseen in training", "2023-03 (training)", "2023-05 (scored)"):
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
    contexts = {e.dataset.name: {t.key: t.value for t in e.tags}["mlflow.data.context"]
                for e in training_run.inputs.dataset_inputs}
    assert contexts == {"green_tripdata_2023-03.parquet": "training", "green_tripdata_2023-04.parquet": "validation"}

    index = (real_run.outputs / "index.html").read_text()
    assert "scores 2023-05 with nyc-taxi-duration v1" in index
    assert f'href="{run_dir.relative_to(real_run.outputs).as_posix()}/04_score.review.html"' in index


@pytest.mark.realdata
def test_a_reopened_scoring_notebook_reproduces_the_scoring_run(real_run, tmp_path):
    import papermill

    from taxi_duration import reopen, runfiles
    from taxi_duration.past_runs import find_run

    (run,) = _scoring_runs(real_run.tracking_uri)
    past = find_run(run.info.run_id[:8], real_run.outputs)
    assert (past.kind, reopen.default_stage(past)) == ("score", "04_score")
    reopened = reopen.reopen(past, "04_score", notebooks_dir=tmp_path)
    assert reopened.parameters["model_uri"] == "models:/nyc-taxi-duration/1"  # pinned: the version it scored with
    papermill.execute_notebook(str(reopened.notebook), str(tmp_path / "executed.ipynb"), cwd=str(reopened.notebook.parent),
                               progress_bar=False)
    scratch = reopened.notebook.parent / reopen.SCRATCH_RUN_FOLDER
    assert runfiles.read_manifest(scratch, "04_score")["metrics"]["rmse"] == pytest.approx(run.data.metrics["rmse"], rel=1e-9)
    assert (scratch / "predictions" / "green_2023-05.parquet").is_file()
    assert "make reopen RUN=" + past.short_id + " STAGE=04_score" in (past.folder / "04_score.review.html").read_text()


def _post(url: str, payload: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
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
            [str(bin_dir / "mlflow"), "models", "serve", "-m", "models:/nyc-taxi-duration@champion", "--env-manager",
             "local", "--host", "127.0.0.1", "--port", str(port)],
            env={**os.environ, "MLFLOW_TRACKING_URI": real_run.tracking_uri, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"},
            cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
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

        status, body = _post(f"http://127.0.0.1:{port}/invocations",
                             {"dataframe_split": sample[RAW_COLUMNS].to_dict(orient="split", index=False)})
        assert status == 200, body
        np.testing.assert_allclose(body["predictions"], sample["predicted_minutes"].to_numpy(), rtol=1e-6)

        # The README's two-trip request, as records.
        two = sample[RAW_COLUMNS].head(2)
        status, body = _post(f"http://127.0.0.1:{port}/invocations",
                             {"dataframe_records": json.loads(two.to_json(orient="records"))})
        assert status == 200 and len(body["predictions"]) == 2

        # A request missing a column is refused with a 400 naming it, and the server stays up.
        status, body = _post(f"http://127.0.0.1:{port}/invocations",
                             {"dataframe_records": [{"PULocationID": 74, "trip_distance": 1.2}]})
        assert status == 400 and "DOLocationID" in body["message"], body
        assert server.poll() is None
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_scoring_cli_reuses_refuses_and_scores_a_month_without_durations(
    green_run, pipeline_cli, synthetic_source, tmp_path
):
    # A copy of the green run's store: its champion (v1, trained on synthetic 2023-03) scores here.
    shutil.copyfile(green_run.tracking_uri.removeprefix("sqlite:///"), tmp_path / "mlflow.db")
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {"MLFLOW_TRACKING_URI": tracking_uri, "TAXI_OUTPUTS_DIR": str(tmp_path / "outputs"),
           "TAXI_DATA_DIR": str(tmp_path / "data")}

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
