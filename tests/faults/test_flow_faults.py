"""The pipeline under faults: stopped processes, orphaned runs, a missing server, parallel runs."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient
from nbformat.v4 import new_code_cell
from terminal import TRACEBACK, assert_one_clear_failure, last_paragraph

from taxi_duration import settings
from taxi_duration.data.periods import Month
from taxi_duration.data.synthetic import generate_trips_table, write_trip_file

pytestmark = pytest.mark.flow

PROJECT_DIR = Path(__file__).resolve().parents[2]


def _processes_with(marker: str, command_part: str = "") -> list[int]:
    """Pids of live processes whose environment contains `marker` (this test's folders)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if (
                marker.encode() in (entry / "environ").read_bytes()
                and command_part.encode() in (entry / "cmdline").read_bytes()
            ):
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    found.append(int(entry.name))
        except OSError:
            continue
    return found


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture
def slow_project(tmp_path) -> Path:
    """Notebooks whose 01_explore sleeps in a cell long enough to be interrupted."""
    copy = tmp_path / "project"
    notebooks = copy / "notebooks"
    notebooks.mkdir(parents=True)
    for source in [*(PROJECT_DIR / "notebooks").glob("*.ipynb"), PROJECT_DIR / "notebooks" / "pipeline.yaml"]:
        (notebooks / source.name).write_bytes(source.read_bytes())
    explore = nbformat.read(notebooks / "01_explore.ipynb", as_version=4)
    explore.cells.insert(2, new_code_cell("import time\ntime.sleep(600)  # injected by the test"))
    nbformat.write(explore, notebooks / "01_explore.ipynb")
    return copy


def _start(isolated_stores, prefect_home, source, project: Path | None = None, *args: str) -> subprocess.Popen:
    env = {**os.environ, **settings.ENVIRONMENT_DEFAULTS, "PREFECT_HOME": str(prefect_home)}
    env.pop("PREFECT_API_URL", None)
    if project is not None:
        env["TAXI_PROJECT_DIR"] = str(project)
    return subprocess.Popen(
        [sys.executable, str(PROJECT_DIR / "flows" / "pipeline.py"), "--data-source", str(source), *args],
        cwd=PROJECT_DIR,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _runs(tracking_uri: str):
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("nyc-taxi-duration")
    return client, client.search_runs([experiment.experiment_id]) if experiment else []


def _sleeping_notebook_started(outputs: Path):
    return next(outputs.glob("green/2023-03/*/01_explore.ipynb"), None)


def test_sigterm_mid_notebook_marks_the_run_killed_and_leaves_no_process(
    isolated_stores, prefect_home, synthetic_source, slow_project
):
    process = _start(isolated_stores, prefect_home, synthetic_source, slow_project)
    executed = _wait_for(lambda: _sleeping_notebook_started(isolated_stores["outputs"]), 240, "01_explore to start")
    time.sleep(3)  # let the kernel reach the sleeping cell
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)

    assert process.returncode != 0
    client, runs = _runs(isolated_stores["tracking_uri"])
    assert [run.info.status for run in runs] == ["KILLED"]
    assert executed.is_file(), "the partial notebook is kept"
    # 02_features runs beside 01_explore: it was stopped too (or had finished), and kept.
    archived = [a.path for a in client.list_artifacts(runs[0].info.run_id, "notebooks")]
    assert "notebooks/01_explore.ipynb" in archived, stderr[-4000:]
    assert set(archived) <= {"notebooks/01_explore.ipynb", "notebooks/02_features.ipynb"}
    record = json.loads((executed.parent / "run.json").read_text())
    assert record["status"] == "KILLED"
    _wait_for(
        lambda: not _processes_with(str(isolated_stores["outputs"])), 30, "the notebook process and kernel to exit"
    )


