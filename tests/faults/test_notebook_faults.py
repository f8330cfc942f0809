"""Notebooks failing the ways real ones do, run through execute_notebook as the flow runs them.

Each case checks the message (notebook, cell, cause), that NotebookExecutionError is raised
(or the run succeeds where it should), that the executed copy and both reports exist and
show the failure, and that no process of the run outlives it. Processes are tracked two
ways, both safe on a shared machine where other tests start kernels too: every fixture
notebook writes its kernel's pid (and that of any helper it starts) to a file, and every
process started on the test's behalf inherits an environment variable unique to the test.
"""

from __future__ import annotations

import html
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import nbformat
import psutil
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from taxi_duration import runner as notebook_runner
from taxi_duration.runner import NotebookExecutionError, NotebookParameterError, execute_notebook

pytestmark = pytest.mark.notebooks
FIXTURES = Path(__file__).parent / "notebooks"
TIMEOUT = 120  # far above what a fixture needs, so only the sleeping notebook ever reaches it
# Enough for the runner and kernel to start and reach the sleeping cell on a busy machine.
SHORT_TIMEOUT = 12
MARKER_VARIABLE = "TAXI_FAULT_TEST_RUN"
# Fixture execution counts: parameters [1], papermill's injected parameters [2], pid record [3].


def _recorded_processes(pid_file: Path) -> list[tuple[int, float]]:
    """(pid, start time) of every process the fixture notebook wrote down."""
    if not pid_file.is_file():
        return []
    return [(int(pid), float(started)) for pid, started in (line.split() for line in pid_file.read_text().splitlines())]


def _is_running(pid: int, started: float) -> bool:
    """True if that very process (not a later one reusing its pid) is alive and not a zombie."""
    try:
        process = psutil.Process(pid)
        return abs(process.create_time() - started) < 0.5 and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _marked_processes(marker: str) -> list[str]:
    """Live processes (other than this one) that inherited this test's marker variable."""
    found = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        if process.pid == os.getpid():
            continue
        try:
            if process.environ().get(MARKER_VARIABLE) == marker and process.status() != psutil.STATUS_ZOMBIE:
                found.append(f"{process.pid}: {' '.join(process.info['cmdline'] or [])}")
        except psutil.Error:
            continue  # gone meanwhile, or another user's
    return found


class FaultRun:
    """Run a fixture notebook with execute_notebook; check afterwards that nothing survives."""

    def __init__(self, folder: Path, marker: str):
        self.folder = folder
        self.marker = marker
        self.pid_file = folder / "pids.txt"
        self.started_at = time.monotonic()

    def __call__(self, name: str, timeout: float = TIMEOUT, **parameters) -> notebook_runner.NotebookResult:
        """execute_notebook on fixture `name`; `retries_on_kernel_death` is passed on, the rest are parameters."""
        options = {key: parameters.pop(key) for key in ["retries_on_kernel_death"] if key in parameters}
        return execute_notebook(
            FIXTURES / f"{name}.ipynb",
            self.folder / "run" / f"{name}.ipynb",
            {"pid_file": str(self.pid_file), **parameters},
            timeout,
            cwd=self.folder,
            **options,
        )

    def fails(self, name: str, timeout: float = TIMEOUT, **parameters) -> NotebookExecutionError:
        """Like calling the run, expecting NotebookExecutionError."""
        with pytest.raises(NotebookExecutionError) as raised:
            self(name, timeout, **parameters)
        return raised.value

    def kernels(self) -> list[tuple[int, float]]:
        return _recorded_processes(self.pid_file)

    def assert_nothing_survives(self) -> None:
        """No recorded process and no process carrying the marker is alive (2 s for init to reap)."""
        recorded = self.kernels()
        assert recorded, "the fixture notebook recorded no kernel pid: the check would prove nothing"
        for _ in range(20):
            alive = [pid for pid, started in recorded if _is_running(pid, started)]
            marked = _marked_processes(self.marker)
            if not alive and not marked:
                return
            time.sleep(0.1)
        pytest.fail(f"processes outlived execute_notebook: recorded {alive}, marked {marked}")


@pytest.fixture
def run(tmp_path, monkeypatch):
    marker = f"{tmp_path.name}-{uuid.uuid4().hex}"
    monkeypatch.setenv(MARKER_VARIABLE, marker)  # inherited by the runner, the kernel and its children
    fault_run = FaultRun(tmp_path, marker)
    yield fault_run
    fault_run.assert_nothing_survives()


