"""The run gallery: `outputs/index.html`, one row per pipeline or scoring run, newest first.

Each run folder holds a `run.json` record written by the flow when the run ends (pass or
fail). The gallery is rebuilt from all records after every run, so it never drifts from what
is on disk, and it is a single static file with relative links: it opens from the file system.
"""

from __future__ import annotations

import datetime as dt
import html
import json
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlparse

from taxi_duration.review.trends import trend_section
from taxi_duration.runfiles import atomic_path

RUN_RECORD = "run.json"
GALLERY = "index.html"


def write_run_record(run_dir: Path, record: dict[str, Any]) -> Path:
    path = Path(run_dir) / RUN_RECORD
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
    return path


def read_run_record(run_dir: Path) -> dict[str, Any]:
    """One run folder's record (raises OSError or ValueError when it is missing or damaged)."""
    return json.loads((Path(run_dir) / RUN_RECORD).read_text())


def read_run_records(outputs_dir: Path) -> list[dict[str, Any]]:
    """Every readable run record under `outputs_dir`, newest first, each with its folder."""
    records = []
    for path in Path(outputs_dir).glob(f"*/*/*/{RUN_RECORD}"):
        try:
            record = read_run_record(path.parent)
        except (OSError, ValueError):
            continue  # a record being replaced right now, or damaged: leave it out, don't fail
        record["folder"] = path.parent.relative_to(outputs_dir).as_posix()
        records.append(record)
    return sorted(records, key=lambda record: str(record.get("started", "")), reverse=True)


def mlflow_run_url(tracking_uri: str, experiment_id: str | None, run_id: str | None) -> str | None:
    """Link to the run in the MLflow UI, when the tracking URI is a server's."""
    if not (experiment_id and run_id) or urlparse(tracking_uri).scheme not in ("http", "https"):
        return None
    return f"{tracking_uri.rstrip('/')}/#/experiments/{quote(str(experiment_id))}/runs/{quote(str(run_id))}"


def _format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return ""
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s" if minutes else f"{rest} s"


def _period(record: dict[str, Any]) -> str:
    """'2023-03 → 2023-04' for a training run; 'scores 2023-05 with nyc-taxi-duration v3' for a scoring run."""
    e = html.escape
    if record.get("kind") == "score":
        return f"scores {e(str(record.get('scored_month', '')))} with {e(str(record.get('model', '')))}"
    return f"{e(str(record.get('train_month', '')))} → {e(str(record.get('validation_month', '')))}"


def _row(record: dict[str, Any]) -> str:
    e = html.escape
    folder = record["folder"]
    status = str(record.get("status", "UNKNOWN"))
    rmse = record.get("rmse")
    links = []
    for stage in record.get("stages", []):
        if not stage.get("review_report") and stage.get("status") == "COMPLETED":
            continue  # a step without a notebook (fetching data): only worth a line if it failed
        parts = []
        for label, key in (("review", "review_report"), ("full", "full_report")):
            if stage.get(key):
                parts.append(f'<a href="{e(quote(f"{folder}/{stage[key]}"))}">{label}</a>')
        status_mark = (
            ""
            if stage.get("status") == "COMPLETED"
            else f' <span class="stage-{e(str(stage.get("status", "")).lower())}">({e(str(stage.get("status", "")).lower())})</span>'
        )
        links.append(f"<li>{e(stage['stage'])}{status_mark}: {' · '.join(parts) or 'no report'}</li>")
    comparison = record.get("comparison")
    if comparison:
        href = e(quote(f"{folder}/{comparison}"))
        links.append(f'<li><a class="comparison" href="{href}">what changed since last month</a></li>')
    mlflow_link = record.get("mlflow_url")
    run_cell = e(str(record.get("mlflow_run_id", ""))[:8])
    if mlflow_link:
        run_cell = f'<a href="{e(mlflow_link)}">{run_cell}</a>'
    error = record.get("error")
    return (
        f'<tr class="color-{e(str(record.get("color", "")))} status-{e(status.lower())}">'
        f"<td>{e(str(record.get('started', ''))[:19].replace('T', ' '))}</td>"
        f"<td>{e(str(record.get('color', '')))}</td>"
        f"<td>{_period(record)}</td>"
        f'<td><span class="status status-{e(status.lower())}">{e(status)}</span>'
        + (f'<div class="error">{e(str(error))}</div>' if error else "")
        + "</td>"
        f'<td class="num">{"" if rmse is None else f"{float(rmse):.3f}"}</td>'
        f'<td class="num">{e(_format_seconds(record.get("seconds")))}</td>'
        f"<td><ul>{''.join(links)}</ul></td>"
        f"<td>{run_cell}</td>"
        "</tr>"
    )


