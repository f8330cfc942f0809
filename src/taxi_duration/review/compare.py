"""The comparison report of two pipeline runs: `python -m taxi_duration.review.compare A B` (`make compare`).

A run is named by its MLflow run id, a prefix of it, or its folder. The report is one
self-contained HTML file, with the rules of the notebook reports: inline styles and images,
no script, everything taken from the runs escaped. It is written into the newer run's folder
under `compare/` and archived in that run's MLflow run under `reports/compare/`. Every
finished pipeline run is compared with the newest finished run of the month before
(`compare_with_previous_month`), and the gallery links to that report.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import datetime as dt
import html
import sys
from pathlib import Path

from taxi_duration import settings
from taxi_duration.review.past_runs import PastRun, RunNotFoundError, find_run, previous_month_run
from taxi_duration.review.run_diff import (
    Comparison,
    CrossScore,
    Figure,
    FigurePair,
    NotebookChange,
    Value,
    compare_runs,
)
from taxi_duration.runfiles import atomic_path
from taxi_duration.tracking import mlflow_runs

COMPARE_FOLDER = "compare"
MLFLOW_FOLDER = "reports/compare"

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; max-width: 110em; }
table { border-collapse: collapse; margin-bottom: 1.2em; }
th, td { border-bottom: 1px solid #ddd; padding: 0.35em 0.7em; text-align: left; vertical-align: top; }
th { background: #f3f3f6; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.worse { color: #b71c1c; } .better { color: #1b5e20; } .same { color: #888; } .changed { color: #7a5b00; }
pre.diff { background: #f7f7f9; padding: 0.6em; overflow-x: auto; font-size: 0.85em; }
pre.diff .add { background: #e6ffed; display: block; } pre.diff .del { background: #ffeef0; display: block; }
pre.diff .hunk { color: #6a737d; display: block; } pre.diff .context { display: block; }
.figures td { width: 50%; } .figures img { max-width: 100%; }
.meta { color: #666; font-size: 0.9em; }
"""


def report_name(older: PastRun) -> str:
    """`compare/<older month>-<older run id8>.html`, inside the newer run's folder."""
    return f"{COMPARE_FOLDER}/{older.month}-{older.short_id}.html"


def write_comparison(a: PastRun, b: PastRun, cross_score: bool = True, archive: bool = True) -> Path:
    """Compare two runs, write the report into the newer run's folder, archive it in its MLflow run."""
    comparison = compare_runs(a, b, cross_score=cross_score)
    path = comparison.newer.folder / report_name(comparison.older)
    with atomic_path(path) as temporary:
        temporary.write_text(render(comparison), encoding="utf-8")
    if archive:
        try:
            mlflow_runs.log_files(
                str(comparison.newer.record.get("tracking_uri")), comparison.newer.run_id, [path], MLFLOW_FOLDER
            )
        except Exception as problem:  # noqa: BLE001 - e.g. the run's tracking server is not running now
            print(
                f"warning: the comparison is written ({path}) but not archived in MLflow run "
                f"{comparison.newer.run_id}: {problem!r}"
            )
    return path


def compare_with_previous_month(newer: PastRun, outputs_dir: Path) -> str | None:
    """Write `newer`'s comparison with the previous training month's newest finished run (same
    colour); its path relative to `newer`'s folder, or None when there is no such run."""
    older = previous_month_run(newer, outputs_dir)
    if older is None:
        return None
    return write_comparison(older, newer).relative_to(newer.folder).as_posix()


def _value(value: Value) -> str:
    if value is None:
        return '<span class="same">—</span>'
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return html.escape(str(value))
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}" if abs(value) < 1 else f"{value:,.3f}"


def _delta(figure: Figure, lower_is_better: bool) -> str:
    """newer − older (and relative), coloured only where lower is better (errors): there a rise is worse."""
    delta = figure.delta
    if delta is None:
        return "" if figure.older == figure.newer else '<span class="changed">changed</span>'
    if delta == 0:
        return '<span class="same">0</span>'
    older = figure.older
    relative = f" ({delta / older:+.1%})" if isinstance(older, int | float) and older else ""
    shown = f"{int(delta):+,}" if isinstance(figure.older, int) and isinstance(figure.newer, int) else f"{delta:+.4g}"
    tone = ("worse" if delta > 0 else "better") if lower_is_better else "delta"
    return f'<span class="{tone}">{html.escape(shown + relative)}</span>'


def _table(
    figures: tuple[Figure, ...], older: PastRun, newer: PastRun, deltas: bool = True, lower_is_better: bool = False
) -> str:
    if not figures:
        return '<p class="meta">Neither run recorded these figures.</p>'
    head = f"<tr><th></th><th>{html.escape(older.label)}</th><th>{html.escape(newer.label)}</th>{'<th>change</th>' if deltas else ''}</tr>"
    rows = "".join(
        f'<tr><th scope="row">{html.escape(figure.label)}</th><td class="num">{_value(figure.older)}</td>'
        f'<td class="num">{_value(figure.newer)}</td>{f"<td>{_delta(figure, lower_is_better)}</td>" if deltas else ""}</tr>'
        for figure in figures
    )
    return f"<table>{head}{rows}</table>"


