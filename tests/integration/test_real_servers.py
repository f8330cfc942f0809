"""The pipeline against real servers: `mlflow server` and `prefect server start` on free loopback ports.

The servers are started the way `make services` starts them (taxi_duration.servers.local_servers). The
MLflow backend is PostgreSQL when TAXI_TEST_POSTGRES_URI names a server (`.ci/start-postgres`
starts one; CI always does), else SQLite. Everything is read back the way a team reads it:
the run through MLflow's REST API (artifacts downloaded through the server), the flow run
through the Prefect client.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from pathlib import Path
from urllib.parse import urlparse, urlunparse

import nbformat
import psutil
import pytest
import requests

from taxi_duration import settings
from taxi_duration.servers import local_servers

pytestmark = [pytest.mark.integration, pytest.mark.flow]

PROJECT_DIR = Path(__file__).resolve().parents[2]
STAGES = ("01_explore", "02_features", "03_train")


@pytest.fixture
def mlflow_backend(tmp_path):
    """(kind, URI): a fresh PostgreSQL database when one is configured, else a SQLite file."""
    admin_uri = os.environ.get("TAXI_TEST_POSTGRES_URI")
    if not admin_uri:
        if os.environ.get("CI"):
            pytest.fail("CI must provide PostgreSQL: .ci/run exports TAXI_TEST_POSTGRES_URI from .ci/start-postgres")
        yield "sqlite", f"sqlite:///{tmp_path / 'mlflow.db'}"
        return
    import psycopg

    database = f"taxi_mlflow_{uuid.uuid4().hex[:12]}"
    admin = psycopg.connect(admin_uri)
    admin.autocommit = True
    with admin.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE {database}")
    parts = urlparse(admin_uri)
    try:
        yield "postgresql", urlunparse(parts._replace(path=f"/{database}"))
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
        admin.close()


@pytest.fixture
def real_servers(tmp_path, monkeypatch, mlflow_backend, free_port):
    """Both servers up on free ports, in this test's own services folder; stopped afterwards."""
    monkeypatch.setenv("TAXI_SERVICES_DIR", str(tmp_path / "services"))
    artifacts = tmp_path / "artifact-store"
    mlflow = local_servers.start(
        local_servers.mlflow_service(
            port=free_port(), backend_store_uri=mlflow_backend[1], artifacts_destination=artifacts
        )
    )
    try:
        prefect = local_servers.start(local_servers.prefect_service(port=free_port()))
    except BaseException:
        local_servers.stop("mlflow")  # a failed start leaves no server of this test behind
        raise
    yield {"mlflow": mlflow, "prefect": prefect, "artifacts": artifacts, "backend": mlflow_backend}
    for name in ("prefect", "mlflow"):
        assert local_servers.stop(name), f"{name} server was no longer running at the end of the test"
    for state in (mlflow, prefect):
        assert not local_servers._alive(state["pid"]), (
            f"{state['name']} server process {state['pid']} survived the stop"
        )


