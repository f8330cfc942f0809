"""Shared fixtures: real TLC files when present, small synthetic files always, isolated stores."""

from __future__ import annotations

import datetime as dt
import fcntl
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest

from taxi_duration import settings
from taxi_duration.data.periods import Month
from taxi_duration.data.synthetic import write_trip_file
from taxi_duration.servers import local_servers

# As the entry points do, before anything here imports Prefect or XGBoost: the tests that run
# the package in this process get the same library defaults as the runs they start.
settings.apply_environment_defaults()

PROJECT_DIR = Path(__file__).resolve().parents[1]
REAL_DATA_DIR = Path(os.environ.get("TAXI_REAL_DATA_DIR", PROJECT_DIR.parent / "shared" / "data" / "tlc"))
SYNTHETIC_ROWS = 3000


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def free_port_outside_the_ephemeral_range() -> int:
    """A free loopback port below Linux's ephemeral range (32768-60999), for a server started
    long after its port is chosen: the OS never hands such a port to another process's socket
    bound to port 0 meanwhile (Dask's workers and clients open dozens)."""
    import random

    candidates = random.sample(range(20000, 32000), 200)
    for port in candidates:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    return free_port()


@contextmanager
def script_as_module(path: Path, name: str) -> Iterator[ModuleType]:
    """A script (flows/ and .devcontainer/ are no packages) imported as module `name`, then forgotten."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(name, None)


@pytest.fixture(name="script_as_module", scope="session")
def script_as_module_fixture():
    return script_as_module


@pytest.fixture(name="free_port", scope="session")
def free_port_fixture():
    """`free_port()`: a loopback port nobody listens on right now, for a server a test starts.

    Below the ephemeral range: while a server starts, the kernels, Dask workers and clients of
    the tests beside it bind ports of their own, and one of them could take an ephemeral port
    chosen for the server (a test once found a kernel's socket on its Prefect server's port).
    """
    return free_port_outside_the_ephemeral_range


SERVICE_KNOBS = ("TAXI_SERVICES_DIR", "TAXI_PREFECT_PORT", "TAXI_MLFLOW_PORT")
_saved_service_knobs: dict[str, str | None] = {}


def pytest_configure(config):
    """The tests' own local servers folder and ports, never the user's `.services/` or 4200.

    Pipeline runs start the persistent local Prefect server there on first use (as `make run`
    does) and reuse it. Under pytest-xdist the controlling process chooses them before the
    workers start, so the workers (which inherit its environment) share one server.
    """
    if hasattr(config, "workerinput"):
        return  # an xdist worker: the controller has set them
    _saved_service_knobs.update({key: os.environ.get(key) for key in SERVICE_KNOBS})
    os.environ["TAXI_SERVICES_DIR"] = tempfile.mkdtemp(prefix="taxi-test-services-")
    os.environ["TAXI_PREFECT_PORT"] = str(free_port_outside_the_ephemeral_range())
    os.environ["TAXI_MLFLOW_PORT"] = str(free_port_outside_the_ephemeral_range())


def pytest_unconfigure(config):
    """The controller stops the servers once every worker is done, and forgets the folder."""
    if hasattr(config, "workerinput") or not _saved_service_knobs:
        return
    for name in local_servers.SERVICE_FACTORIES:
        local_servers.stop(name)
    shutil.rmtree(os.environ["TAXI_SERVICES_DIR"], ignore_errors=True)
    for key, value in _saved_service_knobs.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


END_TO_END_MARKERS = ("flow", "integration", "browser", "realdata", "notebooks")


def pytest_collection_modifyitems(items):
    """The long tests first, then the other end-to-end ones, the quick unit tests last (a stable
    sort: files keep their order).

    pytest-xdist shares tests out in this order: what is left at the end is quick, so both
    workers finish together rather than one alone on a long test.
    """

    def rank(item) -> int:
        if item.get_closest_marker("long"):
            return 0
        return 1 if any(item.get_closest_marker(name) for name in END_TO_END_MARKERS) else 2

    items.sort(key=rank)


@pytest.fixture(autouse=True)
def sys_path_as_it_was():
    """Each test leaves sys.path as it found it.

    Loading the servable model prepends its code folder (a copy of taxi_duration) to sys.path,
    and Dask's worker processes are spawned with this process's sys.path: a later test's
    workers then imported that copy, and looked for the notebooks beside it.
    """
    saved = list(sys.path)
    yield
    sys.path[:] = saved


@pytest.fixture(scope="session", autouse=True)
def no_tracking_files_in_the_checkout():
    """Each test keeps MLflow's files in its own folder. A `./mlruns` that appears in the checkout
    means a test made an experiment without an artifact location (MLflow's default is relative
    to the working directory); under xdist it also breaks the benchmark's untouched-stores check."""
    existed = (PROJECT_DIR / "mlruns").exists()
    yield
    assert existed or not (PROJECT_DIR / "mlruns").exists(), (
        "a test wrote MLflow artifacts into the checkout's ./mlruns"
    )


