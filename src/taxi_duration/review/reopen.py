"""Reopen a past run's notebook in JupyterLab: `python -m taxi_duration.review.reopen RUN [--stage S]` (`make reopen`).

The copy goes to `notebooks/reopened/<run id8>/<stage>.ipynb` (not committed). It is the
notebook as that run executed it, outputs cleared, and its `parameters` cell holds the exact
values papermill injected then (read from the executed notebook's metadata). A second cell
keeps the original run intact when the copy is run again: writes go to a scratch run folder
beside it (holding copies of the run's inputs), MLflow logging goes to a scratch experiment,
and nothing is registered. The run's recorded git commit and notebook sha256 are checked
against the checkout, and any difference is said plainly.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from taxi_duration import settings
from taxi_duration.orchestration import declarations, stage_cache
from taxi_duration.review.past_runs import PastRun, RunNotFoundError, find_run
from taxi_duration.tracking import mlflow_runs

REOPENED_FOLDER = "reopened"
SCRATCH_RUN_FOLDER = "run"
SCRATCH_EXPERIMENT_SUFFIX = "-reopened"
JUPYTER_URL = "http://127.0.0.1:8888/lab/tree"  # `make lab` serves notebooks/ on JupyterLab's default port
REDIRECT_TAG = "reopened-redirect"


class ReopenError(ValueError):
    """The run has no executed notebook for that stage, or it carries no injected parameters."""


@dataclass(frozen=True)
class Reopened:
    notebook: Path
    parameters: dict[str, Any]  # exactly what papermill injected into the run's notebook
    warnings: tuple[str, ...]  # how the checkout differs from the code the run executed
    url: str


def default_stage(run: PastRun) -> str:
    """The last stage of the run's pipeline (the one that trains, or scores, in the shipped pipelines)."""
    return declarations.pipeline("scoring" if run.kind == "score" else "training")[-1].name


def redirected_parameters(parameters: dict[str, Any], scratch_run_dir: Path) -> dict[str, Any]:
    """The overrides that keep the original run intact: its folder, MLflow run and registry untouched."""
    overrides: dict[str, Any] = {"run_dir": str(scratch_run_dir)}
    if "mlflow_run_id" in parameters:
        overrides["mlflow_run_id"] = None  # the notebook then starts (and ends) a run of its own...
        experiment = parameters.get("experiment_name") or settings.experiment_name(None)
        overrides["experiment_name"] = f"{experiment}{SCRATCH_EXPERIMENT_SUFFIX}"  # ...away from the pipeline's runs
    if "registered_model" in parameters:
        overrides["registered_model"] = None
    return {name: value for name, value in overrides.items() if name in parameters}


def provenance_warnings(run: PastRun, stage: str) -> list[str]:
    """What differs between the code the run executed and the checkout (empty: nothing)."""
    warnings = []
    recorded_commit, current_commit = run.record.get("git_commit"), mlflow_runs.git_commit()
    if not recorded_commit:
        warnings.append("the run recorded no git commit: the checkout cannot be checked against it")
    elif recorded_commit != current_commit:
        warnings.append(
            f"the run executed git commit {recorded_commit[:12]}; the checkout is at "
            f"{(current_commit or 'no commit')[:12]}"
        )
    recorded_notebook = (run.record.get("notebooks") or {}).get(stage)
    if not recorded_notebook:
        warnings.append(f"the run recorded no sha256 of {stage}.ipynb")
        return warnings
    try:
        checkout_notebook = declarations.find(stage).notebook
    except declarations.DeclarationError as problem:
        warnings.append(f"the checkout does not run this stage any more: {problem}")
        return warnings
    if not checkout_notebook.is_file():
        warnings.append(f"{checkout_notebook} is not in the checkout")
    elif stage_cache.file_sha256(checkout_notebook) != recorded_notebook:
        warnings.append(
            f"notebooks/{checkout_notebook.name} has changed since the run: the reopened copy is the run's "
            "version, not the checkout's"
        )
    return warnings