def test_after_sigkill_the_next_start_marks_the_orphaned_run_killed(
    isolated_stores, prefect_home, synthetic_source, slow_project
):
    process = _start(isolated_stores, prefect_home, synthetic_source, slow_project)
    _wait_for(lambda: _sleeping_notebook_started(isolated_stores["outputs"]), 240, "01_explore to start")
    process.kill()
    process.wait(timeout=60)  # not communicate(): an orphaned child may hold the pipes open
    _, runs = _runs(isolated_stores["tracking_uri"])
    assert [run.info.status for run in runs] == ["RUNNING"], "nothing could close the run"
    orphan = runs[0].info.run_id
    # The notebook runner notices its parent is gone and stops its kernel. The run used the
    # persistent local Prefect server (shared by design, started without this run's
    # settings), so no temporary API server is left orphaned either.
    marker = str(isolated_stores["outputs"])
    _wait_for(
        lambda: not (_processes_with(marker, "taxi_duration.runner.child") or _processes_with(marker, "ipykernel")),
        60,
        "orphaned notebook processes to exit",
    )
    assert not _processes_with(marker, "uvicorn"), "a Prefect API server of the killed run is still running"

    # Any next start marks it, before it looks for its data: here one whose source folder is
    # empty, so it fails at once instead of training a model nobody reads.
    empty_source = isolated_stores["outputs"].parent / "empty-source"
    empty_source.mkdir()
    follow_up = _start(isolated_stores, prefect_home, empty_source, None)
    stdout, stderr = follow_up.communicate(timeout=900)
    assert follow_up.returncode == 1 and "no green trip file for 2023-03" in stderr, stderr[-3000:]
    assert f"MLflow run {orphan} was left RUNNING" in stdout + stderr
    client, _ = _runs(isolated_stores["tracking_uri"])
    killed = client.get_run(orphan)
    assert killed.info.status == "KILLED" and "was gone" in killed.data.tags["taxi.killed_reason"]


def test_unreachable_tracking_server_fails_early_and_clearly(isolated_stores, pipeline_cli, synthetic_source):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free_port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{free_port}"
    completed = pipeline_cli(
        "--data-source",
        str(synthetic_source),
        env={"MLFLOW_TRACKING_URI": url, "TAXI_OUTPUTS_DIR": str(isolated_stores["outputs"])},
    )
    assert completed.returncode == 1
    assert_one_clear_failure(
        completed.stdout,
        completed.stderr,
        "error: the MLflow tracking server at",
        f"the MLflow tracking server at {url} did not answer its health check",
    )
    assert not isolated_stores["outputs"].exists()


@pytest.mark.long
def test_two_months_and_the_same_month_at_once_all_finish(isolated_stores, prefect_home, synthetic_source):
    processes = [
        _start(isolated_stores, prefect_home, synthetic_source, None, "--month", month) for month in ("3", "3", "4")
    ]
    results = [process.communicate(timeout=900) for process in processes]
    for process, (stdout, stderr) in zip(processes, results, strict=True):
        assert process.returncode == 0, stderr[-3000:]
        assert "database is locked" not in stdout + stderr
    _, runs = _runs(isolated_stores["tracking_uri"])
    assert sorted(run.data.tags["taxi.train_month"] for run in runs) == ["2023-03", "2023-03", "2023-04"]
    assert {run.info.status for run in runs} == {"FINISHED"}
    folders = {run.data.tags["taxi.run_dir"] for run in runs}
    assert len(folders) == 3 and all(Path(folder, "03_train.review.html").is_file() for folder in folders)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--year", "2099"], "has not ended yet"),
        (["--year", "2009", "--month", "1", "--color", "green"], "from 2013-08 on"),
        (["--data-source", "ftp://example.org/trips"], "neither an http(s) URL nor a folder"),
        (["--month", "13"], "month must be between 1 and 12, got 13"),
    ],
)
def test_more_bad_input_rejected_before_anything(isolated_stores, pipeline_cli, args, message):
    completed = pipeline_cli(
        *args,
        env={
            "MLFLOW_TRACKING_URI": isolated_stores["tracking_uri"],
            "TAXI_OUTPUTS_DIR": str(isolated_stores["outputs"]),
        },
    )
    assert completed.returncode == 2
    assert len(completed.stderr.strip().splitlines()) == 1, completed.stderr
    assert_one_clear_failure(completed.stdout, completed.stderr, "error: ", message)
    assert not isolated_stores["outputs"].exists()