@pytest.fixture(scope="session")
def real_tlc_dir() -> Path:
    """The real green-taxi files beside the project; the test is skipped when they are absent."""
    needed = [REAL_DATA_DIR / f"green_tripdata_2023-0{month}.parquet" for month in (3, 4)]
    missing = [str(path) for path in needed if not path.is_file()]
    if missing:
        pytest.skip(f"real TLC files not present: {', '.join(missing)}")
    return REAL_DATA_DIR


@pytest.fixture(scope="session")
def synthetic_source(tmp_path_factory) -> Path:
    """A folder of small TLC-shaped files: both colours, 2023-02 to 2023-05."""
    folder = tmp_path_factory.mktemp("synthetic-tlc")
    for color in ("green", "yellow"):
        month = Month(2023, 2)
        while month <= Month(2023, 5):
            write_trip_file(folder, color, month, SYNTHETIC_ROWS, seed=7)
            month = month.next()
    return folder


@pytest.fixture(scope="session")
def empty_tracking_store(tmp_path_factory) -> Path:
    """An SQLite MLflow store with its schema made and nothing else, to copy for each test.

    MLflow builds a new SQLite store by running every schema migration, seconds of CPU in
    each pipeline a test starts; a copy of this file is what that leaves, made once.
    """
    database = tmp_path_factory.mktemp("empty-tracking-store") / "mlflow.db"
    from mlflow.tracking import MlflowClient

    MlflowClient(f"sqlite:///{database}").search_experiments(max_results=1)
    return database


@pytest.fixture
def isolated_stores(request, tmp_path, monkeypatch, empty_tracking_store) -> dict[str, Path | str]:
    """MLflow, outputs and the download cache in this test's temporary folder.

    The MLflow store starts as a copy of `empty_tracking_store`; a test marked
    `no_tracking_store` starts without one, to check that nothing creates it.
    """
    stores = {
        "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "outputs": tmp_path / "outputs",
        "data": tmp_path / "data",
    }
    if request.node.get_closest_marker("no_tracking_store") is None:
        shutil.copyfile(empty_tracking_store, tmp_path / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", stores["tracking_uri"])
    monkeypatch.setenv("TAXI_OUTPUTS_DIR", str(stores["outputs"]))
    monkeypatch.setenv("TAXI_DATA_DIR", str(stores["data"]))
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.delenv("TAXI_DATA_SOURCE", raising=False)
    for key, value in settings.ENVIRONMENT_DEFAULTS.items():
        monkeypatch.setenv(key, value)
    return stores


FLOW_TIMEOUT = 900


@pytest.fixture(scope="session")
def prefect_home(tmp_path_factory) -> Path:
    """One Prefect home for the session's flow runs, away from the user's ~/.prefect."""
    return tmp_path_factory.mktemp("prefect-home")


@pytest.fixture(scope="session")
def pipeline_cli(prefect_home):
    """Run `python flows/pipeline.py ARGS` (or another flows/ `script`) as a user would, with `env` on top of ours."""

    def run(*args: str, env: dict[str, str], script: str = "pipeline.py") -> subprocess.CompletedProcess:
        full_env = {**os.environ, **settings.ENVIRONMENT_DEFAULTS, "PREFECT_HOME": str(prefect_home), **env}
        full_env.pop("PREFECT_API_URL", None)  # the embedded default: no server to install
        return subprocess.run(
            [sys.executable, str(PROJECT_DIR / "flows" / script), *args],
            cwd=PROJECT_DIR,
            env=full_env,
            capture_output=True,
            text=True,
            timeout=FLOW_TIMEOUT,
        )

    return run


def once_per_test_run(tmp_path_factory, name: str, produce) -> Path:
    """A folder that `produce(folder)` fills once per `make test`, whichever process asks first.

    Under pytest-xdist each worker is its own session: the first worker to ask produces the
    folder in the run's shared temporary root while the others wait on a lock, then all read it.
    Without xdist it is an ordinary session folder.
    """
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        folder = tmp_path_factory.mktemp(name)
        produce(folder)
        return folder
    folder = tmp_path_factory.getbasetemp().parent / name  # shared by the workers of this run
    with open(f"{folder}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / ".complete").exists():  # absent, or left half-made by a worker that failed
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            produce(folder)
            (folder / ".complete").touch()
    return folder


def flow_run_task_runs(prefect_api: str, flow_run_id: str) -> list:
    """The task runs of a flow run, read from the Prefect server it reported to."""
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with SyncPrefectClient(prefect_api) as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


def flow_run_artifacts(prefect_api: str, flow_run_id: str) -> list:
    """The artifacts of a flow run (its own and its task runs'), read from the Prefect server."""
    import uuid

    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with SyncPrefectClient(prefect_api) as client:
        return client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[uuid.UUID(str(flow_run_id))]))
        )


