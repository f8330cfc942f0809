"""Real local servers without Docker: a Prefect server and an MLflow tracking server.

    python -m taxi_duration.servers.local_servers start [prefect] [mlflow]   # `make services`
    python -m taxi_duration.servers.local_servers stop                       # `make services-stop`
    python -m taxi_duration.servers.local_servers status | urls              # `make ui`

Each server runs in the background in its own process group, bound to 127.0.0.1, and is
recorded in the services folder (`TAXI_SERVICES_DIR`, default `<project>/.services`): a
`<name>.json` state file (pid, port, URL), its log, and `services.env`, the variables a run
picks up (`MLFLOW_TRACKING_URI`, `PREFECT_API_URL`). Stopping kills exactly the recorded
process groups, nothing else.

The flows start the Prefect server here on first use and leave it running (Prefect's
temporary server would cost seconds a run); taxi_duration.servers.endpoints picks a run's servers.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from taxi_duration import settings

HOST = "127.0.0.1"
DEFAULT_PORTS = {"prefect": 4200, "mlflow": 5000}
PORT_KNOBS = {"prefect": "TAXI_PREFECT_PORT", "mlflow": "TAXI_MLFLOW_PORT"}
START_TIMEOUT_SECONDS = 120.0  # a cold Prefect server migrates its database first
STOP_TIMEOUT_SECONDS = 15.0


class ServiceError(RuntimeError):
    """A local server could not be started or stopped; the message says which and why."""


@dataclass(frozen=True)
class Service:
    """How to start one server, check its health, and point a run at it."""

    name: str
    port: int
    command: list[str]
    environment: dict[str, str]
    health_path: str
    env_var: str  # the variable a run reads to use this server
    env_value: str
    ui_url: str

    @property
    def health_url(self) -> str:
        return f"http://{HOST}:{self.port}{self.health_path}"


def services_dir() -> Path:
    """Where state, logs and the Prefect server's database live: `TAXI_SERVICES_DIR`."""
    return Path(os.environ.get("TAXI_SERVICES_DIR") or settings.project_dir() / ".services").resolve()


def configured_port(name: str) -> int:
    raw = os.environ.get(PORT_KNOBS[name])
    if not raw:
        return DEFAULT_PORTS[name]
    try:
        port = int(raw)
    except ValueError:
        raise ServiceError(f"{PORT_KNOBS[name]} must be a port number, got {raw!r}") from None
    if not 0 < port < 65536:
        raise ServiceError(f"{PORT_KNOBS[name]} must be between 1 and 65535, got {port}")
    return port


def mlflow_backend_store_uri() -> str:
    """`TAXI_MLFLOW_BACKEND_URI` (e.g. postgresql://...), else the project's SQLite store."""
    return os.environ.get("TAXI_MLFLOW_BACKEND_URI") or f"sqlite:///{settings.project_dir() / 'mlflow.db'}"


def _server_environment() -> dict[str, str]:
    # A server outlives the run that started it: it must not keep that run's settings (its
    # folders, or a client setting pointing at another server).
    environment = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("TAXI_") and key not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")
    }
    environment.update(settings.ENVIRONMENT_DEFAULTS)
    return environment


# MLflow's server also starts a job runner and about eight huey worker processes (GenAI
# evaluation and prompt jobs) unless told not to; the pipeline submits no jobs, and each worker
# imports MLflow at every server start (docs/performance.md). The user's own setting wins.
MLFLOW_SERVER_DEFAULTS = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def mlflow_server_environment() -> dict[str, str]:
    return {**MLFLOW_SERVER_DEFAULTS, **_server_environment()}