def _assert_failure_shown(error: NotebookExecutionError, *phrases: str) -> nbformat.NotebookNode:
    """The message names the notebook; it, the executed copy's metadata and both reports carry every phrase."""
    result = error.result
    message = str(error)
    assert not result.succeeded and result.error and result.error in message
    assert f"{result.executed_notebook.name} failed:" in message
    for phrase in phrases:
        assert phrase in message, f"{phrase!r} not in {message!r}"
    assert result.executed_notebook.is_file()
    executed = nbformat.read(result.executed_notebook, as_version=4)
    assert executed.metadata["taxi"] == {"succeeded": False, "failure": result.error, "attempts": result.attempts}
    assert result.reports is not None
    for report in (result.reports.full, result.reports.review):
        page = html.unescape(report.read_text(encoding="utf-8"))
        assert "This notebook failed." in page
        for phrase in phrases:
            assert phrase in page, f"{phrase!r} not in {report.name}"
    return executed


def _cell(executed: nbformat.NotebookNode, source_part: str) -> nbformat.NotebookNode:
    return next(cell for cell in executed.cells if cell.cell_type == "code" and source_part in cell.source)


def _printed(executed: nbformat.NotebookNode) -> str:
    return "".join(output.get("text", "") for cell in executed.cells for output in cell.get("outputs", []))


# 1. A cell raises ---------------------------------------------------------------------------


def test_a_raising_cell_is_named_with_its_exception(run):
    error = run.fails("raises")

    executed = _assert_failure_shown(error, "cell 5 raised ValueError: fare_amount has 12 negative values")
    failing = _cell(executed, "raise ValueError")
    assert failing.execution_count == 5
    assert [output.ename for output in failing.outputs if output.output_type == "error"] == ["ValueError"]
    assert _cell(executed, "never printed").execution_count is None


# 2. Early stops and shell commands ---------------------------------------------------------------


@pytest.mark.parametrize("exit_code", [0, 3])
def test_sys_exit_is_an_early_stop_not_a_success(run, exit_code):
    # papermill returns normally for sys.exit(0) (and raises for 3); both must fail the same way.
    error = run.fails("exits_early", exit_code=exit_code)

    executed = _assert_failure_shown(
        error,
        f"stopped early at cell 5: the cell called sys.exit({exit_code})",
        "1 later code cell(s) did not run",
    )
    assert _cell(executed, "sys.exit").execution_count == 5
    assert _cell(executed, "never printed").execution_count is None
    assert ("papermill counts sys.exit(0) as success" in str(error)) == (exit_code == 0)


@pytest.mark.parametrize("form", ["bang", "capture"])
def test_a_failing_bang_command_fails_its_cell(run, form):
    # IPython only sets _exit_code for `!cmd` and `x = !cmd`; the runner makes them raise.
    error = run.fails("shell_fails", form=form)

    executed = _assert_failure_shown(
        error,
        "stopped early at cell 4: a shell command",
        "Command 'ls /nonexistent-taxi-folder' returned non-zero exit status 2",
        "|| true",
    )
    assert "after the shell command" not in _printed(executed)


def test_a_failing_bash_cell_fails_its_cell(run):
    error = run.fails("bash_fails")

    executed = _assert_failure_shown(error, "stopped early at cell 4: a shell command", "exit status 3")
    assert "about to fail" in _printed(executed) and "never printed" not in _printed(executed)


def test_a_shell_failure_marked_as_expected_passes(run):
    result = run("shell_fails", form="tolerated")

    assert result.succeeded and result.error is None and result.attempts == 1
    executed = nbformat.read(result.executed_notebook, as_version=4)
    assert "after the shell command" in _printed(executed)
    assert executed.metadata["taxi"] == {"succeeded": True, "failure": None, "attempts": 1}
    for report in (result.reports.full, result.reports.review):
        assert "This notebook failed" not in report.read_text(encoding="utf-8")


# 3. The kernel dies ---------------------------------------------------------------------------


def test_a_kernel_killed_every_time_fails_after_two_attempts(run):
    error = run.fails("kills_kernel")

    _assert_failure_shown(
        error,
        "the kernel died while running cell 5 on every attempt (2 of 2",
        "out-of-memory",
    )
    assert error.result.attempts == 2
    assert len(run.kernels()) == 2, "one kernel per attempt"