def local_prefect_api() -> str:
    """The API of the tests' local Prefect server, which the pipeline runs report to."""
    server = local_servers.read_state("prefect")
    assert server is not None, "a pipeline run should have started the tests' local Prefect server"
    return server["env_value"]


def notebook_task_windows(prefect_api: str, flow_run_id: str) -> dict[str, tuple[dt.datetime, dt.datetime]]:
    """(start, end) of each notebook task run of a flow run, read from the Prefect server it used."""
    return {
        run.name: (run.start_time, run.end_time)
        for run in flow_run_task_runs(prefect_api, flow_run_id)
        if run.name in NOTEBOOK_STAGES
    }


NOTEBOOK_STAGES = ("01_explore", "02_features", "03_train")


@pytest.fixture(name="prefect_reads", scope="session")
def prefect_reads_fixture():
    """Read-backs from the tests' local Prefect server: `.api()`, `.task_runs(api, id)`, `.artifacts(api, id)`."""
    from types import SimpleNamespace

    return SimpleNamespace(api=local_prefect_api, task_runs=flow_run_task_runs, artifacts=flow_run_artifacts)


@pytest.fixture(name="notebook_task_windows", scope="session")
def notebook_task_windows_fixture():
    """`notebook_task_windows(prefect_api, flow_run_id)`: when each notebook's task run ran."""
    return notebook_task_windows


@dataclass(frozen=True)
class FinishedRun:
    """Where one finished pipeline run left its results."""

    tracking_uri: str
    outputs: Path
    # (start, end) of each notebook's task run: read when the run finished, because the Prefect
    # server it reported to belongs to the worker that made it.
    task_windows: dict[str, tuple[dt.datetime, dt.datetime]]


@pytest.fixture(scope="session")
def green_run(tmp_path_factory, pipeline_cli, synthetic_source, empty_tracking_store) -> FinishedRun:
    """One real pipeline run (CLI, SQLite MLflow, synthetic green 2023-03), as `make run` leaves it.

    Shared by the tests that only read its results (the browser tests, the stage overlap):
    made once per `make test`, by the first worker that needs it.
    """

    def produce(root: Path) -> None:
        shutil.copyfile(empty_tracking_store, root / "mlflow.db")
        completed = pipeline_cli(
            "--data-source",
            str(synthetic_source),
            env={
                "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
                "TAXI_OUTPUTS_DIR": str(root / "outputs"),
                "TAXI_DATA_DIR": str(root / "data"),
                "TAXI_OVERLAP_MAX_TRIPS": "1000000",
            },
        )
        assert completed.returncode == 0, completed.stderr[-3000:]
        (record,) = (json.loads(path.read_text()) for path in (root / "outputs").glob("green/2023-03/*/run.json"))
        windows = notebook_task_windows(local_prefect_api(), record["prefect_flow_run_id"])
        (root / "task-windows.json").write_text(
            json.dumps({stage: [start.isoformat(), end.isoformat()] for stage, (start, end) in windows.items()})
        )

    root = once_per_test_run(tmp_path_factory, "green-run", produce)
    windows = json.loads((root / "task-windows.json").read_text())
    return FinishedRun(
        tracking_uri=f"sqlite:///{root / 'mlflow.db'}",
        outputs=root / "outputs",
        task_windows={
            stage: tuple(dt.datetime.fromisoformat(moment) for moment in pair) for stage, pair in windows.items()
        },
    )


def stores_in(root: Path, empty_tracking_store: Path) -> dict[str, str]:
    """A run's MLflow store (a copy of the empty one), outputs and download cache in `root`, as environment."""
    shutil.copyfile(empty_tracking_store, root / "mlflow.db")
    return {
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
        "TAXI_OUTPUTS_DIR": str(root / "outputs"),
        "TAXI_DATA_DIR": str(root / "data"),
    }


@dataclass(frozen=True)
class RealRun:
    """The real reference run (green 2023-03, validated on 2023-04), then 2023-05 scored with its champion."""

    tracking_uri: str
    outputs: Path
    data: Path  # the real files' folder
    training_stdout: str
    scoring_stdout: str


