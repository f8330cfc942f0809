"""The comparison report, finding past runs and reopening them, on tiny hand-made run folders."""

from __future__ import annotations

import ast
import base64
import datetime as dt
import json
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest

from taxi_duration import manifests, runfiles
from taxi_duration.data.periods import Month, parse_month
from taxi_duration.modeling import explore, model
from taxi_duration.review import compare, gallery, reopen, reports
from taxi_duration.review.past_runs import RunNotFoundError, find_run, previous_month_run
from taxi_duration.review.run_diff import Figure, compare_runs, figure_pairs, notebook_change

# The smallest valid PNG (1x1), as notebooks carry plots: base64 text.
PNG = base64.b64encode(
    bytes.fromhex(
        "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
        "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082"
    )
).decode()


def _notebook(cells: list[str], parameters: dict | None = None, images: tuple[str, ...] = ()) -> nbformat.NotebookNode:
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell("year = 2023", metadata={"tags": ["parameters"]})]
    if parameters is not None:
        injected = "\n".join(f"{key} = {value!r}" for key, value in parameters.items())
        notebook.cells.append(nbformat.v4.new_code_cell(injected, metadata={"tags": ["injected-parameters"]}))
        notebook.metadata["papermill"] = {"parameters": parameters}
    notebook.cells += [
        nbformat.v4.new_code_cell(source) if not source.startswith("#") else nbformat.v4.new_markdown_cell(source)
        for source in cells
    ]
    plots = nbformat.v4.new_code_cell("plots.show()")
    plots.outputs = [
        nbformat.v4.new_output("display_data", data={"image/png": PNG}, metadata={"image/png": {"alt": alt}})
        for alt in images
    ]
    notebook.cells.append(plots)
    return notebook


def _run_folder(
    outputs: Path,
    month: str,
    run_id: str,
    *,
    status="FINISHED",
    color="green",
    kind="train",
    started="2026-12-01T10:00:00+00:00",
    rows=100,
    rmse=5.0,
    sources=("x = 1",),
    images=("a plot",),
) -> Path:
    folder = outputs / color / month / f"20261201T100000Z-{run_id[:8]}"
    record = {
        "kind": kind,
        "color": color,
        "train_month": month,
        "validation_month": month,
        "status": status,
        "started": started,
        "mlflow_run_id": run_id,
        "tracking_uri": "sqlite:///nowhere.db",
        "git_commit": "abc123",
        "notebooks": {"01_explore": "e" * 64, "02_features": "f" * 64, "03_train": run_id[0] * 64},
    }
    gallery.write_run_record(folder, record)
    trip_month = parse_month(month)
    manifests.write(
        folder,
        manifests.ExploreManifest(
            stage="01_explore",
            trip_file=f"/data/{color}_tripdata_{month}.parquet",
            metrics={"rows": rows},
            duration_filter={"kept": rows - 3, "dropped_share": 0.03},
            duration_quantiles={"p50": 11.5},
            nulls={"trip_type": 2},
            busiest_zones={"pickup": (manifests.ZoneCount("74", 10, 0.1),), "dropoff": ()},
        ),
    )
    manifests.write(
        folder,
        manifests.FeaturesManifest(
            stage="02_features",
            color=color,
            train_month=trip_month,
            validation_month=trip_month.next(),
            train_file=f"/data/{color}_tripdata_{month}.parquet",
            validation_file=f"/data/{color}_tripdata_{trip_month.next()}.parquet",
            files={"preprocessor": "preprocessor.b"},
            metrics={"train_rows": rows - 3, "val_rows": 90, "pu_do_vocabulary": 40},
        ),
    )
    manifests.write(
        folder,
        manifests.TrainingManifest(
            stage="03_train",
            mlflow_run_id=run_id,
            model_uri=f"runs:/{run_id}/model",
            metrics={"rmse": rmse, "baseline_rmse": 9.0, "best_iteration": 29},
            error_by_distance=(manifests.DistanceError("[0.0, 1.0)", 5, rmse + 1, 0.1),),
            promotion={"taxi.promotion.decision": "promoted"},
        ),
    )
    for stage in ("01_explore", "02_features", "03_train"):
        parameters = {
            "run_dir": str(folder),
            **(
                {
                    "mlflow_run_id": run_id,
                    "registered_model": "nyc-taxi-duration",
                    "experiment_name": "nyc-taxi-duration",
                }
                if stage == "03_train"
                else {}
            ),
        }
        nbformat.write(
            _notebook(list(sources) if stage == "03_train" else ["x = 1"], parameters, images),
            folder / f"{stage}.ipynb",
        )
    return folder


