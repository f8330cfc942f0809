"""Rendered notebook reports: self-contained, offline, sanitized HTML.

Two renderings per executed notebook: the full report (code and outputs) and the review
report (outputs only, for readers who do not want the code). Both are single files: plots
are inline data URIs, styles are inline, and no script is fetched from a CDN or taken from
the notebook's outputs, so a report opens from a laptop's disk or from MLflow's artifact
view with nothing else running, and shows nothing a notebook output could inject.
"""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import nbformat
    from nbconvert import HTMLExporter

TEMPLATE_DIR = Path(__file__).parent / "templates"

# Output types that only do something by running script in the reader's browser.
SCRIPT_MIME_TYPES = (
    "application/javascript",
    "text/javascript",
    "application/vnd.jupyter.widget-view+json",
    "application/vnd.jupyter.widget-state+json",
    "application/vnd.bokehjs_exec.v0+json",
    "application/vnd.bokehjs_load.v0+json",
    "application/vnd.holoviews_exec.v0+json",
    "application/vnd.holoviews_load.v0+json",
)

# HTML that notebook outputs may keep: what pandas tables and rich reprs need, nothing active.
ALLOWED_TAGS = {
    "a",
    "abbr",
    "b",
    "blockquote",
    "br",
    "caption",
    "code",
    "col",
    "colgroup",
    "dd",
    "details",
    "div",
    "dl",
    "dt",
    "em",
    "h1",
    "h2",
    "h3",
    "h4",
    "h5",
    "h6",
    "hr",
    "i",
    "img",
    "li",
    "ol",
    "p",
    "pre",
    "small",
    "span",
    "strong",
    "sub",
    "summary",
    "sup",
    "table",
    "tbody",
    "td",
    "tfoot",
    "th",
    "thead",
    "tr",
    "u",
    "ul",
}
ALLOWED_ATTRIBUTES = {
    "*": {"class", "title", "align"},
    "a": {"href", "name"},
    "img": {"src", "alt", "width", "height"},
    "td": {"colspan", "rowspan"},
    "th": {"colspan", "rowspan"},
}


@dataclass(frozen=True)
class ReportPaths:
    full: Path
    review: Path


def sanitize_html(fragment: str) -> str:
    """Strip scripts, event handlers, styles and unknown tags from an HTML fragment."""
    import nh3

    return nh3.clean(
        fragment,
        tags=ALLOWED_TAGS,
        attributes=ALLOWED_ATTRIBUTES,
        clean_content_tags={"script", "style", "iframe", "object", "embed", "template"},
        url_schemes={"http", "https", "mailto", "data"},
        link_rel="noopener noreferrer",
    )


def sanitize_outputs(notebook: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """A copy of `notebook` whose outputs cannot run script in a reader's browser."""
    clean = copy.deepcopy(notebook)
    for cell in clean.cells:
        for output in cell.get("outputs", []):
            data = output.get("data")
            if not data:
                continue
            for mime in SCRIPT_MIME_TYPES:
                data.pop(mime, None)
            if "text/html" in data:
                html = data["text/html"]
                data["text/html"] = sanitize_html("".join(html) if isinstance(html, list) else html)
            if not data:
                # Only script was there: say what was dropped rather than show nothing.
                data["text/plain"] = "[interactive output removed from the static report]"
    return clean


def first_error(notebook: nbformat.NotebookNode) -> str | None:
    """'cell N: Name: message' for the first cell that raised, else None."""
    for index, cell in enumerate(notebook.cells):
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                count = cell.get("execution_count")
                where = f"cell [{count}]" if count else f"cell #{index}"
                return f"{where}: {output.get('ename', 'Error')}: {output.get('evalue', '')}"
    return None


# One exporter per kind, made on first use and kept: a new one compiles its Jinja templates
# again, which was half of a render (docs/performance.md). Exporters are reusable (nbconvert's
# own command line converts many notebooks with one) but not meant for two threads at once, and
# the pipeline renders the reports of two stages running side by side from two threads: hence the lock.
_exporters: dict[bool, HTMLExporter] = {}
_render_lock = threading.Lock()


def _exporter(review: bool) -> HTMLExporter:
    """The exporter of full (`review` False) or review reports; call with _render_lock held."""
    if review not in _exporters:
        from nbconvert import HTMLExporter

        _exporters[review] = HTMLExporter(
            extra_template_basedirs=[str(TEMPLATE_DIR)],
            template_name="offline",
            embed_images=True,
            exclude_input=review,
            exclude_input_prompt=review,
            exclude_output_prompt=review,
        )
    return _exporters[review]


def reopen_command(executed_notebook: Path) -> str | None:
    """The command that reopens this notebook of its run in JupyterLab (None outside a run folder)."""
    from taxi_duration.runfiles import run_id_prefix

    run = run_id_prefix(Path(executed_notebook).parent)
    return f"make reopen RUN={run} STAGE={Path(executed_notebook).stem}" if run else None


def render_reports(executed_notebook: Path, failure: str | None = None) -> ReportPaths:
    """Write `<name>.html` (full) and `<name>.review.html` (no code) beside the notebook.

    `failure` is the runner's account of what went wrong (a timeout leaves no error in the
    notebook itself); otherwise the first error output is shown at the top.
    """
    import nbformat  # here, not at import: a notebook runner starts its kernel before loading it

    executed_notebook = Path(executed_notebook)
    notebook = sanitize_outputs(nbformat.read(executed_notebook, as_version=4))
    failure = failure or first_error(notebook)
    title = executed_notebook.stem
    paths = ReportPaths(
        full=executed_notebook.with_suffix(".html"),
        review=executed_notebook.with_name(f"{title}.review.html"),
    )
    from taxi_duration.runfiles import atomic_path

    for path, review in ((paths.full, False), (paths.review, True)):
        resources = {
            "metadata": {"name": title},
            "taxi_title": title,
            "taxi_kind": "review report (outputs only)" if review else "full report (code and outputs)",
            "taxi_failure": failure,
            "taxi_reopen": reopen_command(executed_notebook),
        }
        with _render_lock:
            body, _ = _exporter(review).from_notebook_node(notebook, resources=resources)
        with atomic_path(path) as temporary:
            temporary.write_text(body, encoding="utf-8")
    return paths
