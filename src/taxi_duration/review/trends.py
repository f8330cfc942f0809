"""The gallery's trend charts: validation RMSE and trips by training month, per colour.

Drawn as small SVG images embedded as data URIs, so the gallery stays one offline file with no
script and no plotting library in the flow process. Each image's alt text says what it shows,
month by month, for readers who cannot see it.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass
from typing import Any

WIDTH, HEIGHT = 640, 240
LEFT, RIGHT, TOP, BOTTOM = 56, 16, 28, 44
COLOURS = {"green": "#2e7d32", "yellow": "#c49000"}
BASELINE_DASH = "5,4"


@dataclass(frozen=True)
class MonthPoint:
    """The newest finished training run of one colour and month."""

    color: str
    month: str
    rmse: float
    baseline_rmse: float | None
    train_rows: int | None
    champion: bool  # its model is the champion the newest promotion named


def month_points(records: list[dict[str, Any]]) -> list[MonthPoint]:
    """One point per (colour, training month): its newest FINISHED training run; sorted by colour, month."""
    newest: dict[tuple[str, str], dict[str, Any]] = {}
    for record in records:  # newest first (gallery.read_run_records)
        if record.get("kind", "train") != "train" or record.get("status") != "FINISHED" or record.get("rmse") is None:
            continue
        newest.setdefault((str(record.get("color")), str(record.get("train_month"))), record)
    champion_run = _champion_run(records)
    return [
        MonthPoint(
            color=color,
            month=month,
            rmse=float(record["rmse"]),
            baseline_rmse=None if record.get("baseline_rmse") is None else float(record["baseline_rmse"]),
            train_rows=record.get("train_rows"),
            champion=record.get("mlflow_run_id") == champion_run,
        )
        for (color, month), record in sorted(newest.items())
    ]


def _champion_run(records: list[dict[str, Any]]) -> str | None:
    """The run whose model the newest promotion made champion (records are newest first)."""
    for record in records:
        if record.get("promotion") == "promoted":
            return record.get("mlflow_run_id")
    return None


def _scale(values: list[float]) -> tuple[float, float]:
    """The value axis: from 0 (or the lowest value, if negative) to 10% above the highest."""
    top = max(values) if values else 1.0
    bottom = min(0.0, min(values)) if values else 0.0
    span = (top - bottom) or 1.0
    return bottom, bottom + span * 1.1


def _svg(body: list[str], title: str) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'font-family="sans-serif" font-size="11"><rect width="100%" height="100%" fill="white"/>'
        f'<text x="{LEFT}" y="16" font-size="13" font-weight="bold">{html.escape(title)}</text>'
        + "".join(body)
        + "</svg>"
    )


def _axes(months: list[str], bottom: float, top: float, unit: str) -> tuple[list[str], Any, Any]:
    plot_width, plot_height = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    step = plot_width / max(len(months), 1)

    def x(index: int) -> float:
        return LEFT + step * (index + 0.5)

    def y(value: float) -> float:
        return TOP + plot_height * (1 - (value - bottom) / (top - bottom))

    body = [
        f'<line x1="{LEFT}" y1="{TOP + plot_height}" x2="{WIDTH - RIGHT}" y2="{TOP + plot_height}" stroke="#888"/>',
        f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{TOP + plot_height}" stroke="#888"/>',
    ]
    for fraction in (0.0, 0.5, 1.0):
        value = bottom + (top - bottom) * fraction
        body.append(
            f'<text x="{LEFT - 6}" y="{y(value) + 4:.1f}" text-anchor="end">{value:,.{1 if top < 100 else 0}f}</text>'
        )
    body.append(
        f'<text x="12" y="{TOP + plot_height / 2:.1f}" transform="rotate(-90 12 {TOP + plot_height / 2:.1f})" '
        f'text-anchor="middle">{html.escape(unit)}</text>'
    )
    for index, month in enumerate(months):
        body.append(
            f'<text x="{x(index):.1f}" y="{TOP + plot_height + 16}" text-anchor="middle">{html.escape(month)}</text>'
        )
    return body, x, y


def rmse_chart(points: list[MonthPoint]) -> tuple[str, str] | None:
    """(SVG, alt text) of validation RMSE and the baseline by training month, per colour; None without points."""
    if not points:
        return None
    months = sorted({point.month for point in points})
    values = [point.rmse for point in points] + [p.baseline_rmse for p in points if p.baseline_rmse is not None]
    bottom, top = _scale(values)
    body, x, y = _axes(months, bottom, top, "minutes")
    legend_x = WIDTH - RIGHT - 250
    for row, color in enumerate(sorted({point.color for point in points})):
        series = [point for point in points if point.color == color]
        stroke = COLOURS.get(color, "#1565c0")
        coordinates = [(x(months.index(point.month)), y(point.rmse)) for point in series]
        body.append(
            f'<polyline fill="none" stroke="{stroke}" stroke-width="2" points="'
            + " ".join(f"{cx:.1f},{cy:.1f}" for cx, cy in coordinates)
            + '"/>'
        )
        baseline = [(x(months.index(p.month)), y(p.baseline_rmse)) for p in series if p.baseline_rmse is not None]
        if baseline:
            body.append(
                f'<polyline fill="none" stroke="{stroke}" stroke-dasharray="{BASELINE_DASH}" stroke-width="1.2" '
                'points="' + " ".join(f"{cx:.1f},{cy:.1f}" for cx, cy in baseline) + '"/>'
            )
        for point, (cx, cy) in zip(series, coordinates, strict=True):
            body.append(
                f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="{6 if point.champion else 3.5}" fill="{stroke}"'
                + (' stroke="black" stroke-width="2"' if point.champion else "")
                + "/>"
            )
            if point.champion:
                body.append(
                    f'<text x="{cx:.1f}" y="{cy - 10:.1f}" text-anchor="middle" font-weight="bold">champion</text>'
                )
        legend_y = TOP + 4 + row * 14
        body.append(
            f'<line x1="{legend_x}" y1="{legend_y}" x2="{legend_x + 18}" y2="{legend_y}" stroke="{stroke}" stroke-width="2"/>'
            f'<text x="{legend_x + 22}" y="{legend_y + 4}">{html.escape(color)}: RMSE (dashed: baseline)</text>'
        )
    alt = "Validation RMSE by training month: " + "; ".join(
        f"{point.color} {point.month} {point.rmse:.3f} min"
        + ("" if point.baseline_rmse is None else f" (baseline {point.baseline_rmse:.3f})")
        + (", champion" if point.champion else "")
        for point in points
    )
    return _svg(body, "Validation RMSE by training month"), alt


def trips_chart(points: list[MonthPoint]) -> tuple[str, str] | None:
    """(SVG, alt text) of training trips (1-60 min) by month, per colour; None when no run recorded them."""
    counted = [point for point in points if point.train_rows is not None]
    if not counted:
        return None
    months = sorted({point.month for point in counted})
    colors = sorted({point.color for point in counted})
    _, top = _scale([float(point.train_rows) for point in counted if point.train_rows is not None])
    body, x, y = _axes(months, 0.0, top, "trips")
    width = (WIDTH - LEFT - RIGHT) / max(len(months), 1) * 0.7 / len(colors)
    for offset, color in enumerate(colors):
        for point in (p for p in counted if p.color == color):
            left = x(months.index(point.month)) - width * len(colors) / 2 + offset * width
            body.append(
                f'<rect x="{left:.1f}" y="{y(point.train_rows):.1f}" width="{width:.1f}" '
                f'height="{y(0.0) - y(point.train_rows):.1f}" fill="{COLOURS.get(color, "#1565c0")}"/>'
            )
    alt = "Training trips (1-60 min) by month: " + "; ".join(
        f"{point.color} {point.month} {point.train_rows:,}" for point in counted
    )
    return _svg(body, "Training trips (1-60 min) by month"), alt


def trend_section(records: list[dict[str, Any]]) -> str:
    """The gallery's charts as HTML <img> elements (data URIs) with alt text; empty without finished runs."""
    points = month_points(records)
    images = []
    for chart in (rmse_chart(points), trips_chart(points)):
        if chart is None:
            continue
        svg, alt = chart
        source = "data:image/svg+xml;base64," + base64.b64encode(svg.encode()).decode()
        images.append(f'<img class="trend" src="{source}" alt="{html.escape(alt)}" width="{WIDTH}" height="{HEIGHT}">')
    if not images:
        return ""
    return '<section class="trends">' + "".join(images) + "</section>"