def test_a_month_missing_from_the_folder_names_the_path(isolated_stores, pipeline_cli, tmp_path, synthetic_source):
    source = tmp_path / "only-march"
    source.mkdir()
    (source / "green_tripdata_2023-03.parquet").write_bytes(
        (synthetic_source / "green_tripdata_2023-03.parquet").read_bytes()
    )
    completed = pipeline_cli(
        "--data-source",
        str(source),
        env={
            "MLFLOW_TRACKING_URI": isolated_stores["tracking_uri"],
            "TAXI_OUTPUTS_DIR": str(isolated_stores["outputs"]),
        },
    )
    assert completed.returncode == 1
    assert_one_clear_failure(
        completed.stdout,
        completed.stderr,
        "Pipeline failed: ",
        f"no green trip file for 2023-04 at {source / 'green_tripdata_2023-04.parquet'}",
    )
    assert completed.stderr.count("Retry") == 0 and "AwaitingRetry" not in completed.stdout + completed.stderr
    _, runs = _runs(isolated_stores["tracking_uri"])
    assert [run.info.status for run in runs] == ["FAILED"]


# One end-to-end case for each way a notebook can end that the runner tells apart: a cell that
# raised, an early stop, a dead kernel, a timeout. The other ways a cell can raise (an IPython
# error, a syntax error, a failing shell escape, a keyboard interrupt) reach the flow as the
# same one-line failure message as `raises`; that each such message names its exception and
# is one line is checked where it is made, without a flow run per kind
# (tests/faults/test_notebook_faults.py::test_every_failure_kind_names_its_exception_and_the_cells_first_line).
@pytest.mark.parametrize(
    ("cell", "extra_env", "message"),
    [
        ("import sys\nsys.exit(0)", {}, "stopped early at cell 4: the cell called sys.exit(0) (SystemExit: 0)"),
        (
            'raise ValueError("fare_amount has 3 negative values")',
            {},
            "cell 4 raised ValueError: fare_amount has 3 negative values",
        ),
        ("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)", {}, "kernel died"),
        # Long enough for 02_features, running beside it, to finish on a busy machine.
        ("import time\ntime.sleep(600)", {"TAXI_NOTEBOOK_TIMEOUT": "25"}, "did not finish within 25 s"),
    ],
    ids=["sys-exit-0", "raises", "kernel-killed", "hung-cell"],
)
def test_notebook_faults_through_the_flow(
    isolated_stores, pipeline_cli, synthetic_source, tmp_path, cell, extra_env, message
):
    project = tmp_path / "project"
    (project / "notebooks").mkdir(parents=True)
    for source in [*(PROJECT_DIR / "notebooks").glob("*.ipynb"), PROJECT_DIR / "notebooks" / "pipeline.yaml"]:
        (project / "notebooks" / source.name).write_bytes(source.read_bytes())
    explore = nbformat.read(project / "notebooks" / "01_explore.ipynb", as_version=4)
    explore.cells.insert(3, new_code_cell(cell))
    nbformat.write(explore, project / "notebooks" / "01_explore.ipynb")

    started = time.monotonic()
    completed = pipeline_cli(
        "--data-source",
        str(synthetic_source),
        env={
            "MLFLOW_TRACKING_URI": isolated_stores["tracking_uri"],
            "TAXI_OUTPUTS_DIR": str(isolated_stores["outputs"]),
            "TAXI_PROJECT_DIR": str(project),
            **extra_env,
        },
    )

    assert completed.returncode == 1
    assert "01_explore.ipynb failed" in completed.stderr and message in completed.stderr
    # One paragraph, not tracebacks: from the first line reporting the failure to the exit.
    lines = completed.stderr.strip().splitlines()
    first = next(index for index, line in enumerate(lines) if "01_explore" in line and "ERROR" in line)
    assert len(lines) - first <= 15, "\n".join(lines[first:])
    assert_one_clear_failure(
        completed.stdout, completed.stderr, "Pipeline failed: notebook 01_explore.ipynb failed: ", message
    )
    client, runs = _runs(isolated_stores["tracking_uri"])
    assert [run.info.status for run in runs] == ["FAILED"]
    run_id = runs[0].info.run_id
    # 02_features ran beside it and finished; 03_train never started.
    assert [a.path for a in client.list_artifacts(run_id, "notebooks")] == [
        "notebooks/01_explore.ipynb",
        "notebooks/02_features.ipynb",
    ]
    assert sorted(a.path for a in client.list_artifacts(run_id, "reports")) == [
        "reports/01_explore.html",
        "reports/01_explore.review.html",
        "reports/02_features.html",
        "reports/02_features.review.html",
    ]
    review = next(isolated_stores["outputs"].glob("green/2023-03/*/01_explore.review.html")).read_text()
    assert "This notebook failed" in review
    marker = str(isolated_stores["outputs"])
    assert not (_processes_with(marker, "ipykernel") or _processes_with(marker, "taxi_duration.runner.child"))
    if extra_env:
        assert time.monotonic() - started < int(extra_env["TAXI_NOTEBOOK_TIMEOUT"]) + 120, "the timeout bounds the run"


