"""The wording of failures: one paragraph that names the cell, the cause and what to do."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from taxi_duration.runner.cells import cell_first_line, cell_label, first_unrun, read_notebook
from taxi_duration.runner.records import Attempt


def describe_failure(
    attempt: Attempt, deaths: list[Attempt], executed_notebook: Path, timeout_seconds: float, retries: int
) -> str | None:
    """The one-paragraph account of a failure (None for success): cell, cause, what to do."""
    notebook = read_notebook(executed_notebook)
    if attempt.kind == "cell_error" and attempt.ename == "CellExecutionError" and not attempt.evalue:
        attempt = _error_from_stderr(notebook, attempt)
    if attempt.kind == "completed":
        error = None
    elif attempt.kind == "cell_error" and attempt.ename == "SystemExit":
        error = _describe_early_stop(notebook, attempt)
    elif attempt.kind == "cell_error" and attempt.ename == "CalledProcessError":
        error = (
            _sentence(
                f"stopped early at {cell_label(notebook, attempt)}: a shell command (! or %%bash) exited non-zero "
                f"(CalledProcessError: {attempt.evalue}), so the later cells did not run"
            )
            + " Fix the command, or append '|| true' to one whose failure is expected."
        )
    elif attempt.kind == "cell_error":
        raised = f"{attempt.ename}: {attempt.evalue}" if attempt.evalue else f"{attempt.ename} (with no message)"
        error = _sentence(f"{cell_label(notebook, attempt)} raised {raised}") + (
            " The traceback is in the executed copy and its report; fix the cell or its inputs and run the "
            "notebook again."
        )
    elif attempt.kind == "stopped_early":
        error = _describe_early_stop(notebook, attempt)
    elif attempt.kind == "kernel_died":
        error = _describe_kernel_death(notebook, attempt, deaths, retries)
    elif attempt.kind == "timeout":
        error = (
            f"did not finish within {timeout_seconds:g} s (TAXI_NOTEBOOK_TIMEOUT) and was stopped while running "
            f"{cell_label(notebook, attempt)}; its kernel was shut down. If the notebook is only slow, raise "
            "TAXI_NOTEBOOK_TIMEOUT; otherwise look at what that cell waits for."
        )
    else:
        error = _sentence(str(attempt.detail)) + (
            " Run the notebook by hand (papermill or Jupyter) to see the whole error."
        )
    first_line = cell_first_line(notebook, attempt) if error is not None else None
    if error is not None and first_line:
        shown = first_line if len(first_line) <= 100 else first_line[:99] + "…"
        error += f" ({cell_label(notebook, attempt).capitalize()} begins: {shown})"
    if error is not None and deaths and attempt.kind != "kernel_died":
        error += (
            f" (This was attempt {len(deaths) + 1}: the kernel died on the attempt(s) before and the "
            "notebook was run again from the start.)"
        )
    if error is not None and attempt.reaped:
        error += (
            f" {len(attempt.reaped)} process(es) the notebook left running were killed "
            f"(pids {', '.join(map(str, attempt.reaped))})."
        )
    return error


def _error_from_stderr(notebook: Any, attempt: Attempt) -> Attempt:
    """The error IPython itself raised while running the cell (a magic it does not know, say):
    it prints `Name: message` to stderr and leaves no error output, so nbclient names no exception."""
    import dataclasses
    import re

    if notebook is None or attempt.cell is None:
        return attempt
    for cell in notebook.cells:
        if cell.get("cell_type") != "code" or cell.get("execution_count") != attempt.cell:
            continue
        for output in reversed(cell.get("outputs", [])):
            if output.get("output_type") == "stream" and output.get("name") == "stderr":
                lines = [line for line in "".join(output.get("text", "")).splitlines() if line.strip()]
                found = re.match(r"^(\w*(?:Error|Exception)):\s*(.*)$", lines[-1].strip()) if lines else None
                if found:
                    return dataclasses.replace(attempt, ename=found[1], evalue=found[2])
    return attempt


def _sentence(text: str) -> str:
    """`text` ending in a full stop, once (exception messages often bring their own)."""
    text = text.rstrip()
    return text if text.endswith((".", "!", "?")) else text + "."


def _describe_early_stop(notebook: Any, attempt: Attempt) -> str:
    """'stopped early at cell N': sys.exit, or cells papermill left unexecuted for another reason."""
    unrun = first_unrun(notebook) if notebook is not None else None
    left = unrun[1] if unrun else 0
    if attempt.ename == "SystemExit":
        code = attempt.evalue or "0"
        forgiven = (
            (
                " papermill counts sys.exit(0) as success; the pipeline does not, because a stage's results "
                "come from its last cells."
            )
            if code in ("0", "None")
            else ""
        )
        return (
            f"stopped early at {cell_label(notebook, attempt)}: the cell called sys.exit({code}) "
            f"(SystemExit: {code}), so the rest "
            f"of it and {left} later code cell(s) did not run.{forgiven} Remove the sys.exit call, or raise an "
            "exception to fail on purpose."
        )
    previous = unrun[0] if unrun else None
    where = f"cell {previous}" if previous is not None else "its first code cell"
    return (
        f"stopped early at {where}: papermill reported success but {left} later code cell(s) never ran. "
        "Open the executed copy to see where execution ended, and run the notebook again."
    )


def _describe_kernel_death(notebook: Any, attempt: Attempt, deaths: list[Attempt], retries: int) -> str:
    """'the kernel died', how many times, why that usually happens and what to check."""
    attempts = len(deaths) + 1
    if attempts > 1:
        times = (
            f" on every attempt ({attempts} of {attempts}; the notebook was run again from the start after each death)"
        )
    elif retries:
        times = ", with no time left within the limit to run the notebook again"
    else:
        times = " (not run again: retries_on_kernel_death=0)"
    return (
        f"the kernel died while running {cell_label(notebook, attempt)}{times}. A kernel dies when the "
        "operating system kills it, most often the out-of-memory killer, or when the code ends the interpreter "
        "(os._exit, a crash in native code). Check the machine's memory (dmesg, container limits) and how "
        "much data that cell loads."
    )