@pytest.fixture(scope="session")
def real_run(tmp_path_factory, pipeline_cli, real_tlc_dir, empty_tracking_store) -> RealRun:
    """`make run` then `make score YEAR=2023 MONTH=5` on the real files, made once per `make test`.

    Shared by the tests that read them: the reference figures, the scoring report and
    predictions, the champion served over HTTP.
    """
    if not (real_tlc_dir / "green_tripdata_2023-05.parquet").is_file():
        pytest.skip(f"real TLC file not present: {real_tlc_dir / 'green_tripdata_2023-05.parquet'}")

    def produce(root: Path) -> None:
        env = stores_in(root, empty_tracking_store)
        trained = pipeline_cli("--year", "2023", "--month", "3", "--data-source", str(real_tlc_dir), env=env)
        assert trained.returncode == 0, trained.stderr[-3000:]
        (root / "training.out").write_text(trained.stdout)
        scored = pipeline_cli(
            "--year", "2023", "--month", "5", "--data-source", str(real_tlc_dir), env=env, script="score.py"
        )
        assert scored.returncode == 0, scored.stderr[-3000:]
        (root / "scoring.out").write_text(scored.stdout)

    root = once_per_test_run(tmp_path_factory, "real-run", produce)
    return RealRun(
        tracking_uri=f"sqlite:///{root / 'mlflow.db'}",
        outputs=root / "outputs",
        data=real_tlc_dir,
        training_stdout=(root / "training.out").read_text(),
        scoring_stdout=(root / "scoring.out").read_text(),
    )


REVIEWER_EDIT = "A reviewer's note, added to 03_train.ipynb before the 2023-02 run."


def add_line_to_markdown_cell(notebook: Path, heading: str, line: str) -> None:
    """Append `line` to the markdown cell that starts with `heading`: one small, visible edit."""
    content = json.loads(notebook.read_text())
    (cell,) = [
        cell
        for cell in content["cells"]
        if cell["cell_type"] == "markdown" and "".join(cell["source"]).startswith(heading)
    ]
    cell["source"] = "".join(cell["source"]).rstrip("\n") + "\n" + line
    notebook.write_text(json.dumps(content, indent=1, ensure_ascii=False) + "\n")


@dataclass(frozen=True)
class RealMonths:
    """Two real pipeline runs, green 2023-01 then 2023-02; the second ran an edited 03_train.ipynb."""

    tracking_uri: str
    outputs: Path
    project: Path  # the checkout copy (notebooks/ only) the 2023-02 run executed
    older: Path  # the run folders
    newer: Path
    edit: str = REVIEWER_EDIT  # the line added to 03_train.ipynb


# The month-over-month tests check that a comparison reports what each run recorded, not the
# reference figures (real_run does): every REAL_MONTHS_STRIDE-th trip of each real file, with
# TLC's own columns, types and values, keeps their two runs and a reopened training a fraction
# of a full month's cost.
REAL_MONTHS_STRIDE = 5


def every_nth_trip(source: Path, destination: Path, stride: int) -> None:
    """Copy a TLC parquet file keeping every `stride`-th row, its schema unchanged."""
    import pyarrow.parquet as pq

    table = pq.read_table(source)
    destination.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table.take(list(range(0, table.num_rows, stride))), destination)


@pytest.fixture(scope="session")
def real_months(tmp_path_factory, pipeline_cli, real_tlc_dir, empty_tracking_store) -> RealMonths:
    """`make run MONTH=1`, an edit to 03_train.ipynb, then `make run MONTH=2`, on the real files
    (every REAL_MONTHS_STRIDE-th trip of each).

    The second run compares itself with the first (the automatic previous-month comparison);
    made once per `make test`, for the comparison, reopen and browser tests.
    """
    needed = [real_tlc_dir / f"green_tripdata_2023-0{month}.parquet" for month in (1, 2, 3)]
    missing = [str(path) for path in needed if not path.is_file()]
    if missing:
        pytest.skip(f"real TLC files not present: {', '.join(missing)}")

    def produce(root: Path) -> None:
        source = root / "source"
        for path in needed:
            every_nth_trip(path, source / path.name, REAL_MONTHS_STRIDE)
        env = stores_in(root, empty_tracking_store)
        first = pipeline_cli("--year", "2023", "--month", "1", "--data-source", str(source), env=env)
        assert first.returncode == 0, first.stderr[-3000:]
        shutil.copytree(PROJECT_DIR / "notebooks", root / "project" / "notebooks")
        add_line_to_markdown_cell(root / "project" / "notebooks" / "03_train.ipynb", "## Errors", REVIEWER_EDIT)
        second = pipeline_cli(
            "--year",
            "2023",
            "--month",
            "2",
            "--data-source",
            str(source),
            env={**env, "TAXI_PROJECT_DIR": str(root / "project")},
        )
        assert second.returncode == 0, second.stderr[-3000:]

    root = once_per_test_run(tmp_path_factory, "real-months", produce)
    (older,) = (root / "outputs" / "green" / "2023-01").iterdir()
    (newer,) = (root / "outputs" / "green" / "2023-02").iterdir()
    return RealMonths(
        tracking_uri=f"sqlite:///{root / 'mlflow.db'}",
        outputs=root / "outputs",
        project=root / "project",
        older=older,
        newer=newer,
    )
