"""Runners started ahead of their notebook (taxi_duration.runner.PreparedRunner): what the kernel preloads,
that it leaves no trace in the notebook, and that nothing outlives a runner nobody used."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import nbformat
import psutil
import pytest

from taxi_duration import runner as notebook_runner
from taxi_duration.runner import NotebookExecutionError, PreparedRunner, execute_notebook

TIMEOUT = 120
# Standard-library modules neither Python's start-up nor ipykernel imports.
PROBE = "colorsys"
EXTRA = "wave"


def _notebook(folder: Path, *cells: str, name: str = "probe") -> Path:
    notebook = nbformat.v4.new_notebook()
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    parameters = nbformat.v4.new_code_cell("answer = 0")
    parameters.metadata["tags"] = ["parameters"]
    notebook.cells = [parameters, *(nbformat.v4.new_code_cell(source) for source in cells)]
    path = folder / f"{name}.ipynb"
    nbformat.write(notebook, path)
    return path


def _kernel_pid(runner: PreparedRunner, timeout: float = 60) -> int:
    """The prepared kernel's pid, once the runner has recorded it."""
    record = runner.records / "kernel.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if record.is_file():
            return json.loads(record.read_text())["pid"]
        time.sleep(0.05)
    raise AssertionError(f"the runner recorded no kernel within {timeout} s; log: {_runner_log(runner)}")


def _runner_log(runner: PreparedRunner) -> str:
    log = runner.records / "runner.log"
    return log.read_text() if log.is_file() else "(none)"


def _gone(pid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def test_the_notebooks_imports_and_the_preload_are_loaded_before_the_first_cell_without_binding_a_name(tmp_path):
    notebook = _notebook(
        tmp_path,
        "import sys\n"
        f"assert {PROBE!r} in sys.modules, 'the later cell imports it: it should be preloaded'\n"
        f"assert {EXTRA!r} in sys.modules, 'named in preload'\n"
        f"assert {PROBE!r} not in dir() and {EXTRA!r} not in dir() and '_taxi_preload' not in dir()\n"
        "print(answer)",
        f"import {PROBE}\nprint({PROBE}.rgb_to_hsv(1, 0, 0))",
    )
    runner = PreparedRunner(notebook, preload=(EXTRA,))
    _kernel_pid(runner)
    result = execute_notebook(notebook, tmp_path / "run" / "probe.ipynb", {"answer": 42}, TIMEOUT, prepared=runner)

    assert result.succeeded
    executed = nbformat.read(result.executed_notebook, as_version=4)
    code = [cell for cell in executed.cells if cell.cell_type == "code"]
    # The silent warm-up took no execution count: the notebook's cells are numbered from 1.
    assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1))
    assert code[2].outputs[0]["text"] == "42\n"
    assert not runner.records.exists(), "the runner's records are removed once the notebook ran"


def test_every_runner_preloads_the_notebooks_own_imports_but_nothing_else_unasked(tmp_path):
    # The control for the test above: the extra module is there only when named.
    notebook = _notebook(
        tmp_path, f"import sys\nassert {PROBE!r} in sys.modules and {EXTRA!r} not in sys.modules", f"import {PROBE}"
    )
    assert execute_notebook(notebook, tmp_path / "run.ipynb", {}, TIMEOUT).succeeded


def test_a_prepared_runner_nobody_uses_is_stopped_with_its_kernel(tmp_path):
    runner = PreparedRunner(_notebook(tmp_path, "x = 1"))
    kernel = _kernel_pid(runner)
    runner.close()
    assert runner.child.returncode is not None
    assert _gone(kernel), f"kernel {kernel} outlived its closed runner"
    assert not runner.records.exists()
    runner.close()  # closing twice is harmless


def test_a_prepared_kernel_that_died_while_waiting_is_replaced(tmp_path):
    notebook = _notebook(tmp_path, "import os\nprint(os.getpid())")
    runner = PreparedRunner(notebook)
    kernel = _kernel_pid(runner)
    time.sleep(1)  # let the warm-up finish: the runner is now waiting for its go
    os.kill(kernel, signal.SIGKILL)
    assert _gone(kernel)
    result = execute_notebook(notebook, tmp_path / "run.ipynb", {}, TIMEOUT, prepared=runner)
    assert result.succeeded
    printed = nbformat.read(result.executed_notebook, as_version=4).cells[1].outputs[0]["text"]
    assert int(printed) != kernel