def prefect_service(port: int | None = None) -> Service:
    port = port or configured_port("prefect")
    folder = services_dir()
    environment = _server_environment()
    environment.update(
        {
            # The server's own database beside its state, so stopping and starting keeps history.
            "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{folder / 'prefect.db'}",
            "PREFECT_HOME": str(folder / "prefect-home"),
            "PREFECT_SERVER_API_HOST": HOST,
            "PREFECT_SERVER_API_PORT": str(port),
            "PREFECT_UI_API_URL": f"http://{HOST}:{port}/api",
        }
    )
    return Service(
        name="prefect",
        port=port,
        command=[sys.executable, "-m", "prefect", "server", "start", "--host", HOST, "--port", str(port)],
        environment=environment,
        health_path="/api/health",
        env_var="PREFECT_API_URL",
        env_value=f"http://{HOST}:{port}/api",
        ui_url=f"http://{HOST}:{port}",
    )


def mlflow_service(
    port: int | None = None, backend_store_uri: str | None = None, artifacts_destination: Path | None = None
) -> Service:
    port = port or configured_port("mlflow")
    artifacts = artifacts_destination or settings.local_artifact_root()
    # One worker by default: with two or more, uvicorn's worker processes answer a reused
    # (keep-alive) connection's request with the headers and, a delayed ACK later, the body
    # (Nagle's algorithm; measured in docs/performance.md), and a run makes dozens. One worker still serves requests concurrently (the app runs in threads).
    try:
        workers = settings.mlflow_workers()
    except ValueError as error:
        raise ServiceError(str(error)) from None
    return Service(
        name="mlflow",
        port=port,
        command=[
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            backend_store_uri or mlflow_backend_store_uri(),
            # Clients send artifacts through the server (mlflow-artifacts:/), which stores them here.
            "--serve-artifacts",
            "--artifacts-destination",
            artifacts.as_uri(),
            "--host",
            HOST,
            "--port",
            str(port),
            "--workers",
            str(workers),
            "--allowed-hosts",
            f"{HOST}:{port},localhost:{port}",
        ],
        environment=mlflow_server_environment(),
        health_path="/health",
        env_var="MLFLOW_TRACKING_URI",
        env_value=f"http://{HOST}:{port}",
        ui_url=f"http://{HOST}:{port}",
    )


SERVICE_FACTORIES = {"prefect": prefect_service, "mlflow": mlflow_service}


# --- state on disk ---------------------------------------------------------------------------


def _state_path(name: str) -> Path:
    return services_dir() / f"{name}.json"


def read_state(name: str) -> dict | None:
    """The recorded server `name`, or None when none is recorded or its process is gone."""
    path = _state_path(name)
    try:
        state = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if not _alive(int(state["pid"])):
        return None
    return state


def _write_state(service: Service, pid: int, log: Path, ready: bool) -> None:
    state = {  # recorded while it starts too (so `stop` finds it), ready once it is healthy
        "name": service.name,
        "pid": pid,
        "port": service.port,
        "url": service.ui_url,
        "env_var": service.env_var,
        "env_value": service.env_value,
        "log": str(log),
        "command": service.command,
        "started_at": time.time(),
        "ready": ready,
    }
    path = _state_path(service.name)
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(state, indent=2))
    temporary.replace(path)


def _write_env_file() -> Path:
    """`services.env`: KEY=value for every running server (read by runs and `make`)."""
    lines = [
        f"{state['env_var']}={state['env_value']}"
        for name in SERVICE_FACTORIES
        if (state := read_state(name)) is not None
    ]
    path = services_dir() / "services.env"
    path.write_text("".join(line + "\n" for line in lines))
    return path


@contextlib.contextmanager
def _lock() -> Iterator[None]:
    # Two pipelines starting at once must not both start a server on the same port.
    folder = services_dir()
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --- processes -------------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by its parent) is not a server.
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(0.5)
        return probe.connect_ex((HOST, port)) == 0


