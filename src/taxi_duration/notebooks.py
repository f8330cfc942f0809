"""The notebook runner: execute one parameterized notebook with papermill, render it, report.

Each notebook runs in a child process (`python -m taxi_duration.notebooks ...`): papermill
changes the process-wide working directory and Jupyter clients dislike worker threads, so a
Prefect task must not run it in-process. The child is given a wall-clock timeout; on expiry
it is asked to stop (it shuts its kernel down) and is killed if it does not. The executed
notebook is kept whether the run passed or failed, and rendered to HTML either way.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from taxi_duration.reports import ReportPaths, render_reports

# Values a `parameters` cell can take and papermill can write back as Python literals.
PLAIN_TYPES = (str, int, float, bool, type(None))
STOP_GRACE_SECONDS = 20


class NotebookParameterError(ValueError):
    """Parameters a notebook does not declare, or values that are not plain literals."""


class NotebookExecutionError(RuntimeError):
    """A notebook failed; the message names the notebook, the cell and the cause."""

    def __init__(self, message: str, result: "NotebookResult"):
        super().__init__(message)
        self.result = result


@dataclass(frozen=True)
class NotebookResult:
    notebook: str
    executed_notebook: Path
    reports: ReportPaths | None  # full and review HTML; None if papermill wrote nothing
    succeeded: bool
    error: str | None
    seconds: float


def declared_parameters(notebook: Path) -> dict[str, Any]:
    """Names declared in the notebook's cell tagged `parameters` (via papermill)."""
    import papermill

    return papermill.inspect_notebook(str(notebook))


def check_parameters(notebook: Path, parameters: dict[str, Any]) -> None:
    """Reject names the `parameters` cell does not declare and values that are not plain."""
    declared = declared_parameters(notebook)
    if not declared:
        raise NotebookParameterError(f"{notebook.name} has no cell tagged 'parameters'")
    unknown = sorted(set(parameters) - set(declared))
    if unknown:
        raise NotebookParameterError(
            f"{notebook.name} does not declare parameter(s) {', '.join(unknown)}; "
            f"it declares: {', '.join(sorted(declared))}"
        )
    for name, value in parameters.items():
        if not isinstance(value, PLAIN_TYPES):
            raise NotebookParameterError(
                f"parameter {name}={value!r} for {notebook.name} is a {type(value).__name__}; "
                "pass a plain string, number, boolean or None"
            )


def execute_notebook(
    notebook: Path,
    executed_notebook: Path,
    parameters: dict[str, Any],
    timeout_seconds: float,
    cwd: Path | None = None,
) -> NotebookResult:
    """Run `notebook` with `parameters` in a child process; always keep and render the output.

    Raises NotebookExecutionError (with the result attached) when the notebook fails or
    times out; the executed notebook and its HTML are on disk either way.
    """
    notebook = Path(notebook).resolve()
    executed_notebook = Path(executed_notebook).resolve()
    check_parameters(notebook, parameters)
    executed_notebook.parent.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "taxi_duration.notebooks",
        str(notebook), str(executed_notebook),
        "--parameters", json.dumps(parameters),
        "--cwd", str(cwd or notebook.parent),
    ]
    started = time.monotonic()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, stderr = child.communicate(timeout=timeout_seconds)
        error = _last_error_line(stderr) if child.returncode else None
        if child.returncode and not error:
            error = f"the notebook process exited with status {child.returncode}"
    except subprocess.TimeoutExpired:
        _stop(child)
        error = f"did not finish within {timeout_seconds:g} s (TAXI_NOTEBOOK_TIMEOUT) and was stopped"
    seconds = time.monotonic() - started
    reports = render_reports(executed_notebook, failure=error) if executed_notebook.is_file() else None
    result = NotebookResult(notebook.stem, executed_notebook, reports, error is None, error, seconds)
    if error is not None:
        raise NotebookExecutionError(f"notebook {notebook.name} failed: {error} (executed copy: {executed_notebook})", result)
    return result


def _last_error_line(stderr: str) -> str | None:
    """The child's one-line summary, printed last with a known prefix."""
    for line in reversed(stderr.splitlines()):
        if line.startswith(_ERROR_PREFIX):
            return line.removeprefix(_ERROR_PREFIX).strip()
    tail = [line for line in stderr.splitlines() if line.strip()]
    return tail[-1] if tail else None


def _stop(child: subprocess.Popen) -> None:
    """Ask the child to stop (it shuts its kernel down), then kill its process group."""
    try:
        os.killpg(child.pid, signal.SIGTERM)
        child.communicate(timeout=STOP_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.communicate()
    except ProcessLookupError:
        pass


_ERROR_PREFIX = "NOTEBOOK-ERROR:"


def _describe_papermill_error(error: Exception) -> str:
    cell = getattr(error, "exec_count", None) or getattr(error, "cell_index", None)
    ename = getattr(error, "ename", type(error).__name__)
    evalue = getattr(error, "evalue", str(error))
    where = f"cell {cell}" if cell is not None else "a cell"
    return f"{where} raised {ename}: {evalue}"


def _child_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Execute one notebook with papermill (used by the pipeline).")
    parser.add_argument("notebook")
    parser.add_argument("executed_notebook")
    parser.add_argument("--parameters", default="{}", help="JSON object of parameter values")
    parser.add_argument("--cwd")
    args = parser.parse_args(argv)

    # SIGTERM (a timeout, or the flow being stopped) becomes SystemExit so papermill's
    # clean-up runs and shuts the kernel down instead of leaving it orphaned.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

    import papermill
    from papermill.exceptions import PapermillExecutionError

    try:
        papermill.execute_notebook(
            args.notebook,
            args.executed_notebook,
            parameters=json.loads(args.parameters),
            cwd=args.cwd,
            kernel_name="python3",
            progress_bar=False,
            log_output=False,
            request_save_on_cell_execute=True,
        )
    except PapermillExecutionError as error:
        print(f"{_ERROR_PREFIX} {_describe_papermill_error(error)}", file=sys.stderr)
        return 1
    except Exception as error:  # kernel death and the like: still report one line
        print(f"{_ERROR_PREFIX} {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_child_main())
