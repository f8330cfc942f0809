"""Rendered reports: offline, self-contained, sanitized, and honest about failures."""

from __future__ import annotations

import base64
import io
import re

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from taxi_duration.review.reports import first_error, render_reports, sanitize_html, sanitize_outputs

INLINE_PNG = re.compile(r'<img [^>]*src="data:image/png;base64,')
EXTERNAL_SCRIPT = re.compile(r"<script[^>]*\ssrc=", re.IGNORECASE)
EXTERNAL_STYLESHEET = re.compile(r"<link[^>]*stylesheet|@import\s+url\(\s*['\"]?(https?:)?//", re.IGNORECASE)


def _png() -> str:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(1, 1))
    figure.add_subplot().plot([0, 1], [1, 0])
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return base64.b64encode(buffer.getvalue()).decode()


def _executed_notebook(tmp_path, *, error: bool = False, hostile: bool = False):
    cells = [
        new_markdown_cell("# A report\nSome words."),
        new_code_cell(
            "secret_code_marker = 1 + 1",
            execution_count=1,
            outputs=[new_output("execute_result", {"text/plain": "2"}, execution_count=1)],
        ),
        new_code_cell(
            "plot()",
            execution_count=2,
            outputs=[new_output("display_data", {"image/png": _png(), "text/plain": "<Figure>"})],
        ),
    ]
    if hostile:
        cells.append(
            new_code_cell(
                "hostile()",
                execution_count=3,
                outputs=[
                    new_output(
                        "display_data",
                        {
                            "text/html": '<b>bold</b><script>window.pwned = 1</script><img src="x" onerror="window.pwned = 2">'
                            '<a href="javascript:alert(1)">link</a><style>body {display: none}</style>'
                            "<table><thead><tr><th>col</th></tr></thead><tbody><tr><td>42</td></tr></tbody></table>",
                            "text/plain": "hostile",
                        },
                    ),
                    new_output("display_data", {"application/javascript": "window.pwned = 3"}),
                ],
            )
        )
    if error:
        cells.append(
            new_code_cell(
                "boom()",
                execution_count=4,
                outputs=[
                    new_output(
                        "error", ename="ZeroDivisionError", evalue="division by zero", traceback=["Traceback..."]
                    )
                ],
            )
        )
    notebook = new_notebook(
        cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}
    )
    path = tmp_path / "07_demo.ipynb"
    nbformat.write(notebook, path)
    return path


def test_full_and_review_reports_are_self_contained(tmp_path):
    paths = render_reports(_executed_notebook(tmp_path))

    assert (paths.full.name, paths.review.name) == ("07_demo.html", "07_demo.review.html")
    for path in (paths.full, paths.review):
        page = path.read_text()
        assert len(INLINE_PNG.findall(page)) == 1
        assert not EXTERNAL_SCRIPT.search(page), "no script may be fetched (require.js, MathJax, CDNs)"
        assert not EXTERNAL_STYLESHEET.search(page), "styles must be inline"
        assert "<script" not in page.lower(), "a static report needs no script at all"
        assert "This notebook failed" not in page
    assert "secret_code_marker" in paths.full.read_text()
    assert "secret_code_marker" not in paths.review.read_text(), "the review report hides code"
    assert "review report" in paths.review.read_text()


def test_hostile_outputs_cannot_run_script_but_tables_survive(tmp_path):
    paths = render_reports(_executed_notebook(tmp_path, hostile=True))

    for path in (paths.full, paths.review):
        page = path.read_text()
        assert "window.pwned" not in page
        assert "onerror" not in page and "javascript:" not in page
        assert "body {display: none}" not in page
        assert "<th>col</th>" in page and "<td>42</td>" in page and "<b>bold</b>" in page


def test_a_failed_notebook_says_so_at_the_top(tmp_path):
    paths = render_reports(_executed_notebook(tmp_path, error=True))

    for path in (paths.full, paths.review):
        page = path.read_text()
        banner = page.index("This notebook failed")
        assert banner < page.index("A report"), "the failure comes before the first cell"
        assert "ZeroDivisionError: division by zero" in page[banner : banner + 500]


def test_runner_failure_without_an_error_output_is_shown(tmp_path):
    paths = render_reports(_executed_notebook(tmp_path), failure="did not finish within 5 s and was stopped")
    assert "did not finish within 5 s" in paths.review.read_text()


def test_first_error_names_the_cell(tmp_path):
    notebook = nbformat.read(_executed_notebook(tmp_path, error=True), as_version=4)
    assert first_error(notebook) == "cell [4]: ZeroDivisionError: division by zero"
    assert first_error(nbformat.read(_executed_notebook(tmp_path), as_version=4)) is None


def test_sanitize_outputs_leaves_the_original_alone_and_explains_dropped_widgets(tmp_path):
    notebook = nbformat.read(_executed_notebook(tmp_path, hostile=True), as_version=4)
    clean = sanitize_outputs(notebook)
    assert "application/javascript" in notebook.cells[3].outputs[1].data
    assert clean.cells[3].outputs[1].data == {"text/plain": "[interactive output removed from the static report]"}


@pytest.mark.parametrize(
    "fragment",
    [
        "<script>alert(1)</script>",
        '<img src="x" onerror="alert(1)">',
        '<a href="javascript:alert(1)">x</a>',
        '<iframe src="https://example.com"></iframe>',
        '<div onclick="alert(1)">x</div>',
        "<svg><script>alert(1)</script></svg>",
    ],
)
def test_sanitize_html_removes_active_content(fragment):
    cleaned = sanitize_html(fragment).lower()
    for needle in ("<script", "onerror", "onclick", "javascript:", "<iframe", "alert(1)</script"):
        assert needle not in cleaned


def test_a_kept_exporter_renders_each_notebook_as_a_new_one_would(tmp_path, monkeypatch):
    from taxi_duration.review import reports

    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    failed = _executed_notebook(first, error=True, hostile=True)
    passed = _executed_notebook(second)
    # Fresh exporters for each notebook: what every render did before exporters were kept.
    fresh = {}
    for notebook in (failed, passed):
        monkeypatch.setattr(reports, "_exporters", {})
        paths = render_reports(notebook)
        fresh[notebook] = (paths.full.read_bytes(), paths.review.read_bytes())
    # Kept exporters, the failed notebook first: nothing of it may reach the next report.
    monkeypatch.setattr(reports, "_exporters", {})
    for notebook in (failed, passed, failed):
        paths = render_reports(notebook)
        assert (paths.full.read_bytes(), paths.review.read_bytes()) == fresh[notebook]
    assert set(reports._exporters) == {False, True}


def test_report_plots_carry_their_figures_alt_text(tmp_path):
    # What a notebook cell showing a plots.* figure leaves: the PNG and, beside it, the alt text.
    import nbformat
    import numpy as np

    from taxi_duration.review import plots, reports

    figure = plots.residual_histogram(np.array([1.0, 2.0, 3.0]), np.array([1.5, 2.0, 2.0]))
    assert figure.alt_text().startswith(figure.axes[0].get_title())
    _, metadata = figure._repr_mimebundle_()
    notebook = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("plots.residual_histogram(...)")
    cell.outputs = [
        nbformat.v4.new_output("display_data", data={"image/png": base64.b64encode(b"png").decode()}, metadata=metadata)
    ]
    notebook.cells = [cell]
    path = tmp_path / "plotted.ipynb"
    nbformat.write(notebook, path)
    review = reports.render_reports(path).review.read_text()
    assert f'alt="{figure.alt_text()}"' in review
