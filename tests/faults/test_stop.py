"""A stop that cannot be swallowed: SIGTERM or Ctrl-C ends the pipeline in time, KILLED, leaving no process.

The runs are real `python flows/pipeline.py` processes on a tiny synthetic month, each with its
own MLflow store and outputs folder; their processes (runner, kernel) are found by that folder's
path in their environment.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import nbformat
import pytest
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from nbformat.v4 import new_code_cell

from taxi_duration import settings
from taxi_duration.data.periods import Month
from taxi_duration.data.synthetic import write_trip_file
from taxi_duration.orchestration.stopping import STOP_DEADLINE_SECONDS
from taxi_duration.servers import endpoints

PROJECT_DIR = Path(__file__).resolve().parents[2]
SIGNAL_TO_EXIT_SECONDS = 30  # what the pipeline promises: gone this long after its signal, at the latest
TINY_MONTH_ROWS = 300

# Stands in for a signal whose exception is raised where Python only reports it (a weakref
# callback, a finalizer): the handler Prefect installs during a flow run raises nothing, and
# `MODE=stuck` also holds the flow's closing of its MLflow run forever, for the last resort.
SWALLOWING_LAUNCHER = """
import os, runpy, sys, time
from pathlib import Path

import prefect.utilities.engine as engine

def swallowed(signum, frame):
    Path(os.environ["SWALLOWED_MARKER"]).touch()
    print("Exception ignored in: <function _remove_item> (TerminationSignal, simulated)", file=sys.stderr)

engine._prefect_sigterm_handler = swallowed
if os.environ.get("MODE") == "stuck":
    import taxi_duration.orchestration.pipeline as pipeline
    pipeline._close_run = lambda context, ending: time.sleep(3600)
sys.argv = [sys.argv[1], *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@dataclass
class StoppedRun:
    """One pipeline process, the signal it was sent, and when."""

    root: Path
    process: subprocess.Popen
    signum: int
    signalled: float | None = None  # time.time() when the signal was sent
    exited_after: float | None = None  # seconds from the signal to the process's exit

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.root / 'mlflow.db'}"

    @property
    def outputs(self) -> Path:
        return self.root / "outputs"

    def output(self) -> str:
        return (self.root / "stdout").read_text() + (self.root / "stderr").read_text()

    def runs(self) -> list[Run]:
        client = MlflowClient(self.tracking_uri)
        experiment = client.get_experiment_by_name("nyc-taxi-duration")
        return client.search_runs([experiment.experiment_id]) if experiment else []

    def archived_notebooks(self, run: Run) -> set[str]:
        return {Path(a.path).name for a in MlflowClient(self.tracking_uri).list_artifacts(run.info.run_id, "notebooks")}

    def signal_and_wait(self) -> None:
        """Send the signal, wait at most SIGNAL_TO_EXIT_SECONDS (and a little) for the process to go."""
        self.signalled = time.time()
        self.process.send_signal(self.signum)
        try:
            self.process.wait(timeout=SIGNAL_TO_EXIT_SECONDS + 15)
        except subprocess.TimeoutExpired:
            pass
        else:
            self.exited_after = time.time() - self.signalled
        finally:
            self.process.kill()  # nothing, if it went; else the test fails on exited_after
            self.process.wait()


@pytest.fixture
def tiny_source(tmp_path: Path) -> Path:
    """The tiniest month the pipeline trains on: green 2023-03 and 2023-04, TINY_MONTH_ROWS trips each."""
    folder = tmp_path / "tiny-tlc"
    for month in (Month(2023, 3), Month(2023, 4)):
        write_trip_file(folder, "green", month, TINY_MONTH_ROWS, seed=11)
    return folder


@pytest.fixture
def cpu_burner() -> Iterator[subprocess.Popen]:
    """A process that keeps one core busy for the test's length (at most ten minutes)."""
    burner = subprocess.Popen(
        [sys.executable, "-c", "import time\nend = time.time() + 600\nwhile time.time() < end: pass"]
    )
    yield burner
    burner.kill()
    burner.wait()


@pytest.fixture
def prefect_server_up(prefect_home: Path) -> None:
    """The tests' shared local Prefect server, running before a run can be stopped while starting it."""
    endpoints.ensure_prefect_server()


