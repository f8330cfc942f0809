"""Reruns: failures resume, unchanged stages are reused, edits and new data invalidate downstream.

One history of runs in one store (a failed run first), so each case costs one run, not a fresh history.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nbformat
import pytest
from mlflow.tracking import MlflowClient
from nbformat.v4 import new_code_cell, new_markdown_cell

from taxi_duration.data.periods import Month
from taxi_duration.data.synthetic import write_trip_file

pytestmark = pytest.mark.flow

PROJECT_DIR = Path(__file__).resolve().parents[2]
STAGES = ["01_explore", "02_features", "03_train"]


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """A copy of the notebooks this test may edit, used through TAXI_PROJECT_DIR."""
    copy = tmp_path / "project"
    shutil.copytree(PROJECT_DIR / "notebooks", copy / "notebooks")
    monkeypatch.setenv("TAXI_PROJECT_DIR", str(copy))
    return copy


@pytest.fixture
def source(tmp_path) -> Path:
    """Trip files this test may replace."""
    folder = tmp_path / "source"
    for month in (Month(2023, 3), Month(2023, 4)):
        write_trip_file(folder, "green", month, 2500, seed=3)
    return folder


def _runs(run_pipeline, source, project, *extra):
    completed = run_pipeline("--data-source", str(source), *extra, extra_env={"TAXI_PROJECT_DIR": str(project)})
    return completed


def _records(outputs: Path) -> list[dict]:
    records = [json.loads(path.read_text()) for path in outputs.glob("green/2023-03/*/run.json")]
    return sorted(records, key=lambda record: record["started"])


def _stage_status(record: dict) -> dict[str, str]:
    return {stage["stage"]: stage["status"] for stage in record["stages"] if stage["stage"] in STAGES}


def _edit(notebook: Path, cell, position: int | None = None) -> None:
    content = nbformat.read(notebook, as_version=4)
    if position is None:
        content.cells.append(cell)
    else:
        content.cells.insert(position, cell)
    nbformat.write(content, notebook)


@pytest.mark.long
def test_reruns_resume_a_failure_reuse_what_is_unchanged_and_rerun_what_edits_new_data_or_force_touch(
    run_pipeline, source, project, isolated_stores, prefect_reads
):
    # One history of runs, as a user makes it: a run that fails in training, the rerun that
    # resumes it, an identical rerun, --force, an edit, new data.
    training = project / "notebooks" / "03_train.ipynb"
    original = training.read_bytes()
    _edit(training, new_code_cell('raise RuntimeError("kernel trouble, injected by the test")'), position=2)
    failed = _runs(run_pipeline, source, project)
    assert failed.returncode == 1 and "injected by the test" in failed.stderr
    failed_record = _records(isolated_stores["outputs"])[-1]
    assert _stage_status(failed_record) == {"01_explore": "COMPLETED", "02_features": "COMPLETED", "03_train": "FAILED"}

    # After the failure the rerun resumes at the failed stage.
    training.write_bytes(original)
    first = _runs(run_pipeline, source, project)
    assert first.returncode == 0, first.stderr[-3000:]
    before = _records(isolated_stores["outputs"])[-1]
    assert _stage_status(before) == {"01_explore": "CACHED", "02_features": "CACHED", "03_train": "COMPLETED"}
    assert before["status"] == "FINISHED"

    second = _runs(run_pipeline, source, project)
    assert second.returncode == 0, second.stderr[-3000:]
    after = _records(isolated_stores["outputs"])[-1]
    assert _stage_status(after) == {stage: "CACHED" for stage in STAGES}
    assert after["rmse"] == before["rmse"]
    assert "reused, unchanged 01_explore" in second.stdout

    client = MlflowClient(isolated_stores["tracking_uri"])
    rerun = client.get_run(after["mlflow_run_id"])
    assert rerun.info.status == "FINISHED"
    assert rerun.data.tags["taxi.reused_stages"] == "01_explore,02_features,03_train"
    # Each reused stage names the run that executed it: exploration and features ran in the failed run.
    made_by = {
        "01_explore": failed_record["mlflow_run_id"],
        "02_features": failed_record["mlflow_run_id"],
        "03_train": before["mlflow_run_id"],
    }
    assert {stage: rerun.data.tags[f"taxi.stage.{stage}.reused_from_run"] for stage in STAGES} == made_by
    assert rerun.data.metrics["rmse"] == before["rmse"]
    assert sorted(a.path for a in client.list_artifacts(rerun.info.run_id, "notebooks")) == [
        f"notebooks/{stage}.ipynb" for stage in STAGES
    ]
    # The rerun's folder is complete on its own.
    run_dir = Path(rerun.data.tags["taxi.run_dir"])
    assert (run_dir / "features" / "X_train.npz").is_file() and (run_dir / "03_train.review.html").is_file()
    # In Prefect, the reused stages' task runs ended Cached, naming the run they came from.
    states = {
        run.name: run.state
        for run in prefect_reads.task_runs(prefect_reads.api(), after["prefect_flow_run_id"])
        if run.name in STAGES
    }
    assert {stage: (state.type.value, state.name) for stage, state in states.items()} == {
        stage: ("COMPLETED", "Cached") for stage in STAGES
    }
    assert all(f"reused from MLflow run {made_by[stage]}" in state.message for stage, state in states.items())

    forced = _runs(run_pipeline, source, project, "--force")
    assert forced.returncode == 0
    forced_record = _records(isolated_stores["outputs"])[-1]
    assert set(_stage_status(forced_record).values()) == {"COMPLETED"}
    # A forced run's fresh outputs replace the cache entries: the next rerun reuses them...
    # ...except what an edit touches: a note in 02_features reruns it and training, not exploration.
    _edit(project / "notebooks" / "02_features.ipynb", new_markdown_cell("A note added by a reviewer."))
    assert _runs(run_pipeline, source, project).returncode == 0
    edited = client.get_run(_records(isolated_stores["outputs"])[-1]["mlflow_run_id"])
    assert edited.data.tags["taxi.stage.01_explore.reused_from_run"] == forced_record["mlflow_run_id"]
    assert _stage_status(_records(isolated_stores["outputs"])[-1]) == {
        "01_explore": "CACHED",
        "02_features": "COMPLETED",
        "03_train": "COMPLETED",
    }

    # New validation data: exploration reads only the training month, so it stays cached.
    write_trip_file(source, "green", Month(2023, 4), 2500, seed=99)
    assert _runs(run_pipeline, source, project).returncode == 0
    assert _stage_status(_records(isolated_stores["outputs"])[-1]) == {
        "01_explore": "CACHED",
        "02_features": "COMPLETED",
        "03_train": "COMPLETED",
    }
