"""The gallery's trend charts: which runs they show, what their alt text says, that they are SVG."""

from __future__ import annotations

import base64
import re
import xml.etree.ElementTree as ElementTree

from taxi_duration.review import gallery, trends


def _record(
    month: str,
    rmse: float,
    *,
    color: str = "green",
    status: str = "FINISHED",
    started: str = "2026-01-01",
    promotion: str | None = "kept",
    rows: int | None = 1000,
    run: str | None = None,
    kind: str | None = None,
):
    record = {
        "color": color,
        "train_month": month,
        "validation_month": "later",
        "status": status,
        "rmse": rmse,
        "baseline_rmse": rmse + 3,
        "started": started,
        "promotion": promotion,
        "train_rows": rows,
        "mlflow_run_id": run or f"{color}-{month}-{started}",
        "folder": f"{color}/{month}/{started}",
        "stages": [],
    }
    if kind:
        record["kind"] = kind
    return record


def test_one_point_per_colour_and_month_from_its_newest_finished_run():
    records = [  # newest first, as gallery.read_run_records gives them
        _record("2023-02", 5.9, started="2026-01-04", status="FAILED"),
        _record("2023-02", 5.5, started="2026-01-03"),
        _record("2023-02", 5.7, started="2026-01-02"),
        _record("2023-01", 5.2, started="2026-01-01"),
        _record("2023-01", 6.1, color="yellow", started="2026-01-01"),
        {**_record("2023-05", 7.0, started="2026-01-05"), "kind": "score"},
    ]
    points = trends.month_points(records)
    assert [(p.color, p.month, p.rmse) for p in points] == [
        ("green", "2023-01", 5.2),
        ("green", "2023-02", 5.5),
        ("yellow", "2023-01", 6.1),
    ]


def test_the_newest_promotion_marks_the_champion():
    records = [
        _record("2023-03", 5.6, started="3", promotion="kept"),
        _record("2023-02", 5.5, started="2", promotion="promoted"),
        _record("2023-01", 5.9, started="1", promotion="promoted"),
    ]
    assert [p.champion for p in trends.month_points(records)] == [False, True, False]


def test_the_alt_texts_name_every_month_shown_and_its_figures():
    records = [
        _record("2023-02", 5.5, started="2", promotion="promoted", rows=62_979),
        _record("2023-01", 5.2, started="1", rows=69_392),
    ]
    points = trends.month_points(records)
    svg, alt = trends.rmse_chart(points)
    assert alt == (
        "Validation RMSE by training month: green 2023-01 5.200 min (baseline 8.200); "
        "green 2023-02 5.500 min (baseline 8.500), champion"
    )
    ElementTree.fromstring(svg)  # well-formed
    assert "2023-01" in svg and "2023-02" in svg and "champion" in svg
    svg, alt = trends.trips_chart(points)
    assert alt == "Training trips (1-60 min) by month: green 2023-01 69,392; green 2023-02 62,979"
    assert len(ElementTree.fromstring(svg).findall("{http://www.w3.org/2000/svg}rect")) == 3  # background + 2 bars


def test_the_section_embeds_both_charts_as_data_uris_and_is_empty_without_runs():
    assert trends.trend_section([]) == ""
    assert trends.trend_section([_record("2023-01", 5.0, status="FAILED")]) == ""
    section = trends.trend_section([_record("2023-01", 5.0)])
    images = re.findall(r'<img class="trend" src="data:image/svg\+xml;base64,([^"]+)" alt="([^"]+)"', section)
    assert [alt.split(":")[0] for _, alt in images] == [
        "Validation RMSE by training month",
        "Training trips (1-60 min) by month",
    ]
    for encoded, _ in images:
        ElementTree.fromstring(base64.b64decode(encoded))


def test_runs_without_a_trip_count_get_no_trips_chart():
    points = trends.month_points([_record("2023-01", 5.0, rows=None)])
    assert trends.trips_chart(points) is None and trends.rmse_chart(points) is not None


def test_the_gallery_shows_the_charts_above_the_table():
    page = gallery.render_gallery([_record("2023-01", 5.0), _record("2023-02", 5.1, color="yellow")])
    assert page.index('class="trends"') < page.index("<table")
    assert 'alt="Validation RMSE by training month: green 2023-01 5.000 min' in page
