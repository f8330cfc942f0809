"""The local-servers manager on a stand-in server (Python's http.server), real processes and ports.

The real MLflow and Prefect servers are started by tests/integration; here the mechanics:
state, the variables a run picks up, stopping the whole process group, clear refusals.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from taxi_duration import settings
from taxi_duration.servers import endpoints, local_servers


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((local_servers.HOST, 0))
        return probe.getsockname()[1]


@pytest.fixture
def services_folder(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "services"
    monkeypatch.setenv("TAXI_SERVICES_DIR", str(folder))
    return folder


def stand_in(name: str, port: int, spawn_child: bool = False) -> local_servers.Service:
    """An HTTP server answering 200 on /, optionally with a child process in its group."""
    command = [sys.executable, "-m", "http.server", str(port), "--bind", local_servers.HOST]
    if spawn_child:
        # The shape of the real servers: a parent that starts helpers (uvicorn workers, huey).
        script = (
            "import subprocess, sys, time;"
            f"subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']);"
            f"subprocess.run({command!r})"
        )
        command = [sys.executable, "-c", script]
    return local_servers.Service(
        name=name,
        port=port,
        command=command,
        environment=dict(os.environ),
        health_path="/",
        env_var="MLFLOW_TRACKING_URI" if name == "mlflow" else "PREFECT_API_URL",
        env_value=f"http://{local_servers.HOST}:{port}",
        ui_url=f"http://{local_servers.HOST}:{port}",
    )


def test_start_records_the_server_and_the_variables_a_run_picks_up(services_folder):
    port = free_port()
    state = local_servers.start(stand_in("mlflow", port), timeout_seconds=30)
    try:
        assert state["port"] == port and local_servers.read_state("mlflow")["pid"] == state["pid"]
        assert (services_folder / "services.env").read_text() == f"MLFLOW_TRACKING_URI=http://127.0.0.1:{port}\n"
        environ: dict[str, str] = {}
        assert endpoints.adopt_running_services(environ) == {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"}
        chosen = {"MLFLOW_TRACKING_URI": "http://elsewhere:5000"}
        assert (
            endpoints.adopt_running_services(chosen) == {} and chosen["MLFLOW_TRACKING_URI"] == "http://elsewhere:5000"
        )
        again = local_servers.start(stand_in("mlflow", port), timeout_seconds=30)
        assert again["pid"] == state["pid"], "a healthy running server is reused, not started twice"
    finally:
        local_servers.stop("mlflow")
    assert local_servers.read_state("mlflow") is None
    assert (services_folder / "services.env").read_text() == ""


def test_a_server_still_starting_is_not_adopted_until_it_answers(services_folder):
    # A server that binds its port only after 3 s: another run asking meanwhile must not be
    # pointed at it (it would be refused a connection), and is once the start has finished.
    port = free_port()
    slow = stand_in("prefect", port)
    slow = local_servers.Service(
        **{
            **slow.__dict__,
            "command": [
                sys.executable,
                "-c",
                f"import time, runpy, sys; time.sleep(3); sys.argv = {slow.command[2:]!r}; "
                "runpy.run_module('http.server', run_name='__main__')",
            ],
        }
    )
    import threading

    started = threading.Thread(target=local_servers.start, args=(slow,), kwargs={"timeout_seconds": 30})
    started.start()
    try:
        deadline = time.monotonic() + 10
        while local_servers.read_state("prefect") is None:
            assert time.monotonic() < deadline, "the starting server was never recorded"
            time.sleep(0.05)
        assert local_servers.read_state("prefect")["ready"] is False
        assert endpoints.adopt_running_services({}) == {}, "adopted a server that does not answer yet"
        started.join(timeout=30)
        assert local_servers.read_state("prefect")["ready"] is True
        assert endpoints.adopt_running_services({}) == {"PREFECT_API_URL": f"http://127.0.0.1:{port}"}
    finally:
        started.join(timeout=30)
        local_servers.stop("prefect")


def test_stop_ends_the_whole_process_group_and_frees_the_port(services_folder):
    port = free_port()
    state = local_servers.start(stand_in("prefect", port, spawn_child=True), timeout_seconds=30)
    deadline = time.monotonic() + 10
    while len(local_servers._group_members(state["pid"])) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(local_servers._group_members(state["pid"])) >= 3, "parent, sleeper and http.server"
    assert local_servers.stop("prefect") is True
    assert local_servers._group_members(state["pid"]) == []
    with socket.socket() as probe:
        assert probe.connect_ex((local_servers.HOST, port)) != 0
    assert local_servers.stop("prefect") is False, "stopping twice says it was not running"


def test_a_port_used_by_another_program_is_refused_by_name(services_folder):
    with socket.socket() as other:
        other.bind((local_servers.HOST, 0))
        other.listen()
        port = other.getsockname()[1]
        with pytest.raises(local_servers.ServiceError, match=rf"port {port} .*TAXI_PREFECT_PORT"):
            local_servers.start(stand_in("prefect", port), timeout_seconds=10)
    assert local_servers.read_state("prefect") is None


def test_a_server_that_exits_while_starting_reports_its_log(services_folder):
    broken = local_servers.Service(
        name="mlflow",
        port=free_port(),
        command=[sys.executable, "-c", "import sys; print('no such backend: bogus://'); sys.exit(3)"],
        environment=dict(os.environ),
        health_path="/",
        env_var="MLFLOW_TRACKING_URI",
        env_value="x",
        ui_url="x",
    )
    with pytest.raises(local_servers.ServiceError, match=r"(?s)exited with code 3.*no such backend"):
        local_servers.start(broken, timeout_seconds=30)
    assert local_servers.read_state("mlflow") is None


def test_a_stale_state_file_of_a_dead_process_is_ignored(services_folder):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    services_folder.mkdir(parents=True)
    (services_folder / "prefect.json").write_text(
        f'{{"name": "prefect", "pid": {dead.pid}, "port": 1, "url": "x", "env_var": "PREFECT_API_URL", '
        f'"env_value": "http://127.0.0.1:1/api", "log": "x"}}'
    )
    assert local_servers.read_state("prefect") is None
    assert endpoints.running_environment() == {}


def test_the_server_does_not_inherit_the_starting_runs_settings(services_folder, monkeypatch):
    monkeypatch.setenv("TAXI_OUTPUTS_DIR", "/tmp/some-run-outputs")
    monkeypatch.setenv("PREFECT_API_URL", "http://elsewhere/api")
    monkeypatch.setenv("TAXI_PREFECT_PORT", "4321")
    service = local_servers.prefect_service()
    assert service.port == 4321 and service.env_value == "http://127.0.0.1:4321/api"
    assert "TAXI_OUTPUTS_DIR" not in service.environment and "PREFECT_API_URL" not in service.environment
    assert service.environment["PREFECT_SERVER_DATABASE_CONNECTION_URL"].endswith(f"{services_folder}/prefect.db")
    assert service.environment["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"


def test_mlflow_server_command_binds_loopback_and_proxies_artifacts(services_folder, tmp_path):
    service = local_servers.mlflow_service(
        port=5123, backend_store_uri="postgresql://u:p@127.0.0.1/db", artifacts_destination=tmp_path
    )
    command = service.command
    assert command[command.index("--backend-store-uri") + 1] == "postgresql://u:p@127.0.0.1/db"
    assert command[command.index("--host") + 1] == "127.0.0.1"
    assert "--serve-artifacts" in command and command[command.index("--artifacts-destination") + 1] == tmp_path.as_uri()
    assert command[command.index("--allowed-hosts") + 1] == "127.0.0.1:5123,localhost:5123"


def test_the_local_mlflow_server_runs_one_worker_unless_told(services_folder, monkeypatch, tmp_path):
    # With more, keep-alive requests wait 40 ms each (see services.mlflow_service).
    monkeypatch.delenv("TAXI_MLFLOW_WORKERS", raising=False)
    command = local_servers.mlflow_service(port=5123, artifacts_destination=tmp_path).command
    assert command[command.index("--workers") + 1] == "1"
    monkeypatch.setenv("TAXI_MLFLOW_WORKERS", "3")
    command = local_servers.mlflow_service(port=5123, artifacts_destination=tmp_path).command
    assert command[command.index("--workers") + 1] == "3"


def test_the_local_mlflow_server_starts_no_job_workers_unless_told(services_folder, monkeypatch, tmp_path):
    # The pipeline submits no MLflow server jobs; their huey workers would cost CPU at every start.
    monkeypatch.delenv("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", raising=False)
    assert (
        local_servers.mlflow_service(port=5123, artifacts_destination=tmp_path).environment[
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION"
        ]
        == "false"
    )
    monkeypatch.setenv("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "true")
    assert (
        local_servers.mlflow_service(port=5123, artifacts_destination=tmp_path).environment[
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION"
        ]
        == "true"
    )


@pytest.mark.parametrize("raw", ["abc", "0", "-2", "1.5"])
def test_a_bad_mlflow_workers_knob_is_named_before_a_server_starts(raw, services_folder, monkeypatch, tmp_path):
    monkeypatch.setenv("TAXI_MLFLOW_WORKERS", raw)
    with pytest.raises(local_servers.ServiceError, match="TAXI_MLFLOW_WORKERS"):
        local_servers.mlflow_service(port=5123, artifacts_destination=tmp_path)


@pytest.mark.parametrize("raw", ["abc", "0", "70000"])
def test_bad_port_knobs_are_named(raw, monkeypatch):
    monkeypatch.setenv("TAXI_MLFLOW_PORT", raw)
    with pytest.raises(local_servers.ServiceError, match="TAXI_MLFLOW_PORT"):
        local_servers.configured_port("mlflow")


def test_bad_prefect_server_mode_is_named(monkeypatch):
    monkeypatch.setenv("TAXI_PREFECT_SERVER", "cloud")
    with pytest.raises(ValueError, match="TAXI_PREFECT_SERVER must be one of local, ephemeral"):
        settings.prefect_server_mode()


def test_cli_reports_status_and_urls(services_folder):
    port = free_port()
    local_servers.start(stand_in("mlflow", port), timeout_seconds=30)
    try:
        env = {**os.environ, "TAXI_SERVICES_DIR": str(services_folder)}
        urls = subprocess.run(
            [sys.executable, "-m", "taxi_duration.servers.local_servers", "urls"],
            env=env,
            capture_output=True,
            text=True,
        )
        assert urls.returncode == 0
        assert f"MLflow UI   http://127.0.0.1:{port}" in urls.stdout and "Prefect UI  not running" in urls.stdout
        bad = subprocess.run(
            [sys.executable, "-m", "taxi_duration.servers.local_servers", "start", "redis"],
            env=env,
            capture_output=True,
            text=True,
        )
        assert bad.returncode == 2 and "unknown service redis" in bad.stderr
    finally:
        local_servers.stop("mlflow")


@pytest.mark.parametrize("raw", ["many", "-1"])
def test_bad_overlap_knob_is_named(raw, monkeypatch):
    monkeypatch.setenv("TAXI_OVERLAP_MAX_TRIPS", raw)
    with pytest.raises(ValueError, match="TAXI_OVERLAP_MAX_TRIPS"):
        settings.overlap_max_trips()


@pytest.mark.parametrize("configured, inside", [(None, "None"), ("60", "60"), ("180", "180")])
def test_command_line_runs_send_no_flow_heartbeats_unless_configured(configured, inside):
    # In a fresh process: Prefect reads its settings (the environment, the profile) at import.
    env = {key: value for key, value in os.environ.items() if key != "PREFECT_FLOWS_HEARTBEAT_FREQUENCY"}
    if configured is not None:
        env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] = configured
    code = (
        "from prefect.settings import get_current_settings\n"
        "from taxi_duration.servers import endpoints\n"
        "with endpoints.without_flow_heartbeats():\n"
        "    print(get_current_settings().flows.heartbeat_frequency)\n"
        "print(get_current_settings().flows.heartbeat_frequency)\n"
    )
    shown = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    assert shown == [inside, configured or "180"]  # and Prefect's own default is back afterwards


def test_a_port_that_answers_without_http_is_not_a_healthy_server():
    # Another program on the port (a kernel's socket once was): not healthy, and no exception.
    import threading

    with socket.socket() as listener:
        listener.bind((local_servers.HOST, 0))
        listener.listen()

        def answer_with_bytes() -> None:
            connection, _ = listener.accept()
            with connection:
                connection.recv(1024)
                connection.sendall(b"\xff\x00\x00\x00\x00\x00\x00\x00\x01\x7f\r\n")

        threading.Thread(target=answer_with_bytes, daemon=True).start()
        assert local_servers._healthy(f"http://{local_servers.HOST}:{listener.getsockname()[1]}/api/health") is False