def reopen(run: PastRun, stage: str, notebooks_dir: Path | None = None) -> Reopened:
    """Write the reopened copy of `stage` from `run` (and its scratch run folder); say where it is."""
    import nbformat
    from papermill.translators import translate_parameters

    executed = run.folder / f"{stage}.ipynb"
    if not executed.is_file():
        present = sorted(path.stem for path in run.folder.glob("*.ipynb"))
        raise ReopenError(
            f"run {run.short_id} ({run.folder}) has no executed {stage}.ipynb; it has: "
            f"{', '.join(present) or 'no notebooks'}"
        )
    notebook = nbformat.read(executed, as_version=4)
    parameters = dict((notebook.metadata.get("papermill") or {}).get("parameters") or {})
    if not parameters:
        raise ReopenError(f"{executed} carries no injected parameters in its papermill metadata")
    target_dir = Path(notebooks_dir or settings.notebooks_dir()) / REOPENED_FOLDER / run.short_id
    scratch = target_dir / SCRATCH_RUN_FOLDER
    _copy_run_inputs(run.folder, scratch)

    cells = []
    for cell in notebook.cells:
        tags = cell.get("metadata", {}).get("tags", [])
        if "injected-parameters" in tags:
            continue  # its values move into the parameters cell
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
        cell.get("metadata", {}).pop("papermill", None)
        cell.get("metadata", {}).pop("execution", None)
        cells.append(cell)
        if "parameters" in tags:
            cell.source = translate_parameters(
                "python", "python", parameters, f"Parameters of run {run.run_id} (as injected)"
            ).rstrip()
            cells.append(
                nbformat.v4.new_code_cell(
                    _redirect_source(run, redirected_parameters(parameters, scratch)), metadata={"tags": [REDIRECT_TAG]}
                )
            )
    notebook.cells = cells
    notebook.metadata.pop("papermill", None)
    notebook.metadata["taxi_reopened"] = {"run_id": run.run_id, "run_dir": str(run.folder), "stage": stage}
    path = target_dir / f"{stage}.ipynb"
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(notebook, path)
    url = f"{JUPYTER_URL}/{REOPENED_FOLDER}/{run.short_id}/{stage}.ipynb"
    return Reopened(path, parameters, tuple(provenance_warnings(run, stage)), url)


def _redirect_source(run: PastRun, overrides: dict[str, Any]) -> str:
    lines = [
        f"# Reopened from run {run.run_id} ({run.folder}).",
        "# The cell above holds that run's exact parameters. This one keeps the original run intact:",
        "# results go to a scratch folder beside this notebook (holding copies of the run's inputs),",
        "# MLflow logging to a scratch experiment, and nothing is registered. Delete it to write into",
        "# the original run instead.",
    ]
    lines += [f"{name} = {value!r}" for name, value in overrides.items()]
    return "\n".join(lines)


def _copy_run_inputs(run_dir: Path, scratch: Path) -> None:
    """The run's files a stage reads (manifests, matrices, preprocessor, predictions), fresh each reopen."""
    shutil.rmtree(scratch, ignore_errors=True)
    shutil.copytree(run_dir, scratch, ignore=shutil.ignore_patterns("*.ipynb", "*.html", "compare", "run.json", ".*"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m taxi_duration.review.reopen",
        description="Reopen a past run's notebook in JupyterLab with the run's exact parameters.",
    )
    parser.add_argument("run", help="the run: MLflow run id, a prefix of it (4+ characters), or the run's folder")
    parser.add_argument(
        "--stage",
        help="a stage notebooks/pipeline.yaml declares (default: the last stage of the run's pipeline)",
    )
    args = parser.parse_args(argv)
    settings.apply_environment_defaults()
    try:
        run = find_run(args.run, settings.outputs_dir())
        reopened = reopen(run, args.stage or default_stage(run))
    except (RunNotFoundError, ReopenError) as problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    print(f"Reopened {run.label}: {reopened.notebook}")
    for warning in reopened.warnings:
        print(f"  note: {warning}")
    print("Start JupyterLab with `make lab` (if it is not running), then open:")
    print(f"  {reopened.url}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
