"""Month over month on the real files: the comparison of 2023-01 and 2023-02, and reopening a run."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from mlflow.tracking import MlflowClient

from taxi_duration import runfiles
from taxi_duration.review import compare, reopen
from taxi_duration.review.past_runs import find_run
from taxi_duration.review.run_diff import compare_runs

pytestmark = pytest.mark.flow

PROJECT_DIR = Path(__file__).resolve().parents[2]


def _figure(figures, label):
    (found,) = [figure for figure in figures if figure.label == label]
    return found


def _env(real_months, **extra):
    return {
        **os.environ,
        "MLFLOW_TRACKING_URI": real_months.tracking_uri,
        "TAXI_OUTPUTS_DIR": str(real_months.outputs),
        **extra,
    }


def test_the_newer_run_compared_itself_with_last_month(real_months):
    older, newer = (find_run(str(folder), real_months.outputs) for folder in (real_months.older, real_months.newer))
    assert newer.record["comparison"] == compare.report_name(older) == f"compare/2023-01-{older.short_id}.html"
    assert (newer.folder / newer.record["comparison"]).is_file()
    assert "comparison" not in older.record or older.record["comparison"] is None  # no 2022-12 run to compare with
    gallery = (real_months.outputs / "index.html").read_text()
    assert f'href="green/2023-02/{newer.folder.name}/{newer.record["comparison"]}"' in gallery
    archived = [
        item.path for item in MlflowClient(real_months.tracking_uri).list_artifacts(newer.run_id, "reports/compare")
    ]
    assert archived == [f"reports/compare/2023-01-{older.short_id}.html"]


def test_the_comparison_shows_what_the_runs_recorded(real_months):
    older, newer = (find_run(str(folder), real_months.outputs) for folder in (real_months.older, real_months.newer))
    comparison = compare_runs(newer, older)  # either order: the older run is the 2023-01 one
    assert (comparison.older.month, comparison.newer.month) == ("2023-01", "2023-02")
    client = MlflowClient(real_months.tracking_uri)
    page = (newer.folder / newer.record["comparison"]).read_text()
    for side, run in (("older", older), ("newer", newer)):
        explored = runfiles.read_manifest(run.folder, "01_explore")
        features = runfiles.read_manifest(run.folder, "02_features")
        metrics = client.get_run(run.run_id).data.metrics
        assert getattr(_figure(comparison.data, "trips in the month"), side) == explored["rows"]
        assert (
            getattr(_figure(comparison.data, "training trips (after cleaning)"), side)
            == features["train_rows"]
            == metrics["train_rows"]
        )
        assert getattr(_figure(comparison.model, "validation RMSE (min)"), side) == pytest.approx(
            metrics["rmse"], abs=1e-12
        )
        assert f"{explored['rows']:,}" in page and f"{metrics['rmse']:,.3f}" in page
    assert _figure(comparison.data, "trips in the month").delta == (
        runfiles.read_manifest(newer.folder, "01_explore")["rows"]
        - runfiles.read_manifest(older.folder, "01_explore")["rows"]
    )

    # Cross-scoring: January's model on February's validation month (2023-03) is what February's
    # gate re-scored the champion (January's version 1) at.
    crossed = {(score.model_run, score.validation_month): score for score in comparison.cross_scores}
    promotion = runfiles.read_manifest(newer.folder, "03_train")["promotion"]
    assert promotion["taxi.promotion.champion_version"] == "1"
    assert crossed[(older.label, "2023-03")].rmse == pytest.approx(
        float(promotion["taxi.promotion.champion_rmse"]), rel=1e-9
    )
    assert crossed[(newer.label, "2023-02")].rmse is not None  # February's model on January's validation month
    assert _figure(comparison.model, "registry decision").newer == promotion["taxi.promotion.decision"]


def test_the_source_diff_shows_exactly_the_edit(real_months):
    older, newer = (find_run(str(folder), real_months.outputs) for folder in (real_months.older, real_months.newer))
    changes = {change.stage: change for change in compare_runs(older, newer, cross_score=False).notebooks}
    assert changes["01_explore"].cells == () and changes["02_features"].cells == ()
    (cell,) = changes["03_train"].cells
    assert cell.kind == "changed"
    added = [line for line in cell.diff if line.startswith("+") and not line.startswith("+++")]
    removed = [line for line in cell.diff if line.startswith("-") and not line.startswith("---")]
    assert (added, removed) == ([f"+{real_months.edit}"], [])
    assert changes["03_train"].older_sha256 != changes["03_train"].newer_sha256
    assert changes["01_explore"].older_sha256 == changes["01_explore"].newer_sha256


def test_make_compare_takes_a_run_id_prefix_and_a_folder(real_months):
    older, newer = (find_run(str(folder), real_months.outputs) for folder in (real_months.older, real_months.newer))
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "taxi_duration.review.compare",
            newer.run_id[:6],
            str(real_months.older),
            "--no-archive",
        ],
        env=_env(real_months),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=PROJECT_DIR,
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == f"Comparison: {newer.folder / compare.report_name(older)}"

    unknown = subprocess.run(
        [sys.executable, "-m", "taxi_duration.review.compare", "feedbeef", newer.run_id],
        env=_env(real_months),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=PROJECT_DIR,
    )
    assert unknown.returncode == 2
    assert "no run folder" in unknown.stderr and "'feedbeef'" in unknown.stderr and older.short_id in unknown.stderr


def test_a_reopened_training_notebook_reproduces_the_run(real_months, tmp_path):
    run = find_run(str(real_months.older), real_months.outputs)
    original_manifest = (run.folder / "03_train.manifest.json").read_bytes()
    reopened = reopen.reopen(run, "03_train", notebooks_dir=tmp_path)
    assert reopened.notebook == tmp_path / "reopened" / run.short_id / "03_train.ipynb"

    # The parameters cell holds exactly what papermill injected into the run's notebook.
    injected = nbformat.read(run.folder / "03_train.ipynb", as_version=4).metadata.papermill.parameters
    notebook = nbformat.read(reopened.notebook, as_version=4)
    (parameters_cell,) = [cell for cell in notebook.cells if "parameters" in cell.metadata.get("tags", [])]
    assigned = {node.targets[0].id: ast.literal_eval(node.value) for node in ast.parse(parameters_cell.source).body}
    assert assigned == dict(injected) == reopened.parameters
    assert assigned["mlflow_run_id"] == run.run_id
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")

    import papermill

    client = MlflowClient(real_months.tracking_uri)
    versions_before = client.search_model_versions("name='nyc-taxi-duration'")
    papermill.execute_notebook(
        str(reopened.notebook), str(tmp_path / "executed.ipynb"), cwd=str(reopened.notebook.parent), progress_bar=False
    )
    scratch = reopened.notebook.parent / reopen.SCRATCH_RUN_FOLDER
    reproduced = runfiles.read_manifest(scratch, "03_train")["metrics"]["rmse"]
    assert reproduced == pytest.approx(client.get_run(run.run_id).data.metrics["rmse"], rel=1e-9)
    # The original run is untouched: its folder, its MLflow run, the registry.
    assert (run.folder / "03_train.manifest.json").read_bytes() == original_manifest
    assert len(client.search_model_versions("name='nyc-taxi-duration'")) == len(versions_before)
    scratch_experiment = client.get_experiment_by_name(f"nyc-taxi-duration{reopen.SCRATCH_EXPERIMENT_SUFFIX}")
    (scratch_run,) = client.search_runs([scratch_experiment.experiment_id])
    assert scratch_run.info.status == "FINISHED" and scratch_run.data.metrics["rmse"] == pytest.approx(reproduced)


def test_make_reopen_says_when_the_checkout_differs_from_the_run(real_months):
    run = find_run(str(real_months.older), real_months.outputs)
    # The project copy holds the edited 03_train.ipynb, and is no git checkout.
    completed = subprocess.run(
        [sys.executable, "-m", "taxi_duration.review.reopen", run.short_id],
        env=_env(real_months, TAXI_PROJECT_DIR=str(real_months.project)),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=PROJECT_DIR,
    )
    assert completed.returncode == 0, completed.stderr
    written = real_months.project / "notebooks" / "reopened" / run.short_id / "03_train.ipynb"
    assert f"Reopened green 2023-01 (run {run.short_id}): {written}" in completed.stdout
    assert "notebooks/03_train.ipynb has changed since the run" in completed.stdout
    assert (
        f"the run executed git commit {run.record['git_commit'][:12]}; the checkout is at no commit" in completed.stdout
    )
    assert f"http://127.0.0.1:8888/lab/tree/reopened/{run.short_id}/03_train.ipynb" in completed.stdout
    assert json.loads(written.read_text())["metadata"]["taxi_reopened"]["run_id"] == run.run_id

    missing = subprocess.run(
        [sys.executable, "-m", "taxi_duration.review.reopen", run.short_id, "--stage", "04_score"],
        env=_env(real_months, TAXI_PROJECT_DIR=str(real_months.project)),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=PROJECT_DIR,
    )
    assert missing.returncode == 2
    assert "has no executed 04_score.ipynb; it has: 01_explore, 02_features, 03_train" in missing.stderr


def test_every_report_names_the_command_that_reopens_it(real_months):
    run_id = find_run(str(real_months.older), real_months.outputs).short_id
    for stage in ("01_explore", "02_features", "03_train"):
        for report in (f"{stage}.html", f"{stage}.review.html"):
            assert f"make reopen RUN={run_id} STAGE={stage}" in (real_months.older / report).read_text(), report
