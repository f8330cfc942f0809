"""Reading an executed notebook: which cells ran, and how to name the one a run ended in."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from taxi_duration.runner.records import Attempt

# nbclient's cell tags: cells it does not run, and cells whose errors it lets pass.
SKIP_TAG = "skip-execution"
ALLOW_ERRORS_TAG = "raises-exception"


def read_notebook(path: Path) -> Any:
    """The executed notebook as papermill last saved it, or None if there is none (yet)."""
    import nbformat

    try:
        return nbformat.read(path, as_version=4)
    except (OSError, ValueError):
        return None


def code_cells(notebook: Any) -> list[Any]:
    """The cells a kernel runs: nbclient skips markdown, empty and `skip-execution` cells."""
    return [
        cell
        for cell in notebook.cells
        if cell.cell_type == "code" and cell.source.strip() and SKIP_TAG not in cell.metadata.get("tags", [])
    ]


def first_unrun(notebook: Any) -> tuple[int | None, int] | None:
    """(execution count of the last cell that ran, number of code cells left), or None if all ran."""
    cells = code_cells(notebook)
    for position, cell in enumerate(cells):
        if cell.get("execution_count") is None:
            previous = cells[position - 1].get("execution_count") if position else None
            return previous, len(cells) - position
    return None


def cell_label(notebook: Any, attempt: Attempt | None = None) -> str:
    """'cell N', N as the executed copy numbers the cell the attempt ended in.

    A cell the kernel died or was stopped in may have no number yet (the kernel assigns it
    when the cell starts, and the message may not have arrived); it gets the number it
    would have had, one more than the code cell before it.
    """
    if attempt is not None and attempt.cell is not None:
        return f"cell {attempt.cell}"
    if notebook is None:
        return "an unknown cell"
    cells = code_cells(notebook)
    index = attempt.cell_index if attempt is not None else None
    running = notebook.cells[index] if index is not None and index < len(notebook.cells) else None
    if running is None:  # no record of the running cell: take the first one that did not run
        running = next((cell for cell in cells if cell.get("execution_count") is None), None)
        if running is None:
            return "the end of the notebook"
    if running.get("execution_count") is not None:
        return f"cell {running.execution_count}"
    previous = [cell.get("execution_count") for cell in cells[: cells.index(running)] if cell.get("execution_count")]
    return f"cell {(previous[-1] if previous else 0) + 1}"


def cell_first_line(notebook: Any, attempt: Attempt) -> str | None:
    """The first non-empty line of the cell the attempt ended in, when the notebook says which."""
    if notebook is None:
        return None
    cell = None
    if attempt.cell is not None:
        cell = next((c for c in code_cells(notebook) if c.get("execution_count") == attempt.cell), None)
    elif attempt.cell_index is not None and attempt.cell_index < len(notebook.cells):
        cell = notebook.cells[attempt.cell_index]
    if cell is None:
        return None
    return next((line.strip() for line in cell.source.splitlines() if line.strip()), None)


def check_every_cell_ran(executed_notebook: Path) -> Attempt | None:
    """After papermill reported success: an early stop it forgave, as a failure; else None."""
    notebook = read_notebook(executed_notebook)
    if notebook is None:
        return Attempt("runner_error", detail="papermill reported success but wrote no executed notebook")
    for cell in code_cells(notebook):
        if ALLOW_ERRORS_TAG in cell.metadata.get("tags", []):
            continue  # nbclient carries on after an error here, SystemExit included
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error" and output.get("ename") == "SystemExit":
                return Attempt(
                    "cell_error", cell=cell.get("execution_count"), ename="SystemExit", evalue=output.get("evalue", "")
                )
    unrun = first_unrun(notebook)
    if unrun is not None:
        return Attempt("stopped_early")
    return None