def test_a_runner_prepared_for_another_notebook_is_refused_and_closed(tmp_path):
    runner = PreparedRunner(_notebook(tmp_path, "x = 1", name="one"))
    other = _notebook(tmp_path, "x = 2", name="two")
    with pytest.raises(ValueError, match="prepared runner is for"):
        execute_notebook(other, tmp_path / "run.ipynb", {}, TIMEOUT, prepared=runner)
    assert runner.child.returncode is not None and not runner.records.exists()


def test_a_failing_cell_on_a_prepared_runner_is_reported_as_without_one(tmp_path):
    notebook = _notebook(tmp_path, "raise KeyError('no such zone')")
    with pytest.raises(NotebookExecutionError) as raised:
        execute_notebook(notebook, tmp_path / "run.ipynb", {}, TIMEOUT, prepared=PreparedRunner(notebook))
    assert "raised KeyError" in str(raised.value) and "no such zone" in str(raised.value)


def test_notebook_imports_reads_top_level_imports_and_skips_magics(tmp_path):
    notebook = _notebook(
        tmp_path,
        "%matplotlib inline\nimport os.path, json as j\nfrom collections import abc, OrderedDict\nfrom . import sibling",
        "%%bash\necho not python",
        "if True:\n    import decimal  # not top level: left to the cell",
        "from __future__ import annotations\nfrom typing import *",
        "this is not python(",
    )
    assert notebook_runner.notebook_imports(notebook) == [
        "os.path",
        "json",
        "collections",
        "collections.abc",
        "collections.OrderedDict",
        "typing",
    ]


def test_a_module_that_kills_the_kernel_on_import_is_reported_as_a_kernel_death_not_a_hang(tmp_path):
    # The preload imports it first: the runner must notice the death at once, not wait out its
    # own 120 s limit (the notebook's 60 s limit would then report a timeout instead).
    (tmp_path / "kills_on_import.py").write_text("import os\nos._exit(1)\n")
    notebook = _notebook(tmp_path, "import kills_on_import")
    with pytest.raises(NotebookExecutionError) as raised:
        execute_notebook(notebook, tmp_path / "run.ipynb", {}, 60, cwd=tmp_path, retries_on_kernel_death=0)
    assert "the kernel died" in str(raised.value)


def test_waiting_for_a_runner_notices_its_exit_and_its_deadline():
    quick = subprocess.Popen([sys.executable, "-c", "pass"])
    assert notebook_runner.parent._wait_unless_stopped(quick, time.monotonic() + 60, None) is True
    assert quick.returncode == 0
    slow = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert notebook_runner.parent._wait_unless_stopped(slow, time.monotonic() + 0.3, None) is False
        stop = threading.Event()
        stop.set()
        with pytest.raises(notebook_runner.NotebookStopped):
            notebook_runner.parent._wait_unless_stopped(slow, time.monotonic() + 60, stop)
    finally:
        slow.kill()
        slow.wait()


def test_progress_is_reported_cell_by_cell_at_most_once_a_second(tmp_path):
    notebook = _notebook(tmp_path, "import time", "# a comment first\ntime.sleep(2.5)", "", "done = True")
    seen: list[notebook_runner.Progress] = []
    moments: list[float] = []

    def on_progress(progress):
        seen.append(progress)
        moments.append(time.monotonic())

    execute_notebook(notebook, tmp_path / "run.ipynb", {"answer": 42}, TIMEOUT, on_progress=on_progress)
    final = seen[-1]
    # The parameters cell, papermill's injected one and the three non-empty cells; the empty one is skipped.
    assert final.total == 5 and final.running is None
    assert [cell["position"] for cell in final.finished] == [1, 2, 3, 4, 5]
    assert [cell["first_line"] for cell in final.finished][2:] == ["import time", "# a comment first", "done = True"]
    assert final.finished[3]["seconds"] >= 2.5
    # While the sleeping cell ran, the caller was told it was running.
    assert any(progress.running and progress.running["position"] == 4 for progress in seen)
    assert all(later - earlier >= 0.95 for earlier, later in itertools.pairwise(moments[:-1])), moments