def test_a_kernel_killed_once_succeeds_on_the_second_attempt(run, tmp_path):
    marker = tmp_path / "killed-once"
    result = run("kills_kernel", marker=str(marker))

    assert result.succeeded and result.attempts == 2 and marker.is_file()
    executed = nbformat.read(result.executed_notebook, as_version=4)
    assert "the kernel survived" in _printed(executed)
    assert executed.metadata["taxi"] == {"succeeded": True, "failure": None, "attempts": 2}
    assert result.reports.full.is_file() and result.reports.review.is_file()
    assert len(run.kernels()) == 2


def test_without_retries_a_dead_kernel_fails_at_once(run):
    error = run.fails("kills_kernel", retries_on_kernel_death=0)

    _assert_failure_shown(error, "the kernel died while running cell 5 (not run again: retries_on_kernel_death=0)")
    assert error.result.attempts == 1 and len(run.kernels()) == 1


# 4. A cell never finishes ---------------------------------------------------------------------


def test_a_cell_that_never_finishes_is_stopped_and_its_kernel_reaped(run):
    # The runner is asked to stop (SIGTERM); nbclient shuts the kernel down, and with it the
    # `sleep` the notebook started. The teardown checks both are gone.
    started = time.monotonic()
    error = run.fails("sleeps_forever", timeout=SHORT_TIMEOUT, spawn_child=True)

    assert time.monotonic() - started < SHORT_TIMEOUT + 30
    executed = _assert_failure_shown(
        error,
        f"did not finish within {SHORT_TIMEOUT} s (TAXI_NOTEBOOK_TIMEOUT)",
        "while running cell 4",
    )
    assert _cell(executed, "never printed").execution_count is None


def test_a_runner_killed_outright_leaves_no_kernel_nor_what_the_kernel_started(run, monkeypatch):
    # The runner is SIGKILLed instead of asked to stop, as when its clean-up hangs past the
    # grace period: nothing shuts the kernel down, and the `sleep` the notebook started would
    # outlive the kernel (ipykernel exits when its parent goes; its children do not) but for
    # the reaping of the kernel's process group.
    def kill_outright(child):
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()

    monkeypatch.setattr(notebook_runner.parent, "stop_child", kill_outright)
    started = time.monotonic()
    error = run.fails("sleeps_forever", timeout=SHORT_TIMEOUT, spawn_child=True)

    assert time.monotonic() - started < SHORT_TIMEOUT + 30
    _assert_failure_shown(
        error,
        f"did not finish within {SHORT_TIMEOUT} s",
        "while running cell 4",
        "process(es) the notebook left running were killed",
    )
    kernel, helper = run.kernels()
    assert str(helper[0]) in error.result.error
    assert not _is_running(*kernel) and not _is_running(*helper)


CALLER = """
import sys
from pathlib import Path

from taxi_duration.runner import execute_notebook

notebook, executed, pid_file = sys.argv[1:]
execute_notebook(Path(notebook), Path(executed), {"pid_file": pid_file, "spawn_child": True}, 600)
"""


def test_when_the_caller_dies_the_runner_stops_its_kernel(run):
    # The flow process SIGKILLed mid-notebook: the runner lives in its own session, so only
    # its watch on its parent stops it (and its kernel, and what the kernel started).
    caller = subprocess.Popen(
        [
            sys.executable,
            "-c",
            CALLER,
            str(FIXTURES / "sleeps_forever.ipynb"),
            str(run.folder / "run" / "sleeps_forever.ipynb"),
            str(run.pid_file),
        ]
    )
    try:
        waited = time.monotonic()
        while len(run.kernels()) < 2:  # the kernel and its `sleep` are running
            assert caller.poll() is None and time.monotonic() - waited < 60, "the notebook never reached its sleep"
            time.sleep(0.2)
    finally:
        caller.kill()
        caller.wait()

    stopped = time.monotonic()
    while any(_is_running(*process) for process in run.kernels()) or _marked_processes(run.marker):
        assert time.monotonic() - stopped < notebook_runner.STOP_GRACE_SECONDS + 10, "the runner outlived its caller"
        time.sleep(0.2)


