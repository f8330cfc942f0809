"""docs/adding-a-stage.md, followed: a new report-only stage is a notebook plus its declaration.

The notebook's cells and the declaration are read from the page itself, so the page and this test
cannot drift apart: in a copy of the project (TAXI_PROJECT_DIR) the test writes the notebook from
section 1's cells, pastes section 2's entry into notebooks/pipeline.yaml, and runs the pipeline.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nbformat
import pytest
from mlflow.tracking import MlflowClient
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

pytestmark = pytest.mark.flow

PROJECT_DIR = Path(__file__).resolve().parents[2]
WALK_THROUGH = PROJECT_DIR / "docs" / "adding-a-stage.md"
STAGE = "05_quality"
RunPipeline = Callable[..., subprocess.CompletedProcess]


def _section(number: int) -> str:
    """The text of the page's section `## <number>. ...`, up to the next `## ` heading."""
    text = WALK_THROUGH.read_text()
    found = re.search(rf"^## {number}\. .*?$(.*?)(?=^## |\Z)", text, flags=re.MULTILINE | re.DOTALL)
    assert found, f"{WALK_THROUGH} has no section '## {number}.'"
    return found.group(1)


def _blocks(section: str, *languages: str) -> list[tuple[str, str]]:
    """The fenced code blocks of a section in these languages, in order: (language, code)."""
    pattern = r"^```(\w*)\n(.*?)^```$"
    return [
        (language, code)
        for language, code in re.findall(pattern, section, flags=re.MULTILINE | re.DOTALL)
        if language in languages
    ]


def _write_notebook(notebooks: Path) -> None:
    """Section 1's cells as notebooks/05_quality.ipynb; the first Python cell tagged `parameters`."""
    cells = []
    for language, code in _blocks(_section(1), "markdown", "python"):
        if language == "markdown":
            cells.append(new_markdown_cell(code.rstrip("\n")))
        else:
            tags = [] if any(cell.cell_type == "code" for cell in cells) else ["parameters"]
            cells.append(new_code_cell(code.rstrip("\n"), metadata={"tags": tags} if tags else {}))
    assert [cell.cell_type for cell in cells].count("code") >= 3
    notebook = new_notebook(cells=cells)
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(notebook, notebooks / f"{STAGE}.ipynb")


def _declaration() -> str:
    """Section 2's entry for the stage: its lines from `05_quality:` on, as pasted under `training:`."""
    [(_, block)] = _blocks(_section(2), "yaml")
    lines = block.splitlines(keepends=True)
    start = next(index for index, line in enumerate(lines) if line.strip() == f"{STAGE}:")
    return "".join(lines[start:])


def _declare(notebooks: Path, entry: str) -> None:
    """Paste the entry at the end of the training pipeline (before `scoring:`), as the page says."""
    declarations = notebooks / "pipeline.yaml"
    text = declarations.read_text()
    scoring = re.search(r"^  scoring:", text, flags=re.MULTILINE)
    assert scoring, "notebooks/pipeline.yaml has no `  scoring:` pipeline to paste before"
    declarations.write_text(text[: scoring.start()] + entry + text[scoring.start() :])


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the notebooks, used through TAXI_PROJECT_DIR, with the page's notebook written in it."""
    copy = tmp_path / "project"
    shutil.copytree(PROJECT_DIR / "notebooks", copy / "notebooks", ignore=shutil.ignore_patterns("reopened"))
    _write_notebook(copy / "notebooks")
    monkeypatch.setenv("TAXI_PROJECT_DIR", str(copy))
    return copy


