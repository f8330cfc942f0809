"""The team deployment of docker-compose.yaml, run without Docker: every service as a process here.

PostgreSQL (TAXI_TEST_POSTGRES_URI, from .ci/start-postgres) gets its two databases from
deploy/postgres/init-databases.sh, as the postgres image runs it. moto's standalone S3 server
stands in for MinIO (docs/servers.md), with the bucket minio-init makes. The MLflow server,
the Prefect server, the deploy step and the worker run the compose file's own command lines
and environments (compose_topology), in a copy of what the Dockerfile copies into /app.
Then three deployment runs go through Prefect's API, and everything is read back from where
a team would look: Prefect's API, MLflow's REST API, the bucket, and both servers' tables.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlparse

import pytest
import requests

from taxi_duration.tracking import gate_lock

from .compose_topology import PROJECT_DIR, Processes, Topology, compose_services

pytestmark = [pytest.mark.integration, pytest.mark.flow]

STAGES = ("01_explore", "02_features", "03_train")
BIN = Path(sys.executable).parent
RUN_TIMEOUT = 600
# What the compose services' environments hold; a name added or removed there fails the test.
MLFLOW_ENVIRONMENT = {
    "PGPASSWORD",
    "MLFLOW_S3_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION",
}
PREFECT_ENVIRONMENT = {
    "PREFECT_SERVER_DATABASE_CONNECTION_URL",
    "PREFECT_SERVER_API_AUTH_STRING",
    "PREFECT_API_AUTH_STRING",
    "PREFECT_UI_API_URL",
    "PREFECT_SERVER_ANALYTICS_ENABLED",
    "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT",
}
PIPELINE_ENVIRONMENT = {
    "PREFECT_API_URL",
    "PREFECT_API_AUTH_STRING",
    "MLFLOW_TRACKING_URI",
    "TAXI_DATA_SOURCE",
    "PREFECT_SERVER_ANALYTICS_ENABLED",
    "MLFLOW_DISABLE_TELEMETRY",
    "DO_NOT_TRACK",
}
WORKER_ENVIRONMENT = PIPELINE_ENVIRONMENT | {"PREFECT_WORKER_WEBSERVER_HOST", "PREFECT_WORKER_WEBSERVER_PORT"}
# The Dockerfile's install steps the worker's environment stands for: the runtime lock, exactly, then the project.
DOCKERFILE_INSTALL = (
    "python -m venv /app/.venv && uv pip sync --require-hashes requirements/runtime.txt",
    "uv pip install --no-deps -e .",
)
TEST_MARK = "taxi-duration team-deployment test"


def dockerfile_lines(instruction: str) -> list[str]:
    text = (PROJECT_DIR / "Dockerfile").read_text().replace("\\\n", " ")
    return [line.split(None, 1)[1].strip() for line in text.splitlines() if line.startswith(instruction + " ")]


def image_copy(app: Path) -> None:
    """What the Dockerfile copies into /app (its COPY lines, each into a folder), copied into `app`."""
    for line in dockerfile_lines("COPY"):
        *sources, destination = line.split()
        assert destination.endswith("/"), f"the Dockerfile copies into {destination!r}; the test copies into folders"
        for source in sources:
            if source.endswith("/"):
                shutil.copytree(
                    PROJECT_DIR / source,
                    app / destination,
                    dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__", "reopened", ".ipynb_checkpoints"),
                )
            else:
                (app / destination).mkdir(parents=True, exist_ok=True)
                shutil.copy(PROJECT_DIR / source, app / destination)


def test_the_worker_image_installs_what_the_test_environment_has():
    runs = dockerfile_lines("RUN")
    for step in DOCKERFILE_INSTALL:
        assert step in runs, f"the Dockerfile's install steps changed ({runs}); the team-deployment test runs {step!r}"
    assert "TAXI_PROJECT_DIR=/app" in " ".join(dockerfile_lines("ENV")).split()
    from importlib.metadata import version

    from packaging.markers import Marker

    pins = re.findall(
        r"^([A-Za-z0-9_.-]+)==([^\s;]+)(?: ; ([^\\\n]+))?", (PROJECT_DIR / "requirements/runtime.txt").read_text(), re.M
    )
    wrong = [
        f"{name}=={pinned} (here {installed})"
        for name, pinned, marker in pins
        if (not marker or Marker(marker.strip()).evaluate()) and (installed := _installed(version, name)) != pinned
    ]
    assert not wrong, f"the worker here does not run the image's runtime lock: {wrong}"


def _installed(version, name: str) -> str:
    try:
        return version(name)
    except Exception:  # noqa: BLE001 - PackageNotFoundError
        return "not installed"


@pytest.fixture
def postgres_databases():
    """The superuser connection of TAXI_TEST_POSTGRES_URI, after init-databases.sh made mlflow and prefect."""
    admin_uri = os.environ.get("TAXI_TEST_POSTGRES_URI")
    if not admin_uri:
        if os.environ.get("CI"):
            pytest.fail("CI must provide PostgreSQL: .ci/run exports TAXI_TEST_POSTGRES_URI from .ci/start-postgres")
        pytest.skip("no PostgreSQL: set TAXI_TEST_POSTGRES_URI (.ci/start-postgres prints one)")
    import psycopg

    admin = psycopg.connect(admin_uri, autocommit=True)
    _drop_test_databases(admin)
    parts = urlparse(admin_uri)
    passwords = {"MLFLOW_DB_PASSWORD": "mlflowtest", "PREFECT_DB_PASSWORD": "prefecttest"}
    subprocess.run(
        ["bash", str(PROJECT_DIR / "deploy/postgres/init-databases.sh")],
        check=True,
        capture_output=True,
        text=True,
        env={
            **os.environ,
            **passwords,
            "POSTGRES_USER": parts.username,
            "PGPASSWORD": parts.password or "",
            "PGHOST": parts.hostname,
            "PGPORT": str(parts.port or 5432),
        },
    )
    for database in ("mlflow", "prefect"):
        admin.execute(f"COMMENT ON DATABASE {database} IS '{TEST_MARK}'")
    yield {"admin": admin, "host": f"{parts.hostname}:{parts.port or 5432}", **passwords}
    _drop_test_databases(admin)
    admin.close()


def _drop_test_databases(admin) -> None:
    """Drop the mlflow and prefect databases and roles, only if this test made them."""
    for database in ("mlflow", "prefect"):
        comment = admin.execute(
            "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s", (database,)
        ).fetchone()
        if comment is not None and comment[0] != TEST_MARK:
            pytest.fail(f"the PostgreSQL of TAXI_TEST_POSTGRES_URI has a {database!r} database this test did not make")
        admin.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
        admin.execute(f"DROP ROLE IF EXISTS {database}")


@pytest.mark.long
def test_the_compose_deployment_runs_here(postgres_databases, tmp_path, free_port, synthetic_source):
    import boto3

    services = compose_services()
    ports = {name: free_port() for name in ("minio", "mlflow", "prefect-server", "prefect-worker")}
    variables = {
        "MLFLOW_DB_PASSWORD": postgres_databases["MLFLOW_DB_PASSWORD"],
        "PREFECT_DB_PASSWORD": postgres_databases["PREFECT_DB_PASSWORD"],
        "MINIO_ROOT_USER": "team-test",
        "MINIO_ROOT_PASSWORD": "team-test-secret",
        "MLFLOW_BUCKET": "taxi-team-test",
        "MLFLOW_ALLOWED_HOSTS": f"127.0.0.1:{ports['mlflow']},localhost:{ports['mlflow']}",
        "MLFLOW_CORS_ALLOWED_ORIGINS": f"http://127.0.0.1:{ports['mlflow']}",
        "PREFECT_AUTH_USER": "admin",
        "PREFECT_AUTH_PASSWORD": "team-test-password",
        "PREFECT_UI_API_URL": f"http://127.0.0.1:{ports['prefect-server']}/api",
        "TAXI_DATA_SOURCE": str(synthetic_source),
    }
    topology = Topology(
        variables,
        hosts={
            "postgres:5432": postgres_databases["host"],
            "minio:9000": f"127.0.0.1:{ports['minio']}",
            "mlflow:5000": f"127.0.0.1:{ports['mlflow']}",
            "prefect-server:4200": f"127.0.0.1:{ports['prefect-server']}",
        },
        ports={"mlflow": ports["mlflow"], "prefect-server": ports["prefect-server"]},
    )
    app = tmp_path / "app"
    image_copy(app)
    base = {"PATH": f"{BIN}:{os.environ['PATH']}", "HOME": str(tmp_path / "home"), "LANG": "C.UTF-8"}
    processes = Processes(tmp_path / "logs")
    started = time.monotonic()
    try:
        s3 = f"http://127.0.0.1:{ports['minio']}"
        processes.start("s3", [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(ports["minio"])], base, tmp_path)
        processes.wait_healthy("s3", f"{s3}/moto-api/data.json")
        bucket = boto3.client(
            "s3",
            endpoint_url=s3,
            aws_access_key_id="team-test",
            aws_secret_access_key="team-test-secret",
            region_name="us-east-1",
        )
        bucket.create_bucket(Bucket=variables["MLFLOW_BUCKET"])  # what minio-init's `mc mb` does

        mlflow_env = topology.environment(services["mlflow"], MLFLOW_ENVIRONMENT)
        processes.start("mlflow", topology.command(services["mlflow"], "mlflow"), {**base, **mlflow_env}, tmp_path)
        prefect_env = topology.environment(
            services["prefect-server"], PREFECT_ENVIRONMENT, {"PREFECT_HOME": str(tmp_path / "prefect-server-home")}
        )
        processes.start(
            "prefect-server",
            topology.command(services["prefect-server"], "prefect-server"),
            {**base, **prefect_env},
            tmp_path,
        )
        mlflow_url, prefect_api = f"http://127.0.0.1:{ports['mlflow']}", variables["PREFECT_UI_API_URL"]
        processes.wait_healthy("mlflow", f"{mlflow_url}/health")
        processes.wait_healthy("prefect-server", f"{prefect_api}/health")

        # The pipeline containers' environment; PREFECT_HOME and TAXI_PROJECT_DIR are the image's home and /app.
        pipeline_env = {
            **base,
            **topology.environment(services["prefect-deploy"], PIPELINE_ENVIRONMENT),
            "PREFECT_HOME": str(tmp_path / "pipeline-home"),
            "TAXI_PROJECT_DIR": str(app),
            "PYTHONPATH": str(app / "src"),
        }  # the image's editable install of /app/src
        deploy = subprocess.run(
            topology.command(services["prefect-deploy"], "prefect-deploy"),
            env=pipeline_env,
            cwd=app,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert deploy.returncode == 0, deploy.stdout[-3000:] + deploy.stderr[-3000:]
        worker_env = topology.environment(
            services["prefect-worker"],
            WORKER_ENVIRONMENT,
            {
                "PREFECT_WORKER_WEBSERVER_PORT": str(ports["prefect-worker"]),
                # Test-only: poll every 2 s rather than Prefect's 10, so runs start sooner.
                "PREFECT_WORKER_QUERY_SECONDS": "2",
            },
        )
        processes.start(
            "prefect-worker",
            topology.command(services["prefect-worker"], "prefect-worker"),
            {**pipeline_env, **worker_env},
            app,
        )
        processes.wait_healthy("prefect-worker", f"http://127.0.0.1:{ports['prefect-worker']}/health")

        runs = start_deployment_runs(prefect_api, variables)
        finished = wait_for_runs(prefect_api, variables, runs, processes)
        read_back(finished, mlflow_url, bucket, variables["MLFLOW_BUCKET"], postgres_databases, prefect_api, variables)
        print(f"team deployment: up, deployed, three runs and read back in {time.monotonic() - started:.0f} s")
    finally:
        survivors = processes.stop_all()
    assert not survivors, f"processes survived the stop: {survivors}"


def _prefect(prefect_api: str, variables: dict[str, str]):
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    auth = f"{variables['PREFECT_AUTH_USER']}:{variables['PREFECT_AUTH_PASSWORD']}"
    return temporary_settings(updates={PREFECT_API_URL: prefect_api, PREFECT_API_AUTH_STRING: auth})


def start_deployment_runs(prefect_api: str, variables: dict[str, str]) -> dict[str, uuid.UUID]:
    """Year and month given; none given (the scheduled case); and a bad month, which Prefect refuses."""
    from prefect.client.orchestration import get_client

    with _prefect(prefect_api, variables), get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("nyc-taxi-duration/monthly")
        given = client.create_flow_run_from_deployment(deployment.id, parameters={"year": 2023, "month": 2})
        newest = client.create_flow_run_from_deployment(deployment.id, parameters={})
        with pytest.raises(Exception) as refused:
            client.create_flow_run_from_deployment(deployment.id, parameters={"year": 2023, "month": 13})
        assert "month" in str(refused.value) and "12" in str(refused.value), refused.value
        made = [run for run in client.read_flow_runs() if not run.auto_scheduled]  # not the schedule's future runs
        assert len(made) == 2, f"the refused run must not exist: {[run.parameters for run in made]}"
    return {"2023-02": given.id, "2023-04": newest.id}  # the source's newest pair is 2023-04 and 2023-05


def wait_for_runs(prefect_api, variables, runs: dict[str, uuid.UUID], processes: Processes) -> dict:
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + RUN_TIMEOUT
    with _prefect(prefect_api, variables), get_client(sync_client=True) as client:
        while True:
            flow_runs = {month: client.read_flow_run(run_id) for month, run_id in runs.items()}
            if all(run.state and run.state.is_final() for run in flow_runs.values()):
                break
            assert time.monotonic() < deadline, (
                f"deployment runs not done in {RUN_TIMEOUT} s: {[r.state for r in flow_runs.values()]}\n"
                f"{processes.log('prefect-worker')}"
            )
            time.sleep(2)
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        for month, flow_run in flow_runs.items():
            assert flow_run.state.is_completed(), f"{month}: {flow_run.state}\n{processes.log('prefect-worker', 80)}"
            assert flow_run.parameters.get("month") in (None, 2), flow_run.parameters
            task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])))
            states = {re.sub(r"-[0-9a-f]{3}$", "", run.name): run.state.type.value for run in task_runs}
            assert all(states.get(name) == "COMPLETED" for name in ("fetch-trip-files", *STAGES)), states
        limit = client.read_global_concurrency_limit_by_name(gate_lock.limit_name("nyc-taxi-duration"))
        assert (limit.limit, limit.active_slots) == (1, 0), "the gates took turns on the team's Prefect server"
    return flow_runs


def read_back(flow_runs, mlflow_url, bucket, bucket_name, postgres, prefect_api, variables) -> None:
    api = f"{mlflow_url}/api/2.0/mlflow"
    experiment = requests.get(
        f"{api}/experiments/get-by-name", params={"experiment_name": "nyc-taxi-duration"}, timeout=30
    ).json()["experiment"]
    found = requests.post(
        f"{api}/runs/search", json={"experiment_ids": [experiment["experiment_id"]]}, timeout=30
    ).json()
    by_flow_run = {
        tag["value"]: run for run in found["runs"] for tag in run["data"]["tags"] if tag["key"] == "prefect.flow_run_id"
    }
    keys = [entry["Key"] for entry in bucket.list_objects_v2(Bucket=bucket_name).get("Contents", [])]
    mlflow_ids = []
    for month, flow_run in flow_runs.items():
        run = by_flow_run[str(flow_run.id)]
        run_id, tags = run["info"]["run_id"], {tag["key"]: tag["value"] for tag in run["data"]["tags"]}
        mlflow_ids.append(run_id)
        assert run["info"]["status"] == "FINISHED" and tags["taxi.train_month"] == month, (month, run["info"], tags)
        assert {metric["key"] for metric in run["data"]["metrics"]} >= {"rmse", "baseline_rmse"}
        assert run["info"]["artifact_uri"].startswith("mlflow-artifacts:/"), "artifacts go through the server"
        root = f"{mlflow_url}/api/2.0/mlflow-artifacts/artifacts/{run['info']['artifact_uri'].removeprefix('mlflow-artifacts:/')}"
        for path in ("notebooks/03_train.ipynb", "reports/03_train.html"):
            response = requests.get(f"{root}/{path}", timeout=30)
            assert response.status_code == 200 and len(response.content) > 1000, (path, response.status_code)
            assert any(key.endswith(f"{run_id}/artifacts/{path}") for key in keys), (
                f"{path} of {run_id} not in the bucket"
            )
        assert tags["taxi.promotion.decision"] in ("promoted", "kept") and tags["taxi.promotion.champion_version"]

    import psycopg

    host, port = postgres["host"].split(":")
    with psycopg.connect(
        host=host, port=port, dbname="mlflow", user="mlflow", password=postgres["MLFLOW_DB_PASSWORD"]
    ) as connection:
        rows = dict(connection.execute("SELECT run_uuid, status FROM runs").fetchall())
    assert all(rows.get(run_id) == "FINISHED" for run_id in mlflow_ids), rows
    with psycopg.connect(
        host=host, port=port, dbname="prefect", user="prefect", password=postgres["PREFECT_DB_PASSWORD"]
    ) as connection:
        rows = dict(connection.execute("SELECT id::text, state_type::text FROM flow_run").fetchall())
    assert {str(run.id): "COMPLETED" for run in flow_runs.values()}.items() <= rows.items(), rows


def test_the_mlflow_server_here_has_the_boto3_of_its_image():
    arg = re.search(r"^ARG BOTO3_VERSION=(\S+)$", (PROJECT_DIR / "deploy/mlflow.Dockerfile").read_text(), re.M)
    pin = re.search(r"^boto3==(\S+)", (PROJECT_DIR / "requirements/dev.txt").read_text(), re.M)
    assert arg and pin and arg[1] == pin[1], "deploy/mlflow.Dockerfile's BOTO3_VERSION and the dev lock's boto3 differ"