def _start(
    root: Path,
    empty_tracking_store: Path,
    prefect_home: Path,
    source: Path,
    signum: int,
    project: Path | None = None,
    launcher: Path | None = None,
    extra_env: dict[str, str] | None = None,
) -> StoppedRun:
    root.mkdir(parents=True)
    shutil.copyfile(empty_tracking_store, root / "mlflow.db")
    env = {
        **os.environ,
        **settings.ENVIRONMENT_DEFAULTS,
        "PREFECT_HOME": str(prefect_home),
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
        "TAXI_OUTPUTS_DIR": str(root / "outputs"),
        "TAXI_DATA_DIR": str(root / "data"),
        "PYTHONUNBUFFERED": "1",
        **(extra_env or {}),
    }
    env.pop("PREFECT_API_URL", None)
    for inherited in ("MLFLOW_EXPERIMENT_NAME", "TAXI_CACHE_DIR", "TAXI_DATA_SOURCE"):
        env.pop(inherited, None)
    if project is not None:
        env["TAXI_PROJECT_DIR"] = str(project)
    pipeline = str(PROJECT_DIR / "flows" / "pipeline.py")
    command = [sys.executable, *([str(launcher)] if launcher else []), pipeline, "--data-source", str(source)]
    with open(root / "stdout", "w") as stdout, open(root / "stderr", "w") as stderr:
        process = subprocess.Popen(command, cwd=PROJECT_DIR, env=env, stdout=stdout, stderr=stderr)
    return StoppedRun(root, process, signum)


def _processes_with(marker: str) -> list[str]:
    """Live processes (not zombies) whose environment holds `marker`: their pid and command line."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            mine = marker.encode() in (entry / "environ").read_bytes()
            if mine and (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                found.append(f"{entry.name}: {command[:200]}")
        except OSError:
            continue
    return found


def _wait_for(predicate: Callable[[], object], timeout: float) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.25)


def _check_stopped(run: StoppedRun) -> str:
    """Assert what a stop promises; one line saying how this run ended."""
    assert run.exited_after is not None and run.exited_after <= SIGNAL_TO_EXIT_SECONDS, (
        (
            f"still running {SIGNAL_TO_EXIT_SECONDS + 15} s after {signal.Signals(run.signum).name}"
            if run.exited_after is None
            else f"exited {run.exited_after:.1f} s after its signal"
        )
        + "\n"
        + run.output()[-4000:]
    )
    left = _wait_for(lambda: not _processes_with(str(run.outputs)), 5) or _processes_with(str(run.outputs))
    assert left is True, f"processes left: {left}"
    runs = run.runs()
    assert len(runs) <= 1, [r.info.status for r in runs]
    if not runs:  # stopped before the MLflow run was created: nothing to mark
        # -signum: the signal came before the command installed its handler (Python's imports)
        assert run.process.returncode in (128 + run.signum, -run.signum), run.output()[-4000:]
        return f"no MLflow run yet, exit {run.process.returncode} {run.exited_after:.1f} s after the signal"
    (mlflow_run,) = runs
    status, ended = mlflow_run.info.status, mlflow_run.info.end_time
    if status == "FINISHED":  # only if it finished before the signal came
        assert ended is not None and ended / 1000 <= run.signalled, run.output()[-4000:]
        return f"FINISHED before the signal, exit {run.process.returncode} {run.exited_after:.1f} s after it"
    assert status == "KILLED", f"MLflow run {status}\n" + run.output()[-4000:]
    assert run.process.returncode == 128 + run.signum, run.output()[-4000:]
    run_dir = Path(mlflow_run.data.tags.get("taxi.run_dir", run.outputs / "none"))
    executed = {path.name for path in run_dir.glob("*.ipynb")}
    assert executed <= run.archived_notebooks(mlflow_run), "an executed notebook is not archived"
    return (
        f"KILLED, notebooks {sorted(executed)} archived, exit {run.process.returncode} "
        f"{run.exited_after:.1f} s after the signal"
    )


# Where in a run a signal lands: a landmark the test can see from outside, and up to how many
# seconds after it. Wall-clock delays from the start would mostly land in the imports on a busy
# machine; these spread the signals over start-up, the run's creation and the fetch, the two
# notebooks side by side, and training.
PHASES: dict[str, tuple[Callable[[StoppedRun], bool], float]] = {
    "start-up": (lambda run: True, 8.0),
    "run created": (lambda run: "MLflow run " in run.output(), 3.0),
    "notebooks": (lambda run: any(run.outputs.glob("green/2023-03/*/0[12]_*.ipynb")), 10.0),
    "training": (lambda run: any(run.outputs.glob("green/2023-03/*/03_train.ipynb")), 5.0),
}


@pytest.mark.flow
@pytest.mark.long
def test_stops_at_random_moments_under_load_end_in_time_killed_and_leave_no_process(
    tmp_path: Path,
    empty_tracking_store: Path,
    prefect_home: Path,
    prefect_server_up: None,
    tiny_source: Path,
    cpu_burner: subprocess.Popen,
) -> None:
    """Ten SIGTERMs and one Ctrl-C at random moments of the run, two runs at a time beside a busy core."""
    chance = random.Random(20261203)
    phases = [
        "start-up",
        "start-up",
        "run created",
        "run created",
        "run created",
        "notebooks",
        "notebooks",
        "notebooks",
        "training",
        "training",
    ]
    cases = [(signal.SIGTERM, phase, chance.uniform(0, PHASES[phase][1])) for phase in phases]
    cases.append((signal.SIGINT, "notebooks", chance.uniform(0, PHASES["notebooks"][1])))

    def one(index: int, signum: int, phase: str, delay: float) -> str:
        run = _start(tmp_path / f"run-{index}", empty_tracking_store, prefect_home, tiny_source, signum)
        try:
            reached, _ = PHASES[phase]
            _wait_for(lambda: reached(run) or run.process.poll() is not None, 600)
            time.sleep(delay)
            run.signal_and_wait()
            return f"{index}: {signal.Signals(signum).name} {delay:.1f} s after {phase}: " + _check_stopped(run)
        finally:
            run.process.kill()

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        futures = [pool.submit(one, index, *case) for index, case in enumerate(cases)]
    failures = [f"{index}: {future.exception()}" for index, future in enumerate(futures) if future.exception()]
    print("\n".join(future.result() for future in futures if not future.exception()))
    assert not failures, "\n\n".join(failures)


@pytest.fixture
def sleeping_project(tmp_path: Path) -> Path:
    """The project's notebooks, but 01_explore sleeps ten minutes in its third cell."""
    copy = tmp_path / "project"
    (copy / "notebooks").mkdir(parents=True)
    for source in [*(PROJECT_DIR / "notebooks").glob("*.ipynb"), PROJECT_DIR / "notebooks" / "pipeline.yaml"]:
        shutil.copyfile(source, copy / "notebooks" / source.name)
    explore = nbformat.read(copy / "notebooks" / "01_explore.ipynb", as_version=4)
    explore.cells.insert(2, new_code_cell("import time\ntime.sleep(600)  # injected by the test"))
    nbformat.write(explore, copy / "notebooks" / "01_explore.ipynb")
    return copy


