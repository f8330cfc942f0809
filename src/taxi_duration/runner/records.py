"""The files a notebook runner's parent and child share, in the per-runner records folder.

The parent writes the go (executed notebook's path and parameters); the child writes its
kernel's pid, the running cell, the progress through the cells and how it ended. Every file is written whole or not at all.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

KERNEL_RECORD = "kernel.json"
OUTCOME = "outcome.json"
CURRENT_CELL = "cell.json"
PROGRESS = "progress.json"  # cells done out of total, the running one: what the caller shows while it runs
GO = "go.json"
RUNNER_LOG = "runner.log"


@dataclass
class Attempt:
    """How one run of the child ended, as the parent sees it."""

    kind: str  # completed, cell_error, stopped_early, kernel_died, timeout, runner_error
    cell: int | None = None  # execution count of the failing cell, when the kernel gave one
    cell_index: int | None = None  # index in the executed notebook of the cell that was running
    ename: str | None = None
    evalue: str | None = None
    detail: str | None = None
    reaped: list[int] = field(default_factory=list)


def read_json(path: Path) -> dict[str, Any]:
    """A record the child wrote, or {} if it wrote none."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return {}


def write_json(path: Path, value: dict[str, Any]) -> None:
    """Write `value` whole or not at all: the parent may read the file at any moment."""
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(value), encoding="utf-8")
    temporary.replace(path)


def read_outcome(records: Path, returncode: int) -> Attempt:
    """The child's own account of how it ended, or the tail of its log if it wrote none."""
    outcome = read_json(records / OUTCOME)
    if not outcome:
        tail = [line for line in (records / RUNNER_LOG).read_text(errors="replace").splitlines() if line.strip()]
        detail = tail[-1].strip() if tail else "no output"
        return Attempt("runner_error", detail=f"the notebook process exited with status {returncode}: {detail}")
    return Attempt(
        outcome["kind"],
        cell=outcome.get("cell"),
        ename=outcome.get("ename"),
        evalue=outcome.get("evalue"),
        detail=outcome.get("detail"),
    )
