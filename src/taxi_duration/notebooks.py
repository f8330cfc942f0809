"""The notebook runner: execute one parameterized notebook with papermill, render it, report.

Each notebook runs in a child process (`python -m taxi_duration.notebooks ...`): papermill
changes the process-wide working directory and Jupyter clients dislike worker threads, so a
Prefect task must not run it in-process. The child starts the kernel and has it import what
the notebook imports before the parameters arrive; a caller can start it ahead of time
(PreparedRunner) so that this overlaps other work. The executed notebook is kept whether the
run passed or failed, and rendered to HTML (full and review) either way.

What counts as a failure, and how it is found (papermill 2.7, nbclient 0.11, IPython 9,
ipykernel 7 behave as described here; the tests in tests/faults pin it down):

* A cell raises: papermill raises PapermillExecutionError; reported as "cell N raised ...",
  N being the execution count shown in the executed copy.
* A cell calls `sys.exit(0)` (or `sys.exit()`, `raise SystemExit`): papermill treats this as
  a deliberate, *successful* early stop, leaving the later cells unexecuted. The pipeline
  needs every cell's outputs, so after a run papermill calls successful every non-empty code
  cell must have run; if not, it is reported as "stopped early at cell N". `sys.exit(3)` is
  already a papermill failure and is reported the same way.
* `exit()` / `quit()` in a kernel only ask the frontend to close it; papermill ignores the
  request and the notebook runs on, so there is nothing to report.
* A shell command exits non-zero: `%%bash` / `%%sh` / `%%script` raise CalledProcessError in
  IPython 9, but `!cmd` only sets `_exit_code`, and `x = !cmd` / `%sx` not even that. The
  kernel is started with `InteractiveShell.system_raise_on_error=True`, so they raise too.
  Write `!cmd || true` where a failure is expected. Not detectable: `os.system` or
  `subprocess.run` without `check=True`, `!false | cat` (a pipeline's status is its last
  command's), and anything a cell merely prints or logs without raising.
* The kernel dies (the out-of-memory killer's SIGKILL, `os._exit`, a crash in native code):
  nbclient raises DeadKernelError. The notebook is run again from the start, at most
  `retries_on_kernel_death` times, within the same wall-clock limit.
* The wall-clock limit expires: the child gets SIGTERM (nbclient then shuts its kernel down)
  and SIGKILL if it is still there after STOP_GRACE_SECONDS. The child records its kernel's
  pid; once the child is gone, whatever is left of the kernel's process group is killed
  (jupyter_client starts the kernel in a session of its own, and what the kernel starts
  stays in its group unless it makes its own session). So neither the kernel nor what it
  started outlives the run, whatever the outcome, even if the child had to be SIGKILLed.
* The caller dies (the flow process SIGKILLed): the child notices that its parent is gone
  and stops as on a timeout, so the kernel does not run on unobserved.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from taxi_duration.reports import ReportPaths, render_reports

log = logging.getLogger(__name__)

# Values a `parameters` cell can take and papermill can write back as Python literals.
PLAIN_TYPES = (str, int, float, bool, type(None))
STOP_GRACE_SECONDS = 20
REAP_WAIT_SECONDS = 5
# Make `!cmd`, `x = !cmd` and %sx fail the cell on a non-zero exit, as %%bash already does.
KERNEL_ARGUMENTS = ["--InteractiveShell.system_raise_on_error=True"]

# nbclient's cell tags: cells it does not run, and cells whose errors it lets pass.
SKIP_TAG = "skip-execution"
ALLOW_ERRORS_TAG = "raises-exception"

# Files the child writes into the per-attempt folder the parent gives it.
_KERNEL_RECORD = "kernel.json"
_OUTCOME = "outcome.json"
_CURRENT_CELL = "cell.json"
_GO = "go.json"
_RUNNER_LOG = "runner.log"


class NotebookParameterError(ValueError):
    """Parameters a notebook does not declare, or values that are not plain literals."""


class NotebookStopped(RuntimeError):
    """The caller asked a running notebook to stop (the pipeline is being interrupted)."""


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
    attempts: int = 1  # more than 1 when the kernel died and the notebook was run again


@dataclass
class _Attempt:
    """How one run of the child ended, as the parent sees it."""

    kind: str  # completed, cell_error, stopped_early, kernel_died, timeout, runner_error
    cell: int | None = None  # execution count of the failing cell, when the kernel gave one
    cell_index: int | None = None  # index in the executed notebook of the cell that was running
    ename: str | None = None
    evalue: str | None = None
    detail: str | None = None
    reaped: list[int] = field(default_factory=list)


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
        if isinstance(value, str) and not _utf8_encodable(value):
            # papermill copies parameters into the executed notebook's metadata verbatim, and
            # a notebook is UTF-8 JSON: writing it would fail and leave an empty file.
            raise NotebookParameterError(
                f"parameter {name}={value!r} for {notebook.name} contains a lone surrogate (U+D800 to U+DFFF), "
                "which a notebook (UTF-8 JSON) cannot hold; pass valid Unicode text, e.g. bytes decoded with "
                "errors='replace'"
            )


def _utf8_encodable(text: str) -> bool:
    """False for text holding lone surrogates (from errors='surrogateescape' decoding, say)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def execute_notebook(
    notebook: Path,
    executed_notebook: Path,
    parameters: dict[str, Any],
    timeout_seconds: float,
    cwd: Path | None = None,
    retries_on_kernel_death: int = 1,
    stop: threading.Event | None = None,
    prepared: PreparedRunner | None = None,
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
    """
    notebook = Path(notebook).resolve()
    try:
        if retries_on_kernel_death < 0:
            raise ValueError(f"retries_on_kernel_death must be 0 or more, got {retries_on_kernel_death}")
        if prepared is not None and (prepared.notebook, prepared.cwd) != (notebook, Path(cwd or notebook.parent).resolve()):
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
    deaths: list[_Attempt] = []
    while True:
        runner = prepared or PreparedRunner(notebook, cwd)
        prepared = None
        attempt = _run_attempt(runner, executed_notebook, parameters, deadline, stop)
        if attempt.kind != "kernel_died" or len(deaths) == retries_on_kernel_death or time.monotonic() >= deadline:
            break
        deaths.append(attempt)
        log.warning(
            "the kernel running %s died at %s; running the notebook again from the start (attempt %d of %d)",
            notebook.name, _cell_label(_read_notebook(executed_notebook), attempt), len(deaths) + 1,
            retries_on_kernel_death + 1,
        )
    if attempt.kind == "completed":
        stopped = _check_every_cell_ran(executed_notebook)
        if stopped is not None:
            stopped.reaped, attempt = attempt.reaped, stopped
    error = _describe(attempt, deaths, executed_notebook, timeout_seconds, retries_on_kernel_death)
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

    notebook = _read_notebook(executed_notebook)
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
    taxi_duration.startup), then waits for the executed notebook's path and the parameters
    (execute_notebook sends them). Started ahead, the kernel's start and imports (1-2.5 s a
    notebook here) overlap whatever runs before. The imports bind no name in the kernel, and
    the executed notebook shows only the notebook's own cells, numbered from 1. Close a
    runner that is not used: its child and kernel are stopped.
    """

    def __init__(self, notebook: Path, cwd: Path | None = None, preload: tuple[str, ...] = ()) -> None:
        self.notebook = Path(notebook).resolve()
        self.cwd = Path(cwd or self.notebook.parent).resolve()
        self._folder = tempfile.TemporaryDirectory(prefix="taxi-notebook-")
        self.records = Path(self._folder.name)
        command = [
            sys.executable, "-m", "taxi_duration.notebooks", str(self.notebook),
            "--cwd", str(self.cwd), "--records", str(self.records), "--parent-pid", str(os.getpid()),
            *(["--preload", ",".join(preload)] if preload else []),
        ]
        # The child's output goes to a file, not a pipe: a kernel (or a process it started)
        # inherits the child's stdout/stderr, and reading a pipe until EOF would then wait
        # for those processes as well as for the child.
        with open(self.records / _RUNNER_LOG, "wb") as runner_log:
            self.child = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=runner_log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.reaped: list[int] = []

    def go(self, executed_notebook: Path, parameters: dict[str, Any]) -> None:
        """Tell the child what to write and with which parameters: it runs the notebook now."""
        # In a file rather than on the command line, which caps one argument at 128 KiB.
        _write_json(self.records / _GO, {"executed_notebook": str(executed_notebook), "parameters": parameters})

    def close(self) -> None:
        """Stop the child if it still runs, kill what is left of its kernel, remove the records."""
        try:
            if self.child.returncode is None and self.child.poll() is None:
                _stop(self.child)
            self.reaped = _reap_kernel(self.records / _KERNEL_RECORD)
        finally:
            self._folder.cleanup()


def _run_attempt(
    runner: PreparedRunner, executed_notebook: Path, parameters: dict[str, Any], deadline: float,
    stop: threading.Event | None = None,
) -> _Attempt:
    """Run the notebook on `runner` once, stop it at `deadline` (or on `stop`), reap, say how it ended."""
    try:
        runner.go(executed_notebook, parameters)
        if _wait_unless_stopped(runner.child, deadline, stop):
            attempt = _read_outcome(runner.records, runner.child.returncode)
        else:
            _stop(runner.child)
            attempt = _Attempt("timeout")
        attempt.cell_index = _read_json(runner.records / _CURRENT_CELL).get("index")
    finally:
        runner.close()  # also when interrupted (KeyboardInterrupt, `stop`): leave nothing behind
    attempt.reaped = runner.reaped
    return attempt


def _wait_unless_stopped(child: subprocess.Popen, deadline: float, stop: threading.Event | None) -> bool:
    """Wait for the child: True when it exited, False at the deadline; NotebookStopped on `stop`."""
    with _exit_notice(child) as exited:
        while True:
            remaining = deadline - time.monotonic()
            try:
                exited(max(min(remaining, 0.25), 0) if stop is not None else max(remaining, 0))
                child.wait()
                return True
            except subprocess.TimeoutExpired:
                if time.monotonic() >= deadline:
                    return False
                if stop is not None and stop.is_set():
                    raise NotebookStopped("stopped by the caller while running") from None


@contextlib.contextmanager
def _exit_notice(child: subprocess.Popen) -> Iterator[Callable[[float], None]]:
    """A function that returns once `child` has exited, or raises TimeoutExpired after `timeout` s.

    Popen.wait(timeout) polls, at up to 50 ms intervals, so each notebook's end was noticed
    25 ms late on average. A pidfd (Linux 5.3+) becomes readable the moment the child exits.
    """
    try:
        # Only while the child is unreaped does its pid name it (and not a later process).
        pidfd = os.pidfd_open(child.pid) if child.poll() is None else None
    except (AttributeError, OSError):  # not Linux, or an old kernel
        pidfd = None
    if pidfd is None:  # Popen's polling
        yield lambda timeout: child.wait(timeout=timeout)
        return

    def exited(timeout: float) -> None:
        if not select.select([pidfd], [], [], timeout)[0]:
            raise subprocess.TimeoutExpired(child.args, timeout)

    try:
        yield exited
    finally:
        os.close(pidfd)


def _read_json(path: Path) -> dict[str, Any]:
    """A record the child wrote, or {} if it wrote none."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return {}


def _read_outcome(records: Path, returncode: int) -> _Attempt:
    """The child's own account of how it ended, or the tail of its log if it wrote none."""
    outcome = _read_json(records / _OUTCOME)
    if not outcome:
        tail = [line for line in (records / _RUNNER_LOG).read_text(errors="replace").splitlines() if line.strip()]
        detail = tail[-1].strip() if tail else "no output"
        return _Attempt("runner_error", detail=f"the notebook process exited with status {returncode}: {detail}")
    return _Attempt(
        outcome["kind"], cell=outcome.get("cell"), ename=outcome.get("ename"), evalue=outcome.get("evalue"),
        detail=outcome.get("detail"),
    )


def _stop(child: subprocess.Popen) -> None:
    """Ask the child to stop (nbclient then shuts its kernel down), then kill its process group."""
    try:
        os.killpg(child.pid, signal.SIGTERM)
        child.wait(timeout=STOP_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(child.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        child.wait()
    except ProcessLookupError:
        child.wait()


def _reap_kernel(record: Path) -> list[int]:
    """Kill what is left of the kernel's process group; the pids killed (normally none).

    jupyter_client starts the kernel as the leader of a new session, so its process group
    holds the kernel and the processes it started. Only members started no earlier than the
    kernel are killed, so a recycled pid cannot make us kill an unrelated process.
    """
    kernel = _read_json(record)
    if not kernel:
        return []  # the kernel never started
    import psutil  # an ipykernel dependency, so present wherever notebooks run

    survivors = []
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) == kernel["pid"] and process.create_time() >= kernel["create_time"]:
                if process.status() != psutil.STATUS_ZOMBIE:
                    survivors.append(process)
        except (OSError, psutil.Error):
            continue  # gone meanwhile, or not ours to look at
    for process in survivors:
        try:
            process.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(survivors, timeout=REAP_WAIT_SECONDS)
    if survivors:
        log.warning("killed %d process(es) left by notebook kernel %d: %s", len(survivors), kernel["pid"],
                    ", ".join(str(process.pid) for process in survivors))
    return [process.pid for process in survivors]


def _read_notebook(path: Path) -> Any:
    """The executed notebook as papermill last saved it, or None if there is none (yet)."""
    import nbformat

    try:
        return nbformat.read(path, as_version=4)
    except (OSError, ValueError):
        return None


def _code_cells(notebook: Any) -> list[Any]:
    """The cells a kernel runs: nbclient skips markdown, empty and `skip-execution` cells."""
    return [
        cell for cell in notebook.cells
        if cell.cell_type == "code" and cell.source.strip() and SKIP_TAG not in cell.metadata.get("tags", [])
    ]


def _first_unrun(notebook: Any) -> tuple[int | None, int] | None:
    """(execution count of the last cell that ran, number of code cells left), or None if all ran."""
    cells = _code_cells(notebook)
    for position, cell in enumerate(cells):
        if cell.get("execution_count") is None:
            previous = cells[position - 1].get("execution_count") if position else None
            return previous, len(cells) - position
    return None


def _cell_label(notebook: Any, attempt: _Attempt | None = None) -> str:
    """'cell N', N as the executed copy numbers the cell the attempt ended in.

    A cell the kernel died or was stopped in may have no number yet (the kernel assigns it
    when the cell starts, and the message may not have arrived); it gets the number it
    would have had, one more than the code cell before it.
    """
    if attempt is not None and attempt.cell is not None:
        return f"cell {attempt.cell}"
    if notebook is None:
        return "an unknown cell"
    cells = _code_cells(notebook)
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


def _check_every_cell_ran(executed_notebook: Path) -> _Attempt | None:
    """After papermill reported success: an early stop it forgave, as a failure; else None."""
    notebook = _read_notebook(executed_notebook)
    if notebook is None:
        return _Attempt("runner_error", detail="papermill reported success but wrote no executed notebook")
    for cell in _code_cells(notebook):
        if ALLOW_ERRORS_TAG in cell.metadata.get("tags", []):
            continue  # nbclient carries on after an error here, SystemExit included
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error" and output.get("ename") == "SystemExit":
                return _Attempt("cell_error", cell=cell.get("execution_count"), ename="SystemExit",
                                evalue=output.get("evalue", ""))
    unrun = _first_unrun(notebook)
    if unrun is not None:
        return _Attempt("stopped_early")
    return None


def _describe(
    attempt: _Attempt, deaths: list[_Attempt], executed_notebook: Path, timeout_seconds: float, retries: int
) -> str | None:
    """The one-paragraph account of a failure (None for success): cell, cause, what to do."""
    notebook = _read_notebook(executed_notebook)
    if attempt.kind == "completed":
        error = None
    elif attempt.kind == "cell_error" and attempt.ename == "SystemExit":
        error = _describe_early_stop(notebook, attempt)
    elif attempt.kind == "cell_error" and attempt.ename == "CalledProcessError":
        error = _sentence(
            f"stopped early at {_cell_label(notebook, attempt)}: a shell command (! or %%bash) exited non-zero "
            f"({attempt.evalue}), so the later cells did not run"
        ) + " Fix the command, or append '|| true' to one whose failure is expected."
    elif attempt.kind == "cell_error":
        error = _sentence(f"{_cell_label(notebook, attempt)} raised {attempt.ename}: {attempt.evalue}") + (
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
            f"{_cell_label(notebook, attempt)}; its kernel was shut down. If the notebook is only slow, raise "
            "TAXI_NOTEBOOK_TIMEOUT; otherwise look at what that cell waits for."
        )
    else:
        error = _sentence(str(attempt.detail)) + (
            " Run the notebook by hand (papermill or Jupyter) to see the whole error."
        )
    if error is not None and deaths and attempt.kind != "kernel_died":
        error += (f" (This was attempt {len(deaths) + 1}: the kernel died on the attempt(s) before and the "
                  "notebook was run again from the start.)")
    if error is not None and attempt.reaped:
        error += (f" {len(attempt.reaped)} process(es) the notebook left running were killed "
                  f"(pids {', '.join(map(str, attempt.reaped))}).")
    return error


def _sentence(text: str) -> str:
    """`text` ending in a full stop, once (exception messages often bring their own)."""
    text = text.rstrip()
    return text if text.endswith((".", "!", "?")) else text + "."


def _describe_early_stop(notebook: Any, attempt: _Attempt) -> str:
    """'stopped early at cell N': sys.exit, or cells papermill left unexecuted for another reason."""
    unrun = _first_unrun(notebook) if notebook is not None else None
    left = unrun[1] if unrun else 0
    if attempt.ename == "SystemExit":
        code = attempt.evalue or "0"
        forgiven = (" papermill counts sys.exit(0) as success; the pipeline does not, because a stage's results "
                    "come from its last cells.") if code in ("0", "None") else ""
        return (
            f"stopped early at {_cell_label(notebook, attempt)}: the cell called sys.exit({code}), so the rest "
            f"of it and {left} later code cell(s) did not run.{forgiven} Remove the sys.exit call, or raise an "
            "exception to fail on purpose."
        )
    previous = unrun[0] if unrun else None
    where = f"cell {previous}" if previous is not None else "its first code cell"
    return (
        f"stopped early at {where}: papermill reported success but {left} later code cell(s) never ran. "
        "Open the executed copy to see where execution ended, and run the notebook again."
    )


def _describe_kernel_death(notebook: Any, attempt: _Attempt, deaths: list[_Attempt], retries: int) -> str:
    """'the kernel died', how many times, why that usually happens and what to check."""
    attempts = len(deaths) + 1
    if attempts > 1:
        times = (f" on every attempt ({attempts} of {attempts}; the notebook was run again from the start "
                 "after each death)")
    elif retries:
        times = ", with no time left within the limit to run the notebook again"
    else:
        times = " (not run again: retries_on_kernel_death=0)"
    return (
        f"the kernel died while running {_cell_label(notebook, attempt)}{times}. A kernel dies when the "
        "operating system kills it, most often the out-of-memory killer, or when the code ends the interpreter "
        "(os._exit, a crash in native code). Check the machine's memory (dmesg, container limits) and how "
        "much data that cell loads."
    )


def _child_main(argv: list[str] | None = None) -> int:
    """Execute one notebook (the child side of PreparedRunner); write how it ended to --records.

    Starts the kernel and warms it up, waits for the parent's go (the executed notebook's
    path and the parameters, in --records), runs the notebook with papermill, shuts the
    kernel down.
    """
    parser = argparse.ArgumentParser(description="Execute one notebook with papermill (used by the pipeline).")
    parser.add_argument("notebook")
    parser.add_argument("--cwd")
    parser.add_argument("--records", required=True, help="folder for the go, the kernel's pid and the outcome")
    parser.add_argument("--parent-pid", type=int, help="stop, as on a timeout, when this process is gone")
    parser.add_argument("--preload", default="", help="comma-separated modules the kernel imports while it waits")
    args = parser.parse_args(argv)
    records = Path(args.records)

    # SIGTERM (a timeout, or the flow being stopped) becomes SystemExit so the clean-up below
    # and papermill's shut the kernel down instead of leaving it orphaned. While cells run,
    # nbclient's own SIGTERM handler does the same.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if args.parent_pid:
        threading.Thread(target=_stop_when_orphaned, args=(args.parent_pid, records), daemon=True).start()

    from taxi_duration.startup import imports_without_gc

    with imports_without_gc():
        from jupyter_client.asynchronous import AsyncKernelClient
        from jupyter_client.manager import AsyncKernelManager
        from jupyter_core.utils import run_sync
        from traitlets import default

    class PromptKernelClient(AsyncKernelClient):
        wait_for_ready = _wait_for_ready

    class RecordingKernelManager(AsyncKernelManager):
        """Notes the kernel's pid as soon as it exists, for the parent to reap if need be."""

        @default("client_factory")
        def _prompt_clients(self) -> type:
            return PromptKernelClient

        async def _async_wait(self, pollinterval: float = 0.1) -> None:
            # After killing the kernel (shutdown "immediate"), jupyter_client polls every
            # 0.1 s for it to be gone; the first poll comes too soon, so every notebook's
            # end waited 0.1 s for a process that was gone within milliseconds.
            await super()._async_wait(pollinterval=min(pollinterval, 0.005))

        async def start_kernel(self, **kwargs: Any) -> None:
            await super().start_kernel(**kwargs)
            pid = getattr(self.provisioner, "pid", None)
            if pid is not None:
                _write_json(records / _KERNEL_RECORD, {"pid": pid, "create_time": _create_time(pid)})

    def note_running_cell(cell: Any, cell_index: int) -> None:
        """Record which cell runs, for the parent to name if the kernel dies or time runs out."""
        _write_json(records / _CURRENT_CELL, {"index": cell_index})

    def prepare_failed(kernel: Any, error: BaseException) -> None:
        # Not fatal: papermill starts a kernel of its own, and reports if that fails too.
        log.warning("could not prepare a kernel ahead (%r); papermill starts one", error)
        return _discard_kernel(kernel)

    # The kernel is launched before papermill is imported (0.3 s here), so it boots meanwhile.
    kernel: Any = RecordingKernelManager(kernel_name="python3")
    try:
        run_sync(kernel.start_kernel)(extra_arguments=list(KERNEL_ARGUMENTS), cwd=args.cwd)
    except Exception as error:  # noqa: BLE001
        kernel = prepare_failed(kernel, error)
    try:
        with imports_without_gc():
            import papermill
            from nbclient.exceptions import DeadKernelError
            from papermill.exceptions import PapermillExecutionError
    except BaseException:
        _discard_kernel(kernel)
        raise

    try:
        if kernel is not None:
            try:
                run_sync(_warm_up)(kernel, preload_code(Path(args.notebook), [m for m in args.preload.split(",") if m]))
            except Exception as error:  # noqa: BLE001
                kernel = prepare_failed(kernel, error)
        go = _wait_for_go(records)
        if kernel is not None and not run_sync(_answers)(kernel):
            kernel = _discard_kernel(kernel)  # died while waiting: papermill starts a fresh one
        papermill.execute_notebook(
            args.notebook,
            go["executed_notebook"],
            parameters=go["parameters"],
            cwd=args.cwd,
            kernel_name="python3",
            progress_bar=False,
            log_output=False,
            request_save_on_cell_execute=True,
            km=kernel,
            kernel_manager_class=RecordingKernelManager,
            on_cell_start=note_running_cell,
            extra_arguments=list(KERNEL_ARGUMENTS),
            # Every result is on disk once the last cell has run; a graceful shutdown would
            # only wait (0.5-1.5 s per notebook) for the kernel's exit handlers.
            shutdown_kernel="immediate",
        )
        outcome: dict[str, Any] = {"kind": "completed"}
    except PapermillExecutionError as error:
        outcome = {"kind": "cell_error", "cell": error.exec_count or None, "ename": error.ename,
                   "evalue": error.evalue}
    except DeadKernelError as error:
        outcome = {"kind": "kernel_died", "detail": str(error)}
    except RuntimeError as error:
        # jupyter_client's words for a kernel that died before it could take the first cell
        # (killed, or out of memory while starting): a death like any other, retried as such.
        kind = "kernel_died" if "Kernel died before replying" in str(error) else "runner_error"
        outcome = {"kind": kind, "detail": f"{type(error).__name__}: {error}"}
    except Exception as error:  # the kernel would not start, the notebook would not load, ...
        outcome = {"kind": "runner_error", "detail": f"{type(error).__name__}: {error}"}
    finally:
        # papermill shuts down only kernels it started itself.
        _discard_kernel(kernel)
    _write_json(records / _OUTCOME, outcome)
    if outcome["kind"] != "completed":
        print(f"notebook {Path(args.notebook).name}: {outcome}", file=sys.stderr)
        return 1
    return 0


def _discard_kernel(kernel: Any) -> None:
    """Shut a kernel we started down at once (if there is one); returns None, for chaining."""
    from jupyter_core.utils import run_sync

    if kernel is not None and kernel.has_kernel:
        try:
            run_sync(kernel.shutdown_kernel)(now=True)
        except Exception as error:  # noqa: BLE001 - the parent reaps what is left
            log.warning("could not shut the prepared kernel down: %r", error)
    return None


def _wait_for_go(records: Path, poll_seconds: float = 0.01) -> dict[str, Any]:
    """Block until the parent writes the go file; return it."""
    while True:
        go = _read_json(records / _GO)
        if go:
            return go
        time.sleep(poll_seconds)


def preload_code(notebook: Path, extra_modules: list[str]) -> str:
    """Code that imports, with the collector paused and binding no name, what the notebook imports.

    The modules: those of the notebook's top-level `import` / `from ... import` statements
    (for `from a import b`, also `a.b` in case b is a module), then `extra_modules`, for
    libraries the notebook's code imports lazily. A module that fails to import is skipped:
    the notebook's own cell raises the error where the user sees it.
    """
    modules = [*notebook_imports(notebook), *extra_modules]
    return (
        "def _taxi_preload(names):\n"
        "    import importlib\n"
        "    from taxi_duration.startup import imports_without_gc\n"
        "    with imports_without_gc():\n"
        "        for name in names:\n"
        "            try:\n"
        "                importlib.import_module(name)\n"
        "            except Exception:\n"
        "                pass\n"
        f"_taxi_preload({list(dict.fromkeys(modules))!r})\n"
        "del _taxi_preload\n"
    )


def notebook_imports(notebook: Path) -> list[str]:
    """Modules named by the top-level import statements of a notebook's code cells, in order."""
    import ast

    parsed = _read_notebook(notebook)
    modules: list[str] = []
    for cell in _code_cells(parsed) if parsed is not None else []:
        if cell.source.lstrip().startswith("%%"):
            continue  # a cell magic: not Python
        # Line magics and shell escapes (%matplotlib, !pip) are not Python either.
        source = "\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in cell.source.splitlines())
        try:
            statements = ast.parse(source).body
        except SyntaxError:
            continue
        for statement in statements:
            if isinstance(statement, ast.Import):
                modules += [alias.name for alias in statement.names]
            elif isinstance(statement, ast.ImportFrom) and statement.level == 0 and statement.module != "__future__":
                modules.append(str(statement.module))
                modules += [f"{statement.module}.{alias.name}" for alias in statement.names if alias.name != "*"]
    return modules


async def _wait_for_ready(client: Any, timeout: float | None = None) -> None:
    """jupyter_client's KernelClient.wait_for_ready, without its 0.2 s wait for a quiet IOPub.

    Ready means, as there: the kernel answered kernel_info on the shell channel, and a message
    arrived on IOPub (so the subscription is live and no output of the first cell is lost).
    jupyter_client then also drains IOPub until it has been quiet for 0.2 s. That only
    discards the status messages of the kernel_info request, which nbclient ignores anyway
    (it keeps only messages whose parent is the cell's request), and it cost 0.2 s twice per
    notebook: once for the runner's liveness check and once for nbclient's own.
    The error messages are jupyter_client's (the runner classifies by them).
    """
    import queue

    deadline = time.monotonic() + (float("inf") if timeout is None else timeout)
    while True:
        client.kernel_info()
        try:
            reply = await client.get_shell_msg(timeout=1)
        except queue.Empty:
            reply = None
        if reply is not None and reply["msg_type"] == "kernel_info_reply":
            try:
                await client.get_iopub_msg(timeout=0.2)
            except queue.Empty:
                pass  # IOPub not connected yet: ask again
            else:
                client._handle_kernel_info_reply(reply)
                return
        if not await client._async_is_alive():
            raise RuntimeError("Kernel died before replying to kernel_info")
        if time.monotonic() > deadline:
            raise RuntimeError(f"Kernel didn't respond in {timeout:g} seconds")


@contextlib.asynccontextmanager
async def _ready_client(kernel: Any, timeout_seconds: float) -> AsyncIterator[Any]:
    """A client of `kernel` once the kernel has answered kernel_info; RuntimeError if it does not."""
    client = kernel.client()
    client.start_channels()
    try:
        await client.wait_for_ready(timeout=timeout_seconds)  # "Kernel died before replying", ...
        yield client
    finally:
        client.stop_channels()


async def _answers(kernel: Any, timeout_seconds: float = 10) -> bool:
    """Whether the kernel is alive and answers a kernel_info request within `timeout_seconds`."""
    if not await kernel.is_alive():
        return False
    try:
        async with _ready_client(kernel, timeout_seconds):
            return True
    except RuntimeError:
        return False


async def _warm_up(kernel: Any, code: str, timeout_seconds: float = 120) -> None:
    """Run `code` in the kernel without a trace in the notebook: silent, not in its history.

    Gives up (RuntimeError) when the kernel dies meanwhile or after `timeout_seconds`.
    """
    import queue

    deadline = time.monotonic() + timeout_seconds
    async with _ready_client(kernel, timeout_seconds) as client:
        msg_id = client.execute(code, silent=True, store_history=False)
        while time.monotonic() < deadline:
            try:
                reply = await client.get_shell_msg(timeout=1)
            except queue.Empty:
                if not await kernel.is_alive():
                    raise RuntimeError("the kernel died while importing the notebook's modules") from None
                continue
            if reply["parent_header"].get("msg_id") == msg_id:
                return
        raise RuntimeError(f"the kernel's imports took longer than {timeout_seconds:g} s")


def _stop_when_orphaned(parent_pid: int, records: Path) -> None:
    """Stop this child, as on a timeout, once the process that started it is gone.

    The child runs in a session of its own (so that stopping it cannot hit the caller), which
    also means nothing stops it when the caller is SIGKILLed or OOM-killed: without this
    watch, the child and its kernel would run the notebook to its end, or forever, unobserved.
    """
    while os.getppid() == parent_pid:
        time.sleep(1)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(STOP_GRACE_SECONDS)
    # The clean-up hung: do what the caller would have done, then go.
    _reap_kernel(records / _KERNEL_RECORD)
    os._exit(1)


def _create_time(pid: int) -> float:
    """When process `pid` started, as psutil counts it (to tell it from a later one with its pid)."""
    import psutil

    return psutil.Process(pid).create_time()


def _write_json(path: Path, value: dict[str, Any]) -> None:
    """Write `value` whole or not at all: the parent may read the file at any moment."""
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(value), encoding="utf-8")
    temporary.replace(path)


if __name__ == "__main__":
    exit_code = _child_main()
    from taxi_duration.startup import exit_without_final_collection

    exit_without_final_collection()
    sys.exit(exit_code)
