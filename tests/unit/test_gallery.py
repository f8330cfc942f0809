"""The run gallery: newest first, relative links, MLflow links only when a server is known."""

from __future__ import annotations

from taxi_duration.review.gallery import build_gallery, mlflow_run_url, read_run_records, write_run_record


def _record(started: str, status: str = "FINISHED", rmse: float | None = 5.4709, color: str = "green", **extra):
    return {
        "color": color,
        "train_month": "2023-03",
        "validation_month": "2023-04",
        "status": status,
        "started": started,
        "seconds": 75.4,
        "rmse": rmse,
        "mlflow_run_id": "abcdef1234567890",
        "experiment_id": "1",
        "mlflow_url": None,
        "error": None,
        "stages": [
            {"stage": "fetch-trip-files", "status": "COMPLETED", "seconds": 0.1},
            {
                "stage": "01_explore",
                "status": "COMPLETED",
                "seconds": 4.2,
                "full_report": "01_explore.html",
                "review_report": "01_explore.review.html",
            },
        ],
        **extra,
    }


def test_runs_are_listed_newest_first_with_relative_links(tmp_path):
    older = tmp_path / "green" / "2023-03" / "20260101T000000Z-aaaaaaaa"
    newer = tmp_path / "yellow" / "2023-03" / "20260202T000000Z-bbbbbbbb"
    write_run_record(older, _record("2026-01-01T00:00:00+00:00"))
    write_run_record(newer, _record("2026-02-02T00:00:00+00:00", color="yellow", rmse=6.25))

    page = build_gallery(tmp_path).read_text()

    table = page[page.index("<tbody>") :]  # the trend charts above name the runs too, in month order
    assert table.index("6.250") < table.index("5.471"), "newest first"
    assert 'href="green/2023-03/20260101T000000Z-aaaaaaaa/01_explore.review.html"' in page
    assert 'href="yellow/2023-03/20260202T000000Z-bbbbbbbb/01_explore.html"' in page
    assert "1 min 15 s" in page
    assert "2 run(s)" in page
    assert "<script" not in page


def test_failed_run_shows_its_error_escaped(tmp_path):
    write_run_record(
        tmp_path / "green" / "2023-03" / "r1",
        _record("2026-01-01T00:00:00+00:00", status="FAILED", rmse=None, error="notebook <02_features> failed"),
    )
    page = build_gallery(tmp_path).read_text()
    assert "status-failed" in page
    assert "notebook &lt;02_features&gt; failed" in page


def test_damaged_record_is_left_out_not_fatal(tmp_path):
    write_run_record(tmp_path / "green" / "2023-03" / "good", _record("2026-01-01T00:00:00+00:00"))
    damaged = tmp_path / "green" / "2023-03" / "bad" / "run.json"
    damaged.parent.mkdir(parents=True)
    damaged.write_text("{not json")
    assert [record["folder"] for record in read_run_records(tmp_path)] == ["green/2023-03/good"]


def test_empty_gallery_says_how_to_start(tmp_path):
    assert "make run" in build_gallery(tmp_path).read_text()


def test_mlflow_link_only_for_a_server():
    assert mlflow_run_url("http://127.0.0.1:5000/", "3", "abc") == "http://127.0.0.1:5000/#/experiments/3/runs/abc"
    assert mlflow_run_url("sqlite:////tmp/mlflow.db", "3", "abc") is None
    assert mlflow_run_url("http://127.0.0.1:5000", None, "abc") is None


def test_gallery_link_to_mlflow_when_known(tmp_path):
    write_run_record(
        tmp_path / "green" / "2023-03" / "r1",
        _record(
            "2026-01-01T00:00:00+00:00", mlflow_url="http://mlflow.example:5000/#/experiments/1/runs/abcdef1234567890"
        ),
    )
    assert (
        'href="http://mlflow.example:5000/#/experiments/1/runs/abcdef1234567890"' in build_gallery(tmp_path).read_text()
    )


def test_colour_and_status_filters_work_without_script(tmp_path):
    write_run_record(tmp_path / "green" / "2023-03" / "a", _record("2026-01-01T00:00:00+00:00"))
    write_run_record(
        tmp_path / "yellow" / "2023-03" / "b", _record("2026-01-02T00:00:00+00:00", color="yellow", status="FAILED")
    )
    page = build_gallery(tmp_path).read_text()
    assert "<script" not in page
    for name in ("color-green", "color-yellow", "status-finished", "status-failed"):
        assert f'<a href="#only-{name}">' in page and f'<div id="only-{name}">' in page
        assert f"#only-{name}:target tbody tr:not(.{name}) {{ display: none; }}" in page
    assert '<tr class="color-yellow status-failed">' in page and '<tr class="color-green status-finished">' in page