def test_pipeline_on_real_mlflow_and_prefect_servers(real_servers, tmp_path, synthetic_source):
    mlflow_url, prefect_api = real_servers["mlflow"]["env_value"], real_servers["prefect"]["env_value"]
    # As after `make services`: no server variables set; the run finds them in services.env.
    env = {
        **os.environ,
        **settings.ENVIRONMENT_DEFAULTS,
        "TAXI_OUTPUTS_DIR": str(tmp_path / "outputs"),
        "TAXI_DATA_DIR": str(tmp_path / "data"),
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
    }
    for variable in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL"):
        env.pop(variable, None)
    assert (local_servers.services_dir() / "services.env").read_text().splitlines() == [
        f"PREFECT_API_URL={prefect_api}",
        f"MLFLOW_TRACKING_URI={mlflow_url}",
    ]
    completed = subprocess.run(
        [
            sys.executable,
            str(PROJECT_DIR / "flows" / "pipeline.py"),
            "--data-source",
            str(synthetic_source),
            "--experiment",
            "real-servers",
        ],
        cwd=PROJECT_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-4000:]
    # MLflow's job runner and its huey workers stay off (services.MLFLOW_SERVER_DEFAULTS): the
    # setting MLflow reads is MLFLOW_SERVER_ENABLE_JOB_EXECUTION; a rename would bring them back.
    server_tree = psutil.Process(real_servers["mlflow"]["pid"]).children(recursive=True)
    assert not [child for child in server_tree if "huey" in " ".join(child.cmdline())], "MLflow started job workers"
    run_id = re.search(r"MLflow run\s+([0-9a-f]{32}) \(experiment 'real-servers', (\S+)\)", completed.stdout)
    assert run_id and run_id.group(2) == mlflow_url, completed.stdout
    run_id = run_id.group(1)
    flow_run_id = re.search(r"Prefect flow run\s+(\S+)/runs/flow-run/([0-9a-f-]{36})", completed.stdout)
    assert flow_run_id and flow_run_id.group(1) == prefect_api.removesuffix("/api"), completed.stdout
    flow_run_id = flow_run_id.group(2)

    # MLflow, over its REST API.
    api = f"{mlflow_url}/api/2.0/mlflow"
    run = requests.get(f"{api}/runs/get", params={"run_id": run_id}, timeout=30).json()["run"]
    assert run["info"]["status"] == "FINISHED"
    metrics = {metric["key"]: metric["value"] for metric in run["data"]["metrics"]}
    assert 0 < metrics["rmse"] < 60 and metrics["train_nnz"] > 0
    tags = {tag["key"]: tag["value"] for tag in run["data"]["tags"]}
    assert tags["prefect.flow_run_id"] == flow_run_id
    artifact_uri = run["info"]["artifact_uri"]
    assert artifact_uri.startswith("mlflow-artifacts:/"), "artifacts go through the server, not around it"
    for folder, suffixes in (("notebooks", [".ipynb"]), ("reports", [".html", ".review.html"])):
        listed = requests.get(f"{api}/artifacts/list", params={"run_id": run_id, "path": folder}, timeout=30).json()
        names = {Path(entry["path"]).name for entry in listed.get("files", [])}
        expected = {f"{stage}{suffix}" for stage in STAGES for suffix in suffixes}
        assert expected <= names, (folder, names)
    artifact_root = f"{mlflow_url}/api/2.0/mlflow-artifacts/artifacts/{artifact_uri.removeprefix('mlflow-artifacts:/')}"
    notebook = requests.get(f"{artifact_root}/notebooks/03_train.ipynb", timeout=30)
    assert notebook.status_code == 200
    executed = nbformat.reads(notebook.text, as_version=4)
    assert any(cell.get("outputs") for cell in executed.cells if cell.cell_type == "code"), "an executed notebook"
    report = requests.get(f"{artifact_root}/reports/03_train.html", timeout=30)
    assert report.status_code == 200 and "<html" in report.text.lower()
    # ...and the server really stored them in its artifact destination.
    assert list(real_servers["artifacts"].rglob("03_train.ipynb")), "artifact store is empty"

    kind, backend_uri = real_servers["backend"]
    if kind == "postgresql":
        import psycopg

        with psycopg.connect(backend_uri) as connection, connection.cursor() as cursor:
            cursor.execute("SELECT status FROM runs WHERE run_uuid = %s", (run_id,))
            assert cursor.fetchone() == ("FINISHED",), "the run is stored in PostgreSQL"

    # Prefect, through its client.
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with SyncPrefectClient(prefect_api) as client:
        flow_run = client.read_flow_run(uuid.UUID(flow_run_id))
        assert flow_run.state is not None and flow_run.state.is_completed(), flow_run.state
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])))
    # Prefect names a task run "<task>-<3 hex>" unless the task sets a run name (the notebooks do).
    states = {re.sub(r"-[0-9a-f]{3}$", "", task_run.name): task_run.state.type.value for task_run in task_runs}
    assert {"fetch-trip-files", *STAGES} <= set(states), states
    assert all(states[name] == "COMPLETED" for name in ("fetch-trip-files", *STAGES)), states

    # The run's link artifacts answer: the MLflow run page and the reports through the MLflow
    # server, the gallery from disk.
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with SyncPrefectClient(prefect_api) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.id]))
        )
    links = {
        artifact.description: re.fullmatch(r"\[.+\]\((\S+)\)", artifact.data)[1]
        for artifact in artifacts
        if artifact.task_run_id is None and artifact.key is None
    }
    assert set(links) == {
        f"MLflow run {run_id[:8]}",
        "all runs (gallery)",
        *(f"{stage} review report" for stage in STAGES),
    }
    assert links[f"MLflow run {run_id[:8]}"].startswith(f"{mlflow_url}/#/experiments/")
    for text, url in links.items():
        if url.startswith("file://"):
            assert Path(url.removeprefix("file://")).is_file(), url
            continue
        response = requests.get(url, timeout=30)
        assert response.status_code == 200, (text, url)
        if "review report" in text:
            assert (
                url.startswith(f"{mlflow_url}/get-artifact?path=reports/") and "taxi-report-header" in response.text
            ), url
