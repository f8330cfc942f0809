"""The caller's side of a notebook run: start the child, wait, stop, reap, report."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from taxi_duration.review.reports import ReportPaths, render_reports
from taxi_duration.runner.cells import cell_label, check_every_cell_ran, read_notebook
from taxi_duration.runner.messages import describe_failure
from taxi_duration.runner.parameters import check_parameters
from taxi_duration.runner.processes import (
    RunnersStopping,
    forget_runner_process,
    reap_kernel,
    start_runner_process,
    stop_child,
    stopping,
)
from taxi_duration.runner.records import (
    CURRENT_CELL,
    GO,
    KERNEL_RECORD,
    PROGRESS,
    RUNNER_LOG,
    Attempt,
    read_json,
    read_outcome,
    write_json,
)

log = logging.getLogger("taxi_duration.runner")


class NotebookStopped(RuntimeError):
    """The caller asked a running notebook to stop (the pipeline is being interrupted)."""


class NotebookExecutionError(RuntimeError):
    """A notebook failed; the message names the notebook, the cell and the cause."""

    def __init__(self, message: str, result: NotebookResult):
        super().__init__(message)
        self.result = result


@dataclass(frozen=True)
class Progress:
    """How far a running notebook is: the cells the kernel will run, those done, the one running."""

    total: int | None
    finished: tuple[dict[str, Any], ...]  # each: index, position (1-based), first_line, started, seconds
    running: dict[str, Any] | None  # index, position, first_line, started (epoch seconds)

    @classmethod
    def read(cls, records: Path) -> Progress | None:
        record = read_json(records / PROGRESS)
        if not record:
            return None
        return cls(record.get("total"), tuple(record.get("finished") or ()), record.get("running"))


ProgressCallback = Callable[[Progress], None]
PROGRESS_POLL_SECONDS = 1.0  # how often a caller watching progress is told of a change, at most


@dataclass(frozen=True)
class NotebookResult:
    notebook: str
    executed_notebook: Path
    reports: ReportPaths | None  # full and review HTML; None if papermill wrote nothing
    succeeded: bool
    error: str | None
    seconds: float
    attempts: int = 1  # more than 1 when the kernel died and the notebook was run again


def execute_notebook(
    notebook: Path,
    executed_notebook: Path,
    parameters: dict[str, Any],
    timeout_seconds: float,
    cwd: Path | None = None,
    retries_on_kernel_death: int = 1,
    stop: threading.Event | None = None,
    prepared: PreparedRunner | None = None,
    on_progress: ProgressCallback | None = None,
) -> NotebookResult:
    """Run `notebook` with `parameters` in a child process; always keep and render the output.

    `timeout_seconds` bounds the whole call, retries included. When the kernel dies, the
    notebook is run again from the start up to `retries_on_kernel_death` times (an
    out-of-memory kill can be a neighbour's fault; a second death is taken as the notebook's).
    Raises NotebookExecutionError (with the result attached) when the notebook fails, stops
    early or times out; the executed notebook and its HTML are on disk either way. Setting
    `stop` (from another thread) stops the notebook and its kernel and raises NotebookStopped;
    the executed copy, as far as it got, is left for the caller to report.

    `prepared`, a PreparedRunner started earlier for this notebook (and working directory),
    runs the first attempt; its kernel is already up with the notebook's imports done. The
    call takes it over: it is closed whatever happens. A retry starts a runner of its own.

    `on_progress` is called (in this thread) with the cells done and the one running, when
    that changes, at most once every PROGRESS_POLL_SECONDS, and once when the notebook ends.
    """
    notebook = Path(notebook).resolve()
    try:
        if retries_on_kernel_death < 0:
            raise ValueError(f"retries_on_kernel_death must be 0 or more, got {retries_on_kernel_death}")
        if prepared is not None and (prepared.notebook, prepared.cwd) != (
            notebook,
            Path(cwd or notebook.parent).resolve(),
        ):
            raise ValueError(f"the prepared runner is for {prepared.notebook} in {prepared.cwd}, not {notebook}")
        check_parameters(notebook, parameters)
    except BaseException:
        if prepared is not None:
            prepared.close()
        raise
    executed_notebook = Path(executed_notebook).resolve()
    executed_notebook.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    deadline = started + timeout_seconds
    deaths: list[Attempt] = []
    while True:
        runner = prepared or PreparedRunner(notebook, cwd)
        prepared = None
        attempt = _run_attempt(runner, executed_notebook, parameters, deadline, stop, on_progress)
        if attempt.kind != "kernel_died" or len(deaths) == retries_on_kernel_death or time.monotonic() >= deadline:
            break
        deaths.append(attempt)
        log.warning(
            "the kernel running %s died at %s; running the notebook again from the start (attempt %d of %d)",
            notebook.name,
            cell_label(read_notebook(executed_notebook), attempt),
            len(deaths) + 1,
            retries_on_kernel_death + 1,
        )
    if attempt.kind == "completed":
        stopped = check_every_cell_ran(executed_notebook)
        if stopped is not None:
            stopped.reaped, attempt = attempt.reaped, stopped
    error = describe_failure(attempt, deaths, executed_notebook, timeout_seconds, retries_on_kernel_death)
    reports = _note_and_render(executed_notebook, error, len(deaths) + 1)
    seconds = time.monotonic() - started
    result = NotebookResult(notebook.stem, executed_notebook, reports, error is None, error, seconds, len(deaths) + 1)
    if error is not None:
        where = f"executed copy: {executed_notebook}" + (f"; report: {reports.full}" if reports else "")
        raise NotebookExecutionError(f"notebook {notebook.name} failed: {error} ({where})", result)
    return result


def _note_and_render(executed_notebook: Path, error: str | None, attempts: int) -> ReportPaths | None:
    """Record the outcome in the executed notebook's metadata (`taxi`) and render both reports.

    The metadata is for whoever opens the .ipynb later: a timeout or a dead kernel leaves no
    error output in it. Returns None when papermill wrote nothing readable (it can die before
    or while saving), so a broken file costs the reports, not the account of the failure.
    """
    import nbformat

    from taxi_duration.runfiles import atomic_path

    notebook = read_notebook(executed_notebook)
    if notebook is None:
        if executed_notebook.exists():
            log.warning("the executed notebook %s is not readable; no reports rendered", executed_notebook)
        return None
    notebook.metadata["taxi"] = {"succeeded": error is None, "failure": error, "attempts": attempts}
    with atomic_path(executed_notebook) as temporary:
        nbformat.write(notebook, temporary)
    return render_reports(executed_notebook, failure=error)


class PreparedRunner:
    """A notebook runner, possibly started ahead of its notebook's turn.

    The child process starts the kernel and has it import, silently, the modules the
    notebook's code cells import plus `preload` (with the collector paused: see
    taxi_duration.runner.fast_start), then waits for the executed notebook's path and the parameters
    (execute_notebook sends them). Started ahead, the kernel's start and imports overlap
    whatever runs before. The imports bind no name in the kernel, and
    the executed notebook shows only the notebook's own cells, numbered from 1. Close a
    runner that is not used: its child and kernel are stopped.
    """

    def __init__(self, notebook: Path, cwd: Path | None = None, preload: tuple[str, ...] = ()) -> None:
        self.notebook = Path(notebook).resolve()
        self.cwd = Path(cwd or self.notebook.parent).resolve()
        self._folder = tempfile.TemporaryDirectory(prefix="taxi-notebook-")
        self.records = Path(self._folder.name)
        command = [
            sys.executable,
            "-m",
            "taxi_duration.runner.child",
            str(self.notebook),
            "--cwd",
            str(self.cwd),
            "--records",
            str(self.records),
            "--parent-pid",
            str(os.getpid()),
            *(["--preload", ",".join(preload)] if preload else []),
        ]
        try:
            # Registered, so that a stop of this process reaches it whatever waits on it.
            self.child = start_runner_process(command, self.records / RUNNER_LOG, self.records / KERNEL_RECORD)
        except RunnersStopping as refused:
            self._folder.cleanup()
            raise NotebookStopped(str(refused)) from None
        self.reaped: list[int] = []

    def go(self, executed_notebook: Path, parameters: dict[str, Any]) -> None:
        """Tell the child what to write and with which parameters: it runs the notebook now."""
        # In a file rather than on the command line, which caps one argument at 128 KiB.
        write_json(self.records / GO, {"executed_notebook": str(executed_notebook), "parameters": parameters})

    def close(self) -> None:
        """Stop the child if it still runs, kill what is left of its kernel, remove the records."""
        try:
            if self.child.returncode is None and self.child.poll() is None:
                stop_child(self.child)
            self.reaped = reap_kernel(self.records / KERNEL_RECORD)
        finally:
            forget_runner_process(self.child)
            self._folder.cleanup()


def _run_attempt(
    runner: PreparedRunner,
    executed_notebook: Path,
    parameters: dict[str, Any],
    deadline: float,
    stop: threading.Event | None = None,
    on_progress: ProgressCallback | None = None,
) -> Attempt:
    """Run the notebook on `runner` once, stop it at `deadline` (or on `stop`), reap, say how it ended."""
    watch = _progress_watcher(runner.records, on_progress) if on_progress is not None else None
    try:
        runner.go(executed_notebook, parameters)
        if _wait_unless_stopped(runner.child, deadline, stop, watch):
            if stopping():  # the process's stop killed the child: not the notebook's failure
                raise NotebookStopped(f"{runner.notebook.name} was stopped with its caller (SIGTERM or Ctrl-C)")
            attempt = read_outcome(runner.records, runner.child.returncode)
        else:
            stop_child(runner.child)
            attempt = Attempt("timeout")
        attempt.cell_index = read_json(runner.records / CURRENT_CELL).get("index")
        if watch is not None:
            watch()  # the last cells' progress, before the records go
    finally:
        runner.close()  # also when interrupted (KeyboardInterrupt, `stop`): leave nothing behind
    attempt.reaped = runner.reaped
    return attempt


def _progress_watcher(records: Path, on_progress: ProgressCallback) -> Callable[[], None]:
    """A function that tells `on_progress` of the child's progress when it has changed."""
    seen: list[Progress | None] = [None]

    def watch() -> None:
        progress = Progress.read(records)
        if progress is not None and progress != seen[0]:
            seen[0] = progress
            try:
                on_progress(progress)
            except Exception as problem:  # noqa: BLE001 - showing progress must not fail the notebook
                log.warning("could not report the notebook's progress: %r", problem)

    return watch


def _wait_unless_stopped(
    child: subprocess.Popen,
    deadline: float,
    stop: threading.Event | None,
    watch: Callable[[], None] | None = None,
) -> bool:
    """Wait for the child: True when it exited, False at the deadline; NotebookStopped on `stop`."""
    # With a `stop` to watch, wake up four times a second to look at it; with progress to
    # report, once a second.
    interval = 0.25 if stop is not None else PROGRESS_POLL_SECONDS if watch is not None else None
    watched = time.monotonic()
    while True:
        remaining = deadline - time.monotonic()
        try:
            child.wait(timeout=max(min(remaining, interval), 0) if interval is not None else max(remaining, 0))
            return True
        except subprocess.TimeoutExpired:
            if time.monotonic() >= deadline:
                return False
            if stop is not None and stop.is_set():
                raise NotebookStopped("stopped by the caller while running") from None
            if watch is not None and time.monotonic() - watched >= PROGRESS_POLL_SECONDS:
                watched = time.monotonic()
                watch()