# 5. String parameters round-trip ---------------------------------------------------------------

NASTY = '"\'\\\n\r\t\x00 é€😀 {text} """ \'\'\' \\" \\N{BULLET} \\u00e9 \x85\u2028 trailing\\'


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(st.characters(codec="utf-8")))  # any string UTF-8 can carry: no lone surrogates
@example(text="")
@example(text=NASTY)
def test_any_string_parameter_reaches_the_notebook_unchanged(run, text):
    out_file = run.folder / f"echo-{uuid.uuid4().hex}.txt"
    run("echo_text", text=text, out_file=str(out_file))

    with open(out_file, encoding="utf-8", newline="") as echoed:
        assert echoed.read() == text


def test_a_lone_surrogate_is_refused_before_anything_runs(tmp_path):
    # papermill copies parameters into the notebook's metadata and cannot write them as UTF-8.
    with pytest.raises(NotebookParameterError, match="lone surrogate"):
        execute_notebook(
            FIXTURES / "echo_text.ipynb",
            tmp_path / "echo_text.ipynb",
            {"text": "half a pair: \ud800", "out_file": str(tmp_path / "out.txt")},
            TIMEOUT,
        )
    assert not (tmp_path / "echo_text.ipynb").exists()


def test_retries_must_not_be_negative(tmp_path):
    with pytest.raises(ValueError, match="retries_on_kernel_death"):
        execute_notebook(FIXTURES / "raises.ipynb", tmp_path / "raises.ipynb", {}, TIMEOUT, retries_on_kernel_death=-1)


def test_fixture_notebooks_are_committed_without_outputs():
    for path in sorted(FIXTURES.glob("*.ipynb")):
        notebook = json.loads(path.read_text(encoding="utf-8"))
        code = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
        assert code[0]["metadata"].get("tags") == ["parameters"], path.name
        assert all(not cell["outputs"] and cell["execution_count"] is None for cell in code), path.name


@pytest.mark.parametrize(
    ("source", "named"),
    [
        (
            'raise ValueError("fare_amount has 3 negative values")',
            "cell 3 raised ValueError: fare_amount has 3 negative values.",
        ),
        ("%nosuchmagic", "cell 3 raised UsageError: Line magic function `%nosuchmagic` not found."),
        ("def broken(:\n    pass", "cell 3 raised SyntaxError: invalid syntax"),
        ("!exit 3", "(CalledProcessError: Command 'exit 3' returned non-zero exit status 3.)"),
        ('raise KeyboardInterrupt("stopped by hand")', "cell 3 raised KeyboardInterrupt: stopped by hand."),
        ("raise KeyboardInterrupt", "cell 3 raised KeyboardInterrupt (with no message)."),
        ("import sys\nsys.exit(3)", "the cell called sys.exit(3) (SystemExit: 3)"),
    ],
    ids=[
        "code",
        "ipython-magic",
        "syntax-error",
        "shell-escape",
        "keyboard-interrupt",
        "bare-interrupt",
        "system-exit",
    ],
)
def test_every_failure_kind_names_its_exception_and_the_cells_first_line(tmp_path, source, named):
    notebook = nbformat.v4.new_notebook()
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    parameters = nbformat.v4.new_code_cell("answer = 0")
    parameters.metadata["tags"] = ["parameters"]
    notebook.cells = [
        parameters,
        nbformat.v4.new_code_cell("x = 1"),
        nbformat.v4.new_code_cell(source),
        nbformat.v4.new_code_cell("y = 2"),
    ]
    path = tmp_path / "kind.ipynb"
    nbformat.write(notebook, path)
    with pytest.raises(NotebookExecutionError) as raised:
        execute_notebook(path, tmp_path / "executed.ipynb", {}, TIMEOUT)
    message = str(raised.value)
    assert named in message, message
    # One line: through the flow it is the failure paragraph's last line, "Pipeline failed: <message>"
    # (tests/faults/test_flow_faults.py runs one cell error, an early stop, a dead kernel and a timeout
    # through the flow; every other kind reaches it the same way as the cell error).
    assert "\n" not in message, message
    assert f"(Cell 3 begins: {source.splitlines()[0]})" in message
    assert "CellExecutionError" not in message and ":." not in message
    assert f"executed copy: {tmp_path / 'executed.ipynb'}; report: {tmp_path / 'executed.html'}" in message