def test_find_run_takes_a_folder_an_id_or_a_prefix_and_names_the_problem(tmp_path):
    folder = _run_folder(tmp_path, "2023-01", "c1e11dfe859344d8")
    _run_folder(tmp_path, "2023-02", "c1e12aaa00000000")
    assert find_run(str(folder), tmp_path).folder == folder.resolve()
    assert find_run(folder.relative_to(tmp_path).as_posix(), tmp_path).run_id == "c1e11dfe859344d8"
    assert find_run("c1e11dfe859344d8", tmp_path).month == "2023-01"
    assert find_run("C1E11", tmp_path).folder == folder.resolve()
    with pytest.raises(RunNotFoundError, match="matches 2 runs"):
        find_run("c1e1", tmp_path)
    with pytest.raises(RunNotFoundError, match=r"no run folder .* 'deadbeef'.*newest runs there: c1e1"):
        find_run("deadbeef", tmp_path)
    with pytest.raises(RunNotFoundError, match="at least 4 characters"):
        find_run("c1", tmp_path)


def test_previous_month_run_is_the_newest_finished_one_of_the_same_colour(tmp_path):
    wanted = _run_folder(tmp_path, "2022-12", "a1aa000000000001", started="2026-12-01T11:00:00+00:00")
    _run_folder(tmp_path, "2022-12", "a2aa000000000002", started="2026-12-01T09:00:00+00:00")  # older
    _run_folder(tmp_path, "2022-12", "a3aa000000000003", started="2026-12-01T12:00:00+00:00", status="FAILED")
    _run_folder(tmp_path, "2022-12", "a4aa000000000004", started="2026-12-01T13:00:00+00:00", color="yellow")
    january = find_run(str(_run_folder(tmp_path, "2023-01", "bbbb000000000001")), tmp_path)
    assert previous_month_run(january, tmp_path).folder == wanted.resolve()
    assert previous_month_run(find_run("a1aa000000000001", tmp_path), tmp_path) is None  # no 2022-11 run
    assert compare.compare_with_previous_month(find_run("a1aa000000000001", tmp_path), tmp_path) is None
    assert Month(2023, 1).previous() == Month(2022, 12) and Month(2023, 5).previous() == Month(2023, 4)


def test_the_source_diff_names_changed_added_and_removed_cells_and_ignores_parameters(tmp_path):
    older = find_run(
        str(_run_folder(tmp_path, "2023-01", "aaaa000000000001", sources=("a = 1", "b = 2", "# Notes"))), tmp_path
    )
    newer = find_run(
        str(_run_folder(tmp_path, "2023-02", "bbbb000000000001", sources=("a = 1", "b = 3", "c = 4"))), tmp_path
    )
    change = notebook_change("03_train", older, newer)
    kinds = [cell.kind for cell in change.cells]
    assert kinds == ["changed", "changed"]  # b = 2 -> b = 3, the markdown cell -> c = 4
    assert "-b = 2" in change.cells[0].diff and "+b = 3" in change.cells[0].diff
    assert notebook_change("01_explore", older, newer).cells == ()  # injected run_dir differs: not a source change
    grown = find_run(
        str(_run_folder(tmp_path, "2023-03", "cccc000000000001", sources=("a = 1", "b = 3", "c = 4", "d = 5"))),
        tmp_path,
    )
    (added,) = notebook_change("03_train", newer, grown).cells
    assert added.kind == "added" and added.older_cell is None and "+d = 5" in added.diff
    (removed,) = notebook_change("03_train", grown, newer).cells
    assert removed.kind == "removed" and "-d = 5" in removed.diff


def test_figures_pair_in_order_and_values_come_from_the_manifests(tmp_path):
    older = find_run(
        str(_run_folder(tmp_path, "2023-01", "aaaa000000000001", images=("trips per day", "durations"))), tmp_path
    )
    newer = find_run(
        str(_run_folder(tmp_path, "2023-02", "bbbb000000000001", rows=120, rmse=4.5, images=("trips per day",))),
        tmp_path,
    )
    pairs = figure_pairs("01_explore", older, newer)
    assert [(pair.alt, pair.older_png is not None, pair.newer_png is not None) for pair in pairs] == [
        ("trips per day", True, True),
        ("durations", True, False),
    ]
    comparison = compare_runs(newer, older, cross_score=False)
    assert (comparison.older.month, comparison.newer.month) == ("2023-01", "2023-02")
    trips = next(figure for figure in comparison.data if figure.label == "trips in the month")
    assert (trips.older, trips.newer, trips.delta) == (100, 120, 20)
    rmse = next(figure for figure in comparison.model if figure.label == "validation RMSE (min)")
    assert rmse.delta == pytest.approx(-0.5)
    zone = "74 East Harlem North (Manhattan) (10 trips)"  # the manifest's id, named from TLC's lookup
    assert comparison.busiest_zones["pickup"][0] == Figure("#1", zone, zone)
    assert comparison.cross_scores == ()
    assert Figure("x", "a", "b").delta is None and Figure("x", True, 2).delta is None


