"""Backfill on Dask: each month in a worker process, one Prefect API, one MLflow store."""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from mlflow.tracking import MlflowClient

from taxi_duration.servers import endpoints

pytestmark = pytest.mark.flow

PROJECT_DIR = Path(__file__).resolve().parents[2]
FLOWS_DIR = PROJECT_DIR / "flows"
SRC_DIR = PROJECT_DIR / "src"  # where the editable install finds the package
BACKFILL_TIMEOUT = 1800
# A table row of a month run on Dask: month, status, RMSE, reused stages, worker, MLflow run id.
DASK_ROW = re.compile(
    r"^(?P<month>\d{4}-\d\d)\s+FINISHED\s+[\d.]+\s+.*?(?P<address>tcp://[\d.:]+) pid (?P<pid>\d+)\s+(?P<run>[0-9a-f]{32})$"
)


@pytest.fixture(scope="module")
def prefect_server() -> str:
    """The API URL of the session's local Prefect server (stopped when `make test` ends: tests/conftest.py)."""
    return endpoints.ensure_prefect_server()


def _start_backfill(prefect_home: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`python flows/backfill.py ARGS` with the isolated stores already in os.environ."""
    full_env = {**os.environ, "PREFECT_HOME": str(prefect_home)}
    full_env.pop("PREFECT_API_URL", None)
    full_env.pop("TAXI_DASK_ADDRESS", None)
    full_env.update(env or {})
    return subprocess.Popen(
        [sys.executable, str(FLOWS_DIR / "backfill.py"), *args],
        cwd=PROJECT_DIR,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(process: subprocess.Popen, timeout: float = BACKFILL_TIMEOUT) -> tuple[str, str]:
    stdout, stderr = process.communicate(timeout=timeout)
    return stdout, stderr


def _dask_rows(stdout: str) -> dict[str, re.Match]:
    return {match["month"]: match for line in stdout.splitlines() if (match := DASK_ROW.match(line))}


def _assert_mlflow_runs(tracking_uri: str, rows: dict[str, re.Match]) -> set[str]:
    """Each month has a FINISHED MLflow run of its own; returns their Prefect flow run ids."""
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("nyc-taxi-duration")
    runs = {run.info.run_id: run for run in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {row["run"] for row in rows.values()}
    for month, row in rows.items():
        run = runs[row["run"]]
        assert run.data.tags["taxi.train_month"] == month
        assert run.info.status == "FINISHED"
    return {run.data.tags["prefect.flow_run_id"] for run in runs.values()}


@pytest.mark.long
def test_local_dask_cluster_runs_each_month_in_a_worker_process(tmp_path, isolated_stores, synthetic_source):
    # Prefect's temporary server (no PREFECT_API_URL, no local server to adopt): the one the
    # backfill starts must serve its workers too. (With a server, see the --dask-address test.)
    prefect_home = tmp_path / "prefect-home"
    process = _start_backfill(
        prefect_home,
        "--from",
        "2023-02",
        "--to",
        "2023-03",
        "--data-source",
        str(synthetic_source),
        "--dask",
        "--max-parallel",
        "2",
        env={"TAXI_PREFECT_SERVER": "ephemeral", "TAXI_SERVICES_DIR": str(tmp_path / "no-services")},
    )
    stdout, stderr = _finish(process)
    assert process.returncode == 0, stdout[-4000:] + "\n--- stderr ---\n" + stderr[-3000:]
    assert "2 of 2 months finished" in stdout
    rows = _dask_rows(stdout)
    assert sorted(rows) == ["2023-02", "2023-03"], stdout

    # Two worker processes of a local cluster (one thread each, so two months at once are in
    # two processes; queueing more months than workers is the thread backfill's case),
    # neither of them the backfill's own process.
    pids = {int(row["pid"]) for row in rows.values()}
    assert len(pids) == 2 and process.pid not in pids
    assert {row["address"].rsplit(":", 1)[0] for row in rows.values()} == {"tcp://127.0.0.1"}
    month_flow_runs = _assert_mlflow_runs(isolated_stores["tracking_uri"], rows)

    # One Prefect server for everyone (a worker without the URL would start its own), and the
    # months' flow runs are subflows of the backfill's flow run in it.
    assert stderr.count("Starting temporary server on") == 1, stderr[-3000:]
    with sqlite3.connect(prefect_home / "prefect.db") as db:
        runs = db.execute(
            "SELECT fr.id, f.name, fr.state_type, parent.flow_run_id FROM flow_run fr JOIN flow f ON f.id = fr.flow_id "
            "LEFT JOIN task_run parent ON parent.id = fr.parent_task_run_id"
        ).fetchall()
    (backfill_run,) = [run_id for run_id, name, _, _ in runs if name == "nyc-taxi-duration-backfill"]
    assert sorted(runs) == sorted(
        [(backfill_run, "nyc-taxi-duration-backfill", "COMPLETED", None)]
        + [(run_id, "nyc-taxi-duration", "COMPLETED", backfill_run) for run_id in month_flow_runs]
    )


def test_dask_address_sends_months_to_that_schedulers_workers(
    tmp_path, isolated_stores, synthetic_source, prefect_server, monkeypatch
):
    distributed = pytest.importorskip("distributed")
    # Workers spawned from this process get its environment (the isolated stores) as it is now.
    # One month on one worker shows where months go; two months in two worker processes at
    # once is the local cluster's case above.
    with distributed.LocalCluster(
        n_workers=1, threads_per_worker=1, processes=True, memory_limit=0, dashboard_address="127.0.0.1:0"
    ) as cluster:
        cluster_workers = set(cluster.scheduler_info["workers"])
        process = _start_backfill(
            tmp_path / "prefect-home",
            "--from",
            "2023-02",
            "--to",
            "2023-02",
            "--data-source",
            str(synthetic_source),
            "--dask-address",
            cluster.scheduler_address,
            env={"PREFECT_API_URL": prefect_server},
        )
        stdout, stderr = _finish(process)
    assert process.returncode == 0, stdout[-4000:] + "\n--- stderr ---\n" + stderr[-3000:]
    assert f"Dask scheduler {cluster.scheduler_address}: 1 worker thread(s)" in stdout
    rows = _dask_rows(stdout)
    assert sorted(rows) == ["2023-02"], stdout
    assert {row["address"] for row in rows.values()} <= cluster_workers
    assert process.pid not in {int(row["pid"]) for row in rows.values()}
    month_flow_runs = _assert_mlflow_runs(isolated_stores["tracking_uri"], rows)

    # The months' flow runs are in the given Prefect server, subflows of one backfill flow run.
    parents = set()
    for run_id in month_flow_runs:
        month_run = httpx.get(f"{prefect_server}/flow_runs/{run_id}").json()
        assert month_run["state_type"] == "COMPLETED"
        parents.add(httpx.get(f"{prefect_server}/task_runs/{month_run['parent_task_run_id']}").json()["flow_run_id"])
    (backfill_run_id,) = parents
    backfill_run = httpx.get(f"{prefect_server}/flow_runs/{backfill_run_id}").json()
    assert backfill_run["state_type"] == "COMPLETED"
    assert httpx.get(f"{prefect_server}/flows/{backfill_run['flow_id']}").json()["name"] == "nyc-taxi-duration-backfill"


@pytest.mark.no_tracking_store
@pytest.mark.parametrize("via", ["flag", "environment"])
def test_unreachable_dask_scheduler_fails_fast_naming_it(tmp_path, isolated_stores, synthetic_source, free_port, via):
    address = f"tcp://127.0.0.1:{free_port()}"  # nothing listens there
    args = ["--from", "2023-02", "--to", "2023-03", "--data-source", str(synthetic_source)]
    env = {"PREFECT_API_URL": "http://127.0.0.1:9/api"}  # never reached: the scheduler check comes first
    if via == "flag":
        args += ["--dask-address", address]
    else:
        env["TAXI_DASK_ADDRESS"] = address
    started = time.monotonic()
    process = _start_backfill(tmp_path / "prefect-home", *args, env=env)
    _, stderr = _finish(process, timeout=120)
    assert process.returncode == 1
    assert f"error: cannot use the Dask scheduler at {address}" in stderr
    assert "Traceback" not in stderr
    assert time.monotonic() - started < 60
    assert not Path(isolated_stores["tracking_uri"].removeprefix("sqlite:///")).exists()  # no month started


def test_dask_address_without_a_prefect_server_is_refused(tmp_path, isolated_stores, synthetic_source):
    process = _start_backfill(
        tmp_path / "prefect-home",
        "--from",
        "2023-02",
        "--to",
        "2023-02",
        "--data-source",
        str(synthetic_source),
        "--dask-address",
        "tcp://127.0.0.1:8786",
        env={"TAXI_SERVICES_DIR": str(tmp_path / "no-services")},  # no local server to adopt either
    )
    _, stderr = _finish(process, timeout=120)
    assert process.returncode == 1
    assert "--dask-address tcp://127.0.0.1:8786: the Dask workers need a Prefect server" in stderr
    assert "PREFECT_API_URL" in stderr


def test_workers_that_cannot_import_the_pipeline_are_named(
    tmp_path, isolated_stores, synthetic_source, prefect_server, monkeypatch
):
    distributed = pytest.importorskip("distributed")
    # Workers spawned from here get this sys.path: without src/ they cannot import the project,
    # as on a machine where it is not installed.
    monkeypatch.setattr(sys, "path", [entry for entry in sys.path if entry and Path(entry).resolve() != SRC_DIR])
    with distributed.LocalCluster(
        n_workers=1, threads_per_worker=1, processes=True, memory_limit=0, dashboard_address="127.0.0.1:0"
    ) as cluster:
        (worker,) = cluster.scheduler_info["workers"]
        process = _start_backfill(
            tmp_path / "prefect-home",
            "--from",
            "2023-02",
            "--to",
            "2023-02",
            "--data-source",
            str(synthetic_source),
            "--dask-address",
            cluster.scheduler_address,
            env={"PREFECT_API_URL": prefect_server},
        )
        _, stderr = _finish(process, timeout=300)
    assert process.returncode == 1
    assert f"Dask workers at {cluster.scheduler_address} cannot import the pipeline flow" in stderr
    assert f"{worker}: ModuleNotFoundError: No module named 'taxi_duration'" in stderr