def _run(run_pipeline: RunPipeline, source: Path, project: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_pipeline("--data-source", str(source), *extra, extra_env={"TAXI_PROJECT_DIR": str(project)})


def _run_records(outputs: Path) -> list[dict[str, Any]]:
    records = [json.loads(path.read_text()) for path in outputs.glob("green/2023-03/*/run.json")]
    return sorted(records, key=lambda record: record["started"])


@pytest.mark.long
def test_a_stage_added_as_the_page_says_runs_is_archived_listed_and_reused(
    run_pipeline: RunPipeline,
    synthetic_source: Path,
    project: Path,
    isolated_stores: dict[str, Any],
    prefect_reads: Any,
) -> None:
    _declare(project / "notebooks", _declaration())

    first = _run(run_pipeline, synthetic_source, project)
    assert first.returncode == 0, first.stderr[-3000:]
    assert f"{STAGE}.review.html" in first.stdout  # the closing lines list its report
    [record] = _run_records(isolated_stores["outputs"])
    rows = {row["stage"]: row for row in record["stages"]}
    assert rows[STAGE]["status"] == "COMPLETED" and rows[STAGE]["review_report"] == f"{STAGE}.review.html"

    # The run folder: the executed notebook, its reports, its manifest with the declaration's fixed value.
    run_dir = Path(
        MlflowClient(isolated_stores["tracking_uri"]).get_run(record["mlflow_run_id"]).data.tags["taxi.run_dir"]
    )
    for name in (f"{STAGE}.ipynb", f"{STAGE}.html", f"{STAGE}.review.html"):
        assert (run_dir / name).is_file(), name
    manifest = json.loads((run_dir / f"{STAGE}.manifest.json").read_text())
    assert manifest["stage"] == STAGE and manifest["kind"] == "stage"
    assert manifest["max_bad_share"] == 0.02  # the declaration's `parameters`, not the cell's default
    assert set(manifest["shares"]) == {
        "pickup zone unknown to TLC",
        "dropoff zone unknown to TLC",
        "distance missing or negative",
        "duration outside 1-60 min",
    }
    assert manifest["metrics"]["quality_checks_flagged"] == len(manifest["flagged"])
    # It got only what its parameters cell declares: the training file, not the validation one.
    executed = nbformat.read(run_dir / f"{STAGE}.ipynb", as_version=4)
    injected = executed.metadata["papermill"]["parameters"]
    assert set(injected) == {
        "year",
        "month",
        "color",
        "train_file",
        "data_source",
        "data_dir",
        "run_dir",
        "max_bad_share",
    }

    # MLflow archived the executed notebook and both reports.
    client = MlflowClient(isolated_stores["tracking_uri"])
    archived = {
        a.path for folder in ("notebooks", "reports") for a in client.list_artifacts(record["mlflow_run_id"], folder)
    }
    assert {f"notebooks/{STAGE}.ipynb", f"reports/{STAGE}.html", f"reports/{STAGE}.review.html"} <= archived

    # The gallery links its report; Prefect has a task run named after it.
    gallery = (isolated_stores["outputs"] / "index.html").read_text()
    assert f"{STAGE}.review.html" in gallery
    api = prefect_reads.api()
    task_runs = {run.name: run.state for run in prefect_reads.task_runs(api, record["prefect_flow_run_id"])}
    assert task_runs[STAGE].type.value == "COMPLETED" and task_runs[STAGE].name == "Completed"

    # A rerun with nothing changed reuses it.
    second = _run(run_pipeline, synthetic_source, project)
    assert second.returncode == 0, second.stderr[-3000:]
    rerun = _run_records(isolated_stores["outputs"])[-1]
    assert {row["stage"]: row["status"] for row in rerun["stages"]}[STAGE] == "CACHED"
    reused = client.get_run(rerun["mlflow_run_id"]).data.tags["taxi.reused_stages"].split(",")
    assert STAGE in reused
    assert f"{STAGE} (run {record['mlflow_run_id'][:8]})" in second.stdout
    rerun_states = {run.name: run.state for run in prefect_reads.task_runs(api, rerun["prefect_flow_run_id"])}
    assert rerun_states[STAGE].name == "Cached"
    assert f"reports/{STAGE}.review.html" in {a.path for a in client.list_artifacts(rerun["mlflow_run_id"], "reports")}


def _documented_mistakes() -> list[str]:
    """Section 4's messages, one code block each, in the page's order."""
    return [block.strip() for _, block in _blocks(_section(4), "")]


@pytest.mark.parametrize(
    ("mistake", "planted", "message"),
    [
        pytest.param(
            "undeclared", lambda entry: entry.replace("max_bad_share: 0.02", "max_share: 0.02"), 0, id="undeclared"
        ),
        pytest.param(
            "wrong type", lambda entry: entry.replace("max_bad_share: 0.02", 'max_bad_share: "2%"'), 1, id="wrong-type"
        ),
        pytest.param(
            "unknown upstream",
            lambda entry: entry.replace("reads: [train]", "needs: [02_feature]\n      reads: [train]"),
            2,
            id="unknown-upstream",
        ),
    ],
)
def test_a_mistake_in_the_declaration_is_refused_before_any_kernel_starts_as_the_page_shows(
    run_pipeline: RunPipeline,
    synthetic_source: Path,
    project: Path,
    isolated_stores: dict[str, Any],
    mistake: str,
    planted: Callable[[str], str],
    message: int,
) -> None:
    entry = _declaration()
    assert planted(entry) != entry, f"the page's entry changed: {mistake} is no longer planted"
    _declare(project / "notebooks", planted(entry))

    refused = _run(run_pipeline, synthetic_source, project)

    documented = _documented_mistakes()[message]
    expected, exit_code = (documented, 1) if documented.startswith("Pipeline failed:") else (documented, 2)
    assert refused.returncode == exit_code, refused.stderr[-3000:]
    # The page shows the message as the terminal does; its path is elided (…) there.
    head, _, tail = expected.partition("…")
    assert head in refused.stderr and tail in refused.stderr, refused.stderr[-3000:]
    assert f"{STAGE}" in refused.stderr
    # Refused before the MLflow run and before any notebook: no run, no run folder, no executed notebook.
    client = MlflowClient(isolated_stores["tracking_uri"])
    assert [
        run for experiment in client.search_experiments() for run in client.search_runs([experiment.experiment_id])
    ] == []
    assert not list(isolated_stores["outputs"].glob("**/*.ipynb"))