@pytest.mark.flow
@pytest.mark.long
@pytest.mark.parametrize("mode", ["swallowed", "stuck"])
def test_a_stop_whose_exception_is_swallowed_still_ends_the_run_killed_in_time(
    tmp_path: Path,
    empty_tracking_store: Path,
    prefect_home: Path,
    prefect_server_up: None,
    tiny_source: Path,
    sleeping_project: Path,
    mode: str,
) -> None:
    """Prefect's handler raises nothing (as in a weakref callback); `stuck`: the flow never closes its run either."""
    launcher = tmp_path / "swallowing_launcher.py"
    launcher.write_text(SWALLOWING_LAUNCHER)
    marker = tmp_path / "swallowed"
    run = _start(
        tmp_path / "run",
        empty_tracking_store,
        prefect_home,
        tiny_source,
        signal.SIGTERM,
        project=sleeping_project,
        launcher=launcher,
        extra_env={"SWALLOWED_MARKER": str(marker), "MODE": mode},
    )
    try:
        executed = _wait_for(lambda: next(run.outputs.glob("green/2023-03/*/01_explore.ipynb"), None), 240)
        assert executed, "01_explore did not start\n" + run.output()[-4000:]
        time.sleep(3)  # the kernel reaches the sleeping cell
        run.signal_and_wait()
    finally:
        run.process.kill()
    assert marker.exists(), "the signal did not reach the swallowing handler\n" + run.output()[-4000:]
    print(_check_stopped(run))
    (mlflow_run,) = run.runs()
    assert "01_explore.ipynb" in run.archived_notebooks(mlflow_run)
    if mode == "stuck":
        assert "the pipeline was stopped" in mlflow_run.data.tags["taxi.killed_reason"]
        assert "marking the run KILLED and exiting" in run.output()