def _empty_month(path: Path) -> None:
    pq.write_table(generate_trips_table("green", Month(2023, 4), 0), path)


def _yellow_file(path: Path) -> None:
    (path.parent / "yellow").mkdir()
    write_trip_file(path.parent / "yellow", "yellow", Month(2023, 4), 50).rename(path)


# A bad file in the data source: an empty month, and a yellow-taxi file under a green one's name
# (run with --verbose: the terminal then shows the traceback too, before the same paragraph).
@pytest.mark.parametrize(
    ("make_bad_file", "words", "verbose"),
    [(_empty_month, "has no rows", False), (_yellow_file, "lacks the column(s) lpep_pickup_datetime", True)],
    ids=["empty-month", "mislabelled-month-verbose"],
)
def test_a_bad_file_in_the_source_fails_the_run_naming_it(
    isolated_stores, pipeline_cli, tmp_path, synthetic_source, make_bad_file, words, verbose
):
    source = tmp_path / "source"
    source.mkdir()
    (source / "green_tripdata_2023-03.parquet").write_bytes(
        (synthetic_source / "green_tripdata_2023-03.parquet").read_bytes()
    )
    bad = source / "green_tripdata_2023-04.parquet"
    make_bad_file(bad)
    bad_bytes = bad.read_bytes()
    completed = pipeline_cli(
        "--data-source",
        str(source),
        *(["--verbose"] if verbose else []),
        env={
            "MLFLOW_TRACKING_URI": isolated_stores["tracking_uri"],
            "TAXI_OUTPUTS_DIR": str(isolated_stores["outputs"]),
        },
    )

    assert completed.returncode == 1
    if verbose:
        assert TRACEBACK in completed.stderr and "TripFileInvalid" in completed.stderr, completed.stderr[-3000:]
        paragraph = last_paragraph(completed.stderr)
        assert paragraph.startswith("Pipeline failed: ") and words in paragraph, completed.stderr[-3000:]
    else:
        paragraph = assert_one_clear_failure(completed.stdout, completed.stderr, "Pipeline failed: ", words)
    assert str(bad) in paragraph and "left untouched" in paragraph
    assert bad.read_bytes() == bad_bytes, "the user's own file is left as it was"
    _, runs = _runs(isolated_stores["tracking_uri"])
    assert [run.info.status for run in runs] == ["FAILED"]
