"""Where a run's results are linked from, and what a running stage shows (without a Prefect server)."""

from __future__ import annotations

import time

from taxi_duration.orchestration import links
from taxi_duration.orchestration.progress import StageProgress, running_cell_key
from taxi_duration.runner import Progress


def _record(**extra):
    return {
        "mlflow_run_id": "e347bc15a402479d",
        "tracking_uri": "sqlite:///x.db",
        "mlflow_url": None,
        "stages": [{"stage": "fetch-trip-files"}, {"stage": "03_train", "review_report": "03_train.review.html"}],
        **extra,
    }


def test_local_runs_link_reports_and_gallery_from_disk(tmp_path):
    (tmp_path / "03_train.review.html").write_text("report")
    found = links.run_links(_record(), tmp_path, tmp_path.parent / "index.html")
    assert found == [
        links.RunLink("03_train review report", (tmp_path / "03_train.review.html").as_uri()),
        links.RunLink("all runs (gallery)", (tmp_path.parent / "index.html").as_uri()),
    ]
    assert (
        links.markdown_list(found).splitlines()[0]
        == f"- [03_train review report]({(tmp_path / '03_train.review.html').as_uri()})"
    )


def test_server_runs_link_the_mlflow_run_and_reports_through_the_server(tmp_path):
    (tmp_path / "03_train.review.html").write_text("report")
    record = _record(
        tracking_uri="http://127.0.0.1:5000",
        mlflow_url="http://127.0.0.1:5000/#/experiments/1/runs/e347",
        comparison="compare/2023-02-aaaa0000.html",
    )
    found = links.run_links(record, tmp_path, tmp_path / "index.html")
    assert found[0] == links.RunLink("MLflow run e347bc15", record["mlflow_url"])
    assert (
        found[1].url == "http://127.0.0.1:5000/get-artifact?path=reports/03_train.review.html&run_uuid=e347bc15a402479d"
    )
    assert found[2] == links.RunLink("what changed since last month", (tmp_path / record["comparison"]).as_uri())


def test_a_report_that_is_not_there_gets_no_link(tmp_path):
    assert [link.text for link in links.run_links(_record(), tmp_path, tmp_path / "index.html")] == [
        "all runs (gallery)"
    ]


def test_the_running_cell_is_shown_when_it_changes_and_again_when_it_runs_long(monkeypatch):
    shown = StageProgress("03_train")
    started = time.time()
    running = Progress(
        total=3, finished=(), running={"index": 2, "position": 1, "first_line": "x = `1`", "started": started}
    )
    first = shown._running_cell_markdown(running)
    assert first.startswith("**03_train**: running cell 1 of 3 for 0 s") and "x = '1'" in first
    assert shown._running_cell_markdown(running) is None  # the same cell, shown a moment ago
    monkeypatch.setattr(time, "time", lambda: started + 31)
    assert "for 31 s" in shown._running_cell_markdown(running)
    done = Progress(total=1, finished=({"index": 2, "position": 1, "seconds": 1.5},), running=None)
    assert shown._running_cell_markdown(done) == "**03_train**: all 1 cells done (1.5 s in cells)."
    assert shown._running_cell_markdown(done) is None
    assert running_cell_key("02_features") == "running-cell-02-features"


def test_progress_reads_the_childs_record(tmp_path):
    assert Progress.read(tmp_path) is None
    (tmp_path / "progress.json").write_text('{"total": 4, "running": null, "finished": [{"position": 1}]}')
    assert Progress.read(tmp_path) == Progress(4, ({"position": 1},), None)