def _cross_table(scores: tuple[CrossScore, ...]) -> str:
    if not scores:
        return '<p class="meta">Cross-scoring was not asked for.</p>'
    rows = "".join(
        f"<tr><td>{html.escape(score.model_run)}</td><td>{html.escape(score.validation_month)}</td>"
        f'<td class="num">{_value(score.rmse)}</td><td class="meta">{html.escape(score.note)}</td></tr>'
        for score in scores
    )
    return f"<table><tr><th>model of</th><th>validation month</th><th>RMSE (min)</th><th></th></tr>{rows}</table>"


def _diff_class(line: str) -> str:
    return {"@": "hunk", "+": "add", "-": "del"}.get(line[:1], "context")


def _notebook_section(change: NotebookChange) -> str:
    name = html.escape(f"{change.stage}.ipynb")
    if not change.cells:
        return f"<h3>{name}</h3><p>Same source in both runs (outputs ignored).</p>"
    blocks = []
    for cell in change.cells:
        where = {
            "changed": f"cell {cell.older_cell} → cell {cell.newer_cell}",
            "added": f"cell {cell.newer_cell} added",
            "removed": f"cell {cell.older_cell} removed",
        }[cell.kind]
        lines = "".join(
            f'<span class="{_diff_class(line)}">{html.escape(line) or " "}</span>'
            for line in cell.diff
            if not line.startswith(("---", "+++"))
        )
        blocks.append(f'<p class="cell-change {cell.kind}">{html.escape(where)}</p><pre class="diff">{lines}</pre>')
    return (
        f'<h3>{name} <span class="changed">changed</span></h3><p class="meta">{len(change.cells)} cell(s) differ.</p>'
        + "".join(blocks)
    )


def _image(png: str | None, alt: str) -> str:
    if png is None:
        return '<span class="meta">not in this run</span>'
    try:  # only a real base64 PNG goes into the data URI: nothing else from the notebook reaches the page
        raw = base64.b64decode(png.replace("\n", ""), validate=True)
    except (binascii.Error, ValueError):
        return '<span class="meta">unreadable image</span>'
    if not raw.startswith(b"\x89PNG"):
        return '<span class="meta">not a PNG</span>'
    return f'<img src="data:image/png;base64,{base64.b64encode(raw).decode()}" alt="{html.escape(alt)}">'


def _figures_section(pairs: tuple[FigurePair, ...], older: PastRun, newer: PastRun) -> str:
    rows = "".join(
        f"<tr><td>{_image(pair.older_png, f'{older.label}: {pair.alt}')}</td>"
        f"<td>{_image(pair.newer_png, f'{newer.label}: {pair.alt}')}</td></tr>"
        for pair in pairs
    )
    return (
        f'<table class="figures"><tr><th>{html.escape(older.label)}</th><th>{html.escape(newer.label)}</th></tr>'
        f"{rows}</table>"
    )


def render(comparison: Comparison, generated: dt.datetime | None = None) -> str:
    """The report: one offline HTML page, no script."""
    older, newer = comparison.older, comparison.newer
    generated = generated or dt.datetime.now(dt.UTC)
    title = f"{newer.label} compared with {older.label}"
    changed = [change.stage for change in comparison.notebooks if change.cells]
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title>
<style>{STYLE}</style>
</head>
<body>
<h1>{html.escape(title)}</h1>
<p class="meta">Generated {generated:%Y-%m-%d %H:%M:%S UTC} from the two run folders (manifests, run.json, executed notebooks).
Notebooks changed: {html.escape(", ".join(changed) or "none")}. Reopen either run's training notebook with
<code>make reopen RUN={html.escape(older.short_id)}</code> or <code>make reopen RUN={html.escape(newer.short_id)}</code>.</p>
<h2 id="parameters">Parameters and code</h2>
{_table(comparison.parameters, older, newer, deltas=False)}
<h2 id="data">Data</h2>
{_table(comparison.data, older, newer)}
<h3>Busiest pickup zones</h3>
{_table(comparison.busiest_zones["pickup"], older, newer, deltas=False)}
<h3>Busiest dropoff zones</h3>
{_table(comparison.busiest_zones["dropoff"], older, newer, deltas=False)}
<h2 id="model">Model</h2>
{_table(comparison.model, older, newer, lower_is_better=True)}
<h3>Error by trip distance</h3>
{_table(comparison.error_by_distance, older, newer, lower_is_better=True)}
<h3>Each model on both validation months</h3>
{_cross_table(comparison.cross_scores)}
<h2 id="notebooks">Notebook sources</h2>
{"".join(_notebook_section(change) for change in comparison.notebooks)}
<h2 id="figures">Figures</h2>
{_figures_section(comparison.figures, older, newer)}
</body>
</html>
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m taxi_duration.review.compare",
        description="Compare two pipeline runs: one offline HTML report in the newer run's folder (and its MLflow run).",
    )
    parser.add_argument("a", help="a run: MLflow run id, a prefix of it (4+ characters), or the run's folder")
    parser.add_argument("b", help="the other run, named the same ways")
    parser.add_argument(
        "--no-cross-score", action="store_true", help="do not score each model on the other's validation month"
    )
    parser.add_argument(
        "--no-archive", action="store_true", help="do not archive the report in the newer run's MLflow run"
    )
    args = parser.parse_args(argv)
    settings.apply_environment_defaults()
    outputs = settings.outputs_dir()
    try:
        a, b = find_run(args.a, outputs), find_run(args.b, outputs)
        path = write_comparison(a, b, cross_score=not args.no_cross_score, archive=not args.no_archive)
    except (RunNotFoundError, ValueError) as problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    print(f"Comparison: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
