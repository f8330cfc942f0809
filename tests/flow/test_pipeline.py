"""The whole flow, end to end, through its command line, read back through MlflowClient."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import mlflow
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from taxi_duration import runfiles, serving
from taxi_duration.modeling import model
from taxi_duration.servers import local_servers

pytestmark = pytest.mark.flow

INLINE_PNG = re.compile(r'<img [^>]*src="data:image/png;base64,')
NOTEBOOKS = ["01_explore", "02_features", "03_train"]
REPORTS = sorted(f"{name}{suffix}" for name in NOTEBOOKS for suffix in (".html", ".review.html"))


def _only_run(tracking_uri: str, experiment: str = "nyc-taxi-duration"):
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1, f"one MLflow run per pipeline execution, found {len(runs)}"
    return client, runs[0]


def _artifact_names(client, run_id, folder):
    return sorted(Path(artifact.path).name for artifact in client.list_artifacts(run_id, folder))


@pytest.mark.realdata
def test_real_green_2023_03_reproduces_the_reference_model(real_run):
    # The terminal ends with the figures users look for.
    tail = real_run.training_stdout[real_run.training_stdout.index("Pipeline finished") :]
    assert re.search(r"train matrix\s+69,392 rows\s+138,784 non-zeros", tail)
    assert re.search(r"validation matrix\s+62,979 rows\s+122,674 non-zeros", tail)
    assert re.search(r"features\s+6,053", tail)
    assert re.search(r"validation RMSE\s+5\.47\d minutes", tail)

    client, run = _only_run(real_run.tracking_uri)
    run_id = run.info.run_id
    assert f"MLflow run        {run_id}" in tail
    assert run.info.status == "FINISHED"
    metrics = run.data.metrics
    assert (metrics["train_nnz"], metrics["val_nnz"], metrics["n_features"]) == (138_784, 122_674, 6_053)
    assert (metrics["train_rows"], metrics["val_rows"]) == (69_392, 62_979)
    assert metrics["rmse"] == pytest.approx(5.47, abs=0.01)
    params = run.data.params
    assert (params["year"], params["month"], params["color"]) == ("2023", "3", "green")
    assert params["learning_rate"] == "0.09585355369315604" and params["num_boost_round"] == "30"
    assert params["early_stopping_rounds"] == "50" and params["seed"] == "42"
    tags = run.data.tags
    assert re.fullmatch(r"[0-9a-f-]{36}", tags["prefect.flow_run_id"])
    assert re.fullmatch(r"[0-9a-f]{40}", tags["mlflow.source.git.commit"])

    assert _artifact_names(client, run_id, "notebooks") == [f"{name}.ipynb" for name in NOTEBOOKS]
    assert _artifact_names(client, run_id, "reports") == REPORTS
    assert _artifact_names(client, run_id, "preprocessor") == ["preprocessor.b"]
    report = Path(client.download_artifacts(run_id, "reports/03_train.review.html")).read_text()
    assert len(INLINE_PNG.findall(report)) >= 4, "predicted-vs-actual, residuals, error by distance, importances"
    assert "5.470923" in report and "baseline: training mean" in report

    # The logged models have signatures and, loaded back, score the same validation RMSE: the
    # booster on the matrices, the servable model on the validation trips' raw fields.
    run_dir = Path(tags["taxi.run_dir"])
    assert run_dir.is_relative_to(real_run.outputs / "green" / "2023-03")
    assert sorted(path.name for path in run_dir.glob("*.html")) == REPORTS
    manifest = runfiles.read_manifest(run_dir, "03_train")
    mlflow.set_tracking_uri(real_run.tracking_uri)
    assert mlflow.models.get_model_info(manifest["booster_uri"]).signature is not None
    booster = mlflow.xgboost.load_model(manifest["booster_uri"])
    matrices = runfiles.load_matrices(run_dir)
    assert model.rmse(matrices.y_val, model.predict(booster, matrices.X_val)) == pytest.approx(
        metrics["rmse"], rel=1e-6
    )
    servable_info = mlflow.models.get_model_info(manifest["model_uri"])
    assert servable_info.signature.inputs.input_names() == ["PULocationID", "DOLocationID", "trip_distance"]
    servable = mlflow.sklearn.load_model(manifest["model_uri"])
    records = runfiles.load_validation_records(run_dir)
    # Over every validation trip, as the booster's RMSE and the gate count them; served, the batch
    # is refused: it holds 37 of TLC's meter errors, trips of over 100 miles.
    every_trip = serving.predict_every_trip(servable, records)
    assert model.rmse(matrices.y_val, every_trip) == pytest.approx(metrics["rmse"], rel=1e-6)
    assert serving.refusal_reasons(records).value_counts().to_dict() == {"trip_distance.too_long": 37}
    with pytest.raises(MlflowException, match="refused the whole batch: 37 of its 62,979 trips"):
        servable.predict(records)
    logged = client.search_logged_models([run.info.experiment_id])
    assert sorted(m.name for m in logged) == ["model", "servable_model"]
    assert {m.source_run_id for m in logged} == {run_id}

    # The run names its two input files, with their digests, in MLflow's Datasets tab.
    datasets = {entry.dataset.name: entry for entry in client.get_run(run_id).inputs.dataset_inputs}
    assert sorted(datasets) == ["green_tripdata_2023-03.parquet", "green_tripdata_2023-04.parquet"]
    for name, context in (
        ("green_tripdata_2023-03.parquet", "training"),
        ("green_tripdata_2023-04.parquet", "validation"),
    ):
        sha256 = hashlib.sha256((real_run.data / name).read_bytes()).hexdigest()
        entry = datasets[name]
        assert entry.dataset.digest == sha256[:16] and json.loads(entry.dataset.profile)["sha256"] == sha256
        assert json.loads(entry.dataset.profile)["num_rows"] == pq.read_metadata(real_run.data / name).num_rows
        assert {tag.key: tag.value for tag in entry.tags}["mlflow.data.context"] == context

    # The first model in a fresh registry becomes champion, and the run says why: the servable one.
    version = client.get_model_version_by_alias("nyc-taxi-duration", "champion")
    assert version.run_id == run_id and version.tags["taxi.model_uri"] == manifest["model_uri"]
    assert tags["taxi.promotion.decision"] == "promoted" and "first" in tags["taxi.promotion.reason"]

    # The gallery lists the run with its RMSE and links to every report.
    index = (real_run.outputs / "index.html").read_text()
    folder = run_dir.relative_to(real_run.outputs).as_posix()
    assert "5.471" in index and "FINISHED" in index
    for name in REPORTS:
        assert f'href="{folder}/{name}"' in index


def test_yellow_taxis_run_end_to_end_with_another_experiment_and_a_big_month_is_explored_first(
    run_pipeline, synthetic_source, isolated_stores, notebook_task_windows, prefect_reads
):
    # Every month counts as big here (TAXI_OVERLAP_MAX_TRIPS=0): 01_explore runs before 02_features.
    completed = run_pipeline(
        "--year",
        "2023",
        "--month",
        "4",
        "--color",
        "yellow",
        "--data-source",
        str(synthetic_source),
        "--experiment",
        "yellow-check",
        extra_env={"TAXI_OVERLAP_MAX_TRIPS": "0"},
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    # No warning a user cannot act on: every plot carries alt text, so nbconvert has none to give.
    assert "Alternative text is missing" not in completed.stdout + completed.stderr
    assert "Warning" not in completed.stderr, completed.stderr[-3000:]
    client, run = _only_run(isolated_stores["tracking_uri"], "yellow-check")
    assert run.info.status == "FINISHED"
    assert run.data.params["color"] == "yellow"
    assert run.data.tags["taxi.validation_month"] == "2023-05"
    assert run.data.metrics["rmse"] < run.data.metrics["baseline_rmse"]
    assert _artifact_names(client, run.info.run_id, "reports") == REPORTS

    # Read back as the Prefect UI shows them, from the tests' local server the run reported to.
    artifacts = {
        artifact.key: artifact
        for artifact in prefect_reads.artifacts(prefect_reads.api(), run.data.tags["prefect.flow_run_id"])
    }
    summary = artifacts["taxi-duration-yellow-2023-04"]
    assert summary.type == "markdown" and f"{run.data.metrics['rmse']:.3f}" in summary.data
    timings = json.loads(artifacts["taxi-duration-yellow-2023-04-timings"].data)
    assert [row["stage"] for row in timings] == ["fetch-trip-files", *NOTEBOOKS]
    assert all(row["status"] == "COMPLETED" and row["seconds"] > 0 for row in timings)

    server = local_servers.read_state("prefect")  # the tests' local server, which the run started or reused
    assert server is not None
    windows = notebook_task_windows(server["env_value"], run.data.tags["prefect.flow_run_id"])
    explore, features = windows["01_explore"], windows["02_features"]
    assert explore[1] <= features[0], "a big month is explored before it is featurized"
    _assert_training_waits_for_both(windows)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--month", "13"], "month must be between 1 and 12"),
        (["--month", "0"], "month must be between 1 and 12"),
        (["--year", "20x4"], "year must be a whole number"),
        (["--color", "purple"], "color must be one of green, yellow"),
        (["--year", "2012", "--color", "green"], "from 2013-08 on"),
        (["--data-source", "/no/such/folder"], "no such folder"),
    ],
)
@pytest.mark.no_tracking_store
def test_bad_parameters_are_rejected_before_anything_runs(run_pipeline, isolated_stores, args, message):
    completed = run_pipeline(*args)
    assert completed.returncode == 2
    assert message in completed.stderr
    assert not Path(isolated_stores["tracking_uri"].removeprefix("sqlite:///")).exists(), "no MLflow run may be created"
    assert not isolated_stores["data"].exists(), "nothing may be downloaded"


def test_a_failing_notebook_marks_the_run_failed_and_archives_what_ran(
    run_pipeline, synthetic_source, isolated_stores, tmp_path
):
    # A training month in which every trip lasts zero minutes: 02_features has nothing to fit.
    source = tmp_path / "broken-source"
    source.mkdir()
    table = pq.read_table(synthetic_source / "green_tripdata_2023-03.parquet")
    frame = table.to_pandas()
    frame["lpep_dropoff_datetime"] = frame["lpep_pickup_datetime"]
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), source / "green_tripdata_2023-03.parquet")
    (source / "green_tripdata_2023-04.parquet").write_bytes(
        (synthetic_source / "green_tripdata_2023-04.parquet").read_bytes()
    )

    completed = run_pipeline("--data-source", str(source))
    assert completed.returncode == 1
    assert "02_features.ipynb failed" in completed.stderr and "no training trips left" in completed.stderr

    client, run = _only_run(isolated_stores["tracking_uri"])
    assert run.info.status == "FAILED"
    assert _artifact_names(client, run.info.run_id, "notebooks") == ["01_explore.ipynb", "02_features.ipynb"]
    assert _artifact_names(client, run.info.run_id, "reports") == REPORTS[:4]
    assert "rmse" not in run.data.metrics

    # The gallery shows the failure; the failed stage's report says why at the top.
    record = json.loads(next(isolated_stores["outputs"].glob("green/2023-03/*/run.json")).read_text())
    assert record["status"] == "FAILED" and "no training trips left" in record["error"]
    assert [(s["stage"], s["status"]) for s in record["stages"]] == [
        ("fetch-trip-files", "COMPLETED"),
        ("01_explore", "COMPLETED"),
        ("02_features", "FAILED"),
    ]
    assert "FAILED" in (isolated_stores["outputs"] / "index.html").read_text()
    review = next(isolated_stores["outputs"].glob("green/2023-03/*/02_features.review.html")).read_text()
    assert review.index("This notebook failed") < review.index("02 · Features")


def _assert_training_waits_for_both(windows: dict[str, tuple]) -> None:
    explore, features, train = (windows[stage] for stage in NOTEBOOKS)
    assert train[0] >= max(explore[1], features[1]), "training waits for both"


def test_explore_runs_beside_features(green_run):
    windows = green_run.task_windows
    explore, features = windows["01_explore"], windows["02_features"]
    assert features[0] < explore[1], "02_features started while 01_explore ran"
    _assert_training_waits_for_both(windows)


def test_the_prefect_ui_shows_progress_links_and_the_summary(green_run, prefect_reads):
    (record_path,) = green_run.outputs.glob("green/2023-03/*/run.json")
    record = json.loads(record_path.read_text())
    artifacts = prefect_reads.artifacts(prefect_reads.api(), record["prefect_flow_run_id"])

    # Each executed stage's task run has a progress artifact that reached all of its cells.
    task_names = {
        run.id: run.name for run in prefect_reads.task_runs(prefect_reads.api(), record["prefect_flow_run_id"])
    }
    progress = {task_names[artifact.task_run_id]: artifact for artifact in artifacts if artifact.type == "progress"}
    assert sorted(progress) == list(NOTEBOOKS)
    assert all(artifact.data == 100 for artifact in progress.values())
    assert all(f"{stage}: cells done out of" in progress[stage].description for stage in NOTEBOOKS)
    running = [artifact for artifact in artifacts if artifact.key == "running-cell-03-train"]
    assert running and any(re.search(r"running cell \d+ of \d+ for \d+ s", artifact.data) for artifact in running)

    # Links, not ids: every review report and the gallery, as file:// URLs that exist (MLflow is SQLite here).
    links = {
        artifact.description: artifact.data
        for artifact in artifacts
        if artifact.task_run_id is None and artifact.key is None and artifact.type == "markdown"
    }
    assert set(links) == {f"{stage} review report" for stage in NOTEBOOKS} | {"all runs (gallery)"}
    for text, markdown in links.items():
        url = re.fullmatch(r"\[(.+)\]\((file://\S+)\)", markdown)
        assert url and url[1] == text, markdown
        assert Path(url[2].removeprefix("file://")).is_file(), url[2]

    # The summary uses the same links, and the MLflow run carries it as its description.
    (summary,) = [artifact for artifact in artifacts if artifact.key == "taxi-duration-green-2023-03"]
    assert "## Links" in summary.data and links["03_train review report"] in summary.data
    note = MlflowClient(green_run.tracking_uri).get_run(record["mlflow_run_id"]).data.tags["mlflow.note.content"]
    assert note == summary.data