def test_the_comparison_picks_manifests_by_kind_reads_older_files_and_shows_every_recorded_stage(tmp_path):
    older_folder = _run_folder(tmp_path, "2023-01", "aaaa000000000001")
    newer_folder = _run_folder(tmp_path, "2023-02", "bbbb000000000001", rows=120)
    # The older run's manifests as notebooks wrote them before `kind` existed.
    for stage in ("01_explore", "02_features"):
        content = runfiles.read_manifest(older_folder, stage)
        del content["kind"]
        runfiles.write_manifest(older_folder, stage, content)
    # The older run's training did not finish; the newer run has a stage the declarations do not name.
    (older_folder / "03_train.manifest.json").unlink()
    record = gallery.read_run_record(newer_folder)
    record["notebooks"]["05_errors"] = "9" * 64
    gallery.write_run_record(newer_folder, record)
    manifests.write(newer_folder, manifests.StageManifest(stage="05_errors", metrics={"worst_rmse": 13.0}))
    nbformat.write(_notebook(["x = 1"], {"run_dir": str(newer_folder)}), newer_folder / "05_errors.ipynb")

    comparison = compare_runs(find_run(str(older_folder), tmp_path), find_run(str(newer_folder), tmp_path), False)
    assert [change.stage for change in comparison.notebooks] == ["01_explore", "02_features", "03_train", "05_errors"]
    added = comparison.notebooks[-1]
    assert added.older_sha256 is None and [cell.kind for cell in added.cells] == ["added", "added", "added"]
    values = {figure.label: (figure.older, figure.newer) for figure in comparison.data}
    assert values["trips in the month"] == (100, 120) and values["PU_DO vocabulary"] == (40, 40)
    rmse = next(figure for figure in comparison.model if figure.label == "validation RMSE (min)")
    assert (rmse.older, rmse.newer) == (None, 5.0)
    assert [(row.older, row.newer) for row in comparison.error_by_distance] == [(None, 6.0)]


def test_the_report_is_offline_and_escapes_what_the_runs_hold(tmp_path):
    hostile = '<script>alert("x")</script><img src=x onerror=alert(1)>'
    older = find_run(str(_run_folder(tmp_path, "2023-01", "aaaa000000000001", sources=("a = 1",))), tmp_path)
    newer = find_run(
        str(_run_folder(tmp_path, "2023-02", "bbbb000000000001", sources=(hostile,), images=(hostile,))), tmp_path
    )
    page = compare.render(compare_runs(older, newer, cross_score=False), generated=dt.datetime(2026, 12, 1))
    assert "<script" not in page and "onerror=alert" not in page.replace("onerror=alert(1)&gt;", "")
    assert "&lt;script&gt;" in page
    assert 'src="http' not in page and "<link" not in page
    assert page.count('src="data:image/png;base64,') == 6  # one plot per notebook, both runs
    assert compare._image("bm90IGEgcG5n", "x") == '<span class="meta">not a PNG</span>'  # base64 of "not a png"
    assert compare._image("<svg onload=alert(1)>", "x") == '<span class="meta">unreadable image</span>'


def test_write_comparison_lands_in_the_newer_run_folder(tmp_path):
    older = find_run(str(_run_folder(tmp_path, "2023-01", "aaaa000000000001")), tmp_path)
    newer = find_run(str(_run_folder(tmp_path, "2023-02", "bbbb000000000001")), tmp_path)
    path = compare.write_comparison(newer, older, cross_score=False, archive=False)
    assert path == newer.folder / "compare" / "2023-01-aaaa0000.html"
    assert "green 2023-02 (run bbbb0000) compared with green 2023-01 (run aaaa0000)" in path.read_text()
    with pytest.raises(ValueError, match="scoring run"):
        compare_runs(older, find_run(str(_run_folder(tmp_path, "2023-03", "cccc000000000001", kind="score")), tmp_path))


def test_the_gallery_links_a_run_to_its_comparison():
    record = {
        "folder": "green/2023-02/20261201T100000Z-bbbb0000",
        "comparison": "compare/2023-01-aaaa0000.html",
        "status": "FINISHED",
        "stages": [],
    }
    assert 'href="green/2023-02/20261201T100000Z-bbbb0000/compare/2023-01-aaaa0000.html"' in gallery._row(record)
    assert "comparison" not in gallery._row({**record, "comparison": None})