def _healthy(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (OSError, http.client.HTTPException):  # no answer, or another program's (not HTTP) on the port
        return False


def _log_tail(log: Path, lines: int = 15) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def start(service: Service, timeout_seconds: float = START_TIMEOUT_SECONDS) -> dict:
    """Start `service` in the background (or find it running) and wait until it is healthy."""
    with _lock():
        state = read_state(service.name)
        if state is not None:
            if _healthy(f"http://{HOST}:{state['port']}{service.health_path}"):
                return state
            _stop_recorded(state)  # recorded but not answering: replace it
        if _port_in_use(service.port):
            raise ServiceError(
                f"cannot start the {service.name} server: port {service.port} on {HOST} is already used by another "
                f"program. Stop that program or choose another port with {PORT_KNOBS[service.name]}=<port>."
            )
        folder = services_dir()
        log = folder / f"{service.name}.log"
        with open(log, "ab") as log_handle:
            process = subprocess.Popen(
                service.command,
                env=service.environment,
                stdout=log_handle,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=folder,
            )
        _write_state(service, process.pid, log, ready=False)
        deadline = time.monotonic() + timeout_seconds
        while not _healthy(service.health_url):
            if process.poll() is not None:
                _forget(service.name)
                raise ServiceError(
                    f"the {service.name} server exited with code {process.returncode} while starting; "
                    f"last lines of {log}:\n{_log_tail(log)}"
                )
            if time.monotonic() > deadline:
                _stop_recorded(read_state(service.name) or {"pid": process.pid, "name": service.name})
                raise ServiceError(
                    f"the {service.name} server did not become healthy at {service.health_url} within "
                    f"{timeout_seconds:.0f} s; last lines of {log}:\n{_log_tail(log)}"
                )
            time.sleep(0.2)
        _write_state(service, process.pid, log, ready=True)
        _write_env_file()
        return read_state(service.name) or {}


def _forget(name: str) -> None:
    _state_path(name).unlink(missing_ok=True)
    _write_env_file()


def _group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group `pgid`, from /proc."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def _wait_for_empty_group(pgid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while _group_members(pgid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _stop_recorded(state: dict) -> None:
    pgid = int(state["pid"])  # started with a session of its own: its pid is its group id
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)  # the server's whole group: workers and helpers too
    if not _wait_for_empty_group(pgid, STOP_TIMEOUT_SECONDS):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        # SIGKILL is not instant: report stopped only when the group is really gone.
        if not _wait_for_empty_group(pgid, STOP_TIMEOUT_SECONDS):
            raise ServiceError(
                f"the {state['name']} server's processes {_group_members(pgid)} did not exit after SIGKILL"
            )
    _forget(state["name"])


def stop(name: str) -> bool:
    """Stop the recorded server `name`; False when none was running."""
    with _lock():
        state = read_state(name)
        if state is None:
            _state_path(name).unlink(missing_ok=True)
            if services_dir().is_dir():
                _write_env_file()
            return False
        _stop_recorded(state)
        return True


# --- command line ----------------------------------------------------------------------------


def _describe(name: str) -> str:
    state = read_state(name)
    if state is None:
        return f"{name:<8} stopped"
    return f"{name:<8} {state['url']:<28} pid {state['pid']}  log {state['log']}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Local Prefect and MLflow servers (no Docker).")
    parser.add_argument("action", choices=["start", "stop", "status", "urls"])
    parser.add_argument("names", nargs="*", metavar="{prefect,mlflow}", help="default: both")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - set(SERVICE_FACTORIES))
    if unknown:
        parser.error(f"unknown service {', '.join(unknown)}: choose from {', '.join(SERVICE_FACTORIES)}")
    names = args.names or list(SERVICE_FACTORIES)
    try:
        if args.action == "start":
            for name in names:
                state = start(SERVICE_FACTORIES[name]())
                print(f"{name:<8} up at {state['url']}  (log: {state['log']})")
            print(
                f"Runs now use them (variables in {services_dir() / 'services.env'}); `make services-stop` stops them."
            )
        elif args.action == "stop":
            for name in names:
                print(f"{name:<8} {'stopped' if stop(name) else 'was not running'}")
        elif args.action == "status":
            for name in names:
                print(_describe(name))
        else:
            for name in names:
                running = read_state(name)
                label = {"prefect": "Prefect UI", "mlflow": "MLflow UI"}[name]
                print(f"{label:<11} {running['url'] if running else 'not running (make services starts it)'}")
    except ServiceError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