def render_gallery(records: list[dict[str, Any]], generated: dt.datetime | None = None) -> str:
    generated = generated or dt.datetime.now(dt.UTC)
    rows = (
        "\n".join(_row(record) for record in records)
        or '<tr><td colspan="8">No runs yet: <code>make run</code>.</td></tr>'
    )
    colors = sorted({str(record.get("color", "")) for record in records})
    statuses = sorted({str(record.get("status", "UNKNOWN")).lower() for record in records})
    filters = _filters(colors, statuses)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>NYC taxi duration · pipeline runs</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; width: 100%; }}
th, td {{ border-bottom: 1px solid #ddd; padding: 0.45em 0.6em; text-align: left; vertical-align: top; }}
th {{ background: #f3f3f6; }}
td.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
ul {{ margin: 0; padding-left: 1.1em; }}
.status {{ padding: 0.1em 0.5em; border-radius: 0.8em; font-size: 0.85em; font-weight: 600; }}
.status-finished {{ background: #d4f4dd; color: #1b5e20; }}
.status-failed {{ background: #fdecea; color: #b71c1c; }}
.status-killed {{ background: #fff3cd; color: #7a5b00; }}
.status-running {{ background: #e3f2fd; color: #0d47a1; }}
.stage-failed {{ color: #b71c1c; }}
.error {{ color: #b71c1c; font-size: 0.85em; max-width: 28em; margin-top: 0.3em; }}
.meta {{ color: #666; font-size: 0.9em; }}
.trends img {{ margin: 0 1em 1em 0; border: 1px solid #ddd; }}
.filters a {{ margin-right: 0.6em; }}
{filters["css"]}
</style>
</head>
<body>
<h1>NYC taxi trip duration · pipeline runs</h1>
<p class="meta">{len(records)} run(s), newest first. Generated {html.escape(generated.strftime("%Y-%m-%d %H:%M:%S UTC"))}.
Review reports show outputs only; full reports include the code.</p>
{trend_section(records)}
<p class="filters">Show: {filters["links"]}</p>
{filters["open"]}<table>
<thead><tr><th>started (UTC)</th><th>colour</th><th>train → validation, or scored month</th><th>status</th><th>RMSE (min)</th><th>duration</th><th>reports</th><th>MLflow run</th></tr></thead>
<tbody>
{rows}
</tbody>
</table>{filters["close"]}
</body>
</html>
"""


def _filters(colors: list[str], statuses: list[str]) -> dict[str, str]:
    """Filters by colour and status without script: links to anchors on nested wrappers, and
    CSS that hides the other rows while one of them is the URL's target."""
    e = html.escape
    names = [f"color-{color}" for color in colors] + [f"status-{status}" for status in statuses]
    links = ['<a href="#">all</a>'] + [f'<a href="#only-{e(name)}">{e(name.split("-", 1)[1])}</a>' for name in names]
    css = "\n".join(f"#only-{name}:target tbody tr:not(.{name}) {{ display: none; }}" for name in names)
    return {
        "links": " ".join(links),
        "css": css,
        "open": "".join(f'<div id="only-{e(name)}">' for name in names),
        "close": "</div>" * len(names),
    }


def build_gallery(outputs_dir: Path) -> Path:
    """Regenerate `outputs_dir/index.html` from every run record; return its path."""
    outputs_dir = Path(outputs_dir)
    path = outputs_dir / GALLERY
    with atomic_path(path) as temporary:
        temporary.write_text(render_gallery(read_run_records(outputs_dir)), encoding="utf-8")
    return path