def test_reopen_writes_the_exact_parameters_and_keeps_the_run_intact(tmp_path, monkeypatch):
    run = find_run(str(_run_folder(tmp_path / "outputs", "2023-01", "aaaa000000000001")), tmp_path / "outputs")
    monkeypatch.setattr(reopen.mlflow_runs, "git_commit", lambda: "def456")
    reopened = reopen.reopen(run, "03_train", notebooks_dir=tmp_path / "notebooks")
    notebook = nbformat.read(reopened.notebook, as_version=4)
    assert not [cell for cell in notebook.cells if "injected-parameters" in cell.metadata.get("tags", [])]
    parameters_cell, redirect_cell = notebook.cells[0], notebook.cells[1]
    assigned = {node.targets[0].id: ast.literal_eval(node.value) for node in ast.parse(parameters_cell.source).body}
    assert (
        assigned
        == reopened.parameters
        == {
            "run_dir": str(run.folder),
            "mlflow_run_id": "aaaa000000000001",
            "registered_model": "nyc-taxi-duration",
            "experiment_name": "nyc-taxi-duration",
        }
    )
    overrides = {node.targets[0].id: ast.literal_eval(node.value) for node in ast.parse(redirect_cell.source).body}
    scratch = reopened.notebook.parent / reopen.SCRATCH_RUN_FOLDER
    assert overrides == {
        "run_dir": str(scratch),
        "mlflow_run_id": None,
        "experiment_name": "nyc-taxi-duration-reopened",
        "registered_model": None,
    }
    assert (scratch / "02_features.manifest.json").is_file() and not list(scratch.glob("*.ipynb"))
    assert reopened.url == "http://127.0.0.1:8888/lab/tree/reopened/aaaa0000/03_train.ipynb"
    assert "the run executed git commit abc123; the checkout is at def456" in reopened.warnings
    assert reopen.redirected_parameters({"run_dir": "x", "year": 2023}, Path("/s")) == {"run_dir": "/s"}


def test_reopen_names_what_is_missing(tmp_path):
    folder = _run_folder(tmp_path, "2023-01", "aaaa000000000001")
    run = find_run(str(folder), tmp_path)
    with pytest.raises(
        reopen.ReopenError, match=r"has no executed 04_score.ipynb; it has: 01_explore, 02_features, 03_train"
    ):
        reopen.reopen(run, "04_score", notebooks_dir=tmp_path / "nb")
    nbformat.write(_notebook(["x = 1"]), folder / "01_explore.ipynb")  # run by hand: nothing injected
    with pytest.raises(reopen.ReopenError, match="carries no injected parameters"):
        reopen.reopen(run, "01_explore", notebooks_dir=tmp_path / "nb")
    assert reopen.main(["zz"]) == 2


def test_run_folders_carry_the_run_id_and_reports_the_reopen_command(tmp_path):
    started = dt.datetime(2026, 12, 1, 10, 0, tzinfo=dt.UTC)
    folder = runfiles.run_folder(tmp_path, "green", "2023-03", started, "e347bc15a402479d")
    scoring = runfiles.run_folder(tmp_path, "green", "2023-05", started, "0123abcd9999", scoring=True)
    assert folder == tmp_path / "green" / "2023-03" / "20261201T100000Z-e347bc15"
    assert scoring.name == "20261201T100000Z-score-0123abcd"
    assert (
        runfiles.run_id_prefix(folder),
        runfiles.run_id_prefix(scoring),
        runfiles.run_id_prefix(tmp_path / "lab"),
    ) == ("e347bc15", "0123abcd", None)
    assert reports.reopen_command(folder / "03_train.ipynb") == "make reopen RUN=e347bc15 STAGE=03_train"
    assert reports.reopen_command(tmp_path / "lab" / "01_explore.ipynb") is None


def test_manifest_records_of_the_profile_and_the_errors():
    duration = pd.Series([1.0, 2.0, 3.0, 4.0, None])
    quantiles = explore.duration_quantiles(duration)
    assert list(quantiles) == ["p01", "p05", "p25", "p50", "p75", "p95", "p99"] and quantiles["p50"] == 2.5
    zones = explore.busiest_zones(pd.DataFrame({"PULocationID": [7, 7, 8]}), "PULocationID")
    assert explore.zone_counts(zones) == [
        {"zone": "7", "trips": 2, "share": pytest.approx(2 / 3)},
        {"zone": "8", "trips": 1, "share": pytest.approx(1 / 3)},
    ]
    by_distance = model.error_by_distance(
        np.array([0.5, 0.5, 4.0]), np.array([10.0, 12.0, 20.0]), np.array([11.0, 11.0, 20.0])
    )
    records = model.error_by_distance_records(by_distance)
    assert records[0] == {"miles": "[0.0, 1.0)", "trips": 2, "rmse": 1.0, "mean_error": 0.0}
    assert json.dumps(records)  # JSON-ready