# The mechanism without Prefect: the main thread is in a weakref callback (as in
# SQLAlchemy's clsregistry._remove_item) when SIGTERM comes, so the handler's SystemExit is
# printed as ignored and the thread carries on. The runner ignores SIGTERM (a hung clean-up)
# and its "kernel" runs in a session of its own, as jupyter_client starts one.
WEAKREF_SCRIPT = """
import json, subprocess, sys, time, weakref
from pathlib import Path

from taxi_duration.orchestration import stopping
from taxi_duration.runner import processes

folder = Path(sys.argv[1])
stopping.install()
kernel = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
record = folder / "kernel.json"
record.write_text(json.dumps({"pid": kernel.pid, "create_time": processes.create_time(kernel.pid)}))
ignoring = folder / "runner-ignores-sigterm"
runner = processes.start_runner_process(
    [sys.executable, "-c", "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
     "open(sys.argv[1], 'w').close(); time.sleep(600)", str(ignoring)],
    folder / "runner.log", record)
(folder / "pids.json").write_text(json.dumps({"runner": runner.pid, "kernel": kernel.pid}))
while not ignoring.exists():  # a loaded machine may not have run the runner's first line yet
    time.sleep(0.01)

class Mapped:
    pass

def removed(reference):
    (folder / "in-callback").touch()
    time.sleep(60)

mapped = Mapped()
reference = weakref.ref(mapped, removed)
del mapped  # the callback runs now, in the main thread
print(f"carried on; stop requested: {stopping.requested()}", flush=True)
runner.wait()  # as a stage waits for its runner
print(f"runner ended with {runner.returncode}", flush=True)
sys.exit(stopping.exit_code() if stopping.requested() else 0)
"""


def _gone(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_a_sigterm_swallowed_in_a_weakref_callback_still_kills_the_runner_and_its_kernel(tmp_path: Path) -> None:
    script = tmp_path / "weakref_stop.py"
    script.write_text(WEAKREF_SCRIPT)
    process = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert _wait_for(lambda: (tmp_path / "in-callback").exists(), 60), process.stderr
        pids = json.loads((tmp_path / "pids.json").read_text())
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=SIGNAL_TO_EXIT_SECONDS)
        took = time.monotonic() - signalled
    finally:
        process.kill()
    assert "Exception ignored in" in stderr and "SystemExit: 143" in stderr, stderr  # the swallow happened
    assert "carried on; stop requested: 15" in stdout, stdout + stderr
    assert "runner ended with -9" in stdout, stdout + stderr  # SIGTERM ignored: SIGKILLed after the grace
    assert process.returncode == 143 and took < STOP_DEADLINE_SECONDS, (process.returncode, took)
    assert _wait_for(lambda: _gone(pids["kernel"]) and _gone(pids["runner"]), 5), pids


WHOLE_WRITE_SCRIPT = """
import os, pathlib, sys
from papermill.iorw import papermill_io
from taxi_duration.runner.child import _write_notebooks_whole

_write_notebooks_whole()
path = os.path.join(sys.argv[1], "executed.ipynb")
handler = papermill_io.get_handler(path)
handler.write("whole", path)
real = pathlib.Path.write_text

def cut_short(self, *args, **kwargs):  # SIGTERM's SystemExit while papermill saves
    real(self, "", encoding="utf-8")
    raise SystemExit(143)

pathlib.Path.write_text = cut_short
try:
    handler.write("never", path)
except SystemExit:
    pass
print(type(handler).__name__, pathlib.Path(path).read_text(), sorted(os.listdir(sys.argv[1])))
"""


def test_a_save_cut_short_leaves_the_executed_notebook_as_it_was(tmp_path: Path) -> None:
    """The runner's papermill saves whole files: a stop mid-save keeps the previous copy (once, an empty one)."""
    folder = tmp_path / "run"
    folder.mkdir()
    completed = subprocess.run(
        [sys.executable, "-c", WHOLE_WRITE_SCRIPT, str(folder)], capture_output=True, text=True, timeout=120
    )
    assert completed.stdout.split(" ", 2) == ["WholeFileHandler", "whole", "['executed.ipynb']\n"], completed.stderr
