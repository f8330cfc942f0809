"""docker-compose.yaml's services as processes on this machine: their own command lines and environments.

No Docker engine is needed: each service's `command` and `environment` are read from the
compose file, its `${VARIABLE}` references filled from the test's stand-in for `.env`, its
compose host names (postgres:5432, minio:9000, ...) mapped to loopback addresses, and its
listening `--host`/`--port` moved to 127.0.0.1 and a free port. A reference the test does not
provide, or an environment name it does not expect, fails loudly: that is the compose file
drifting away from what the test runs.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import requests
import yaml

PROJECT_DIR = Path(__file__).resolve().parents[2]
_REFERENCE = re.compile(r"\$\{(?P<name>\w+)(?P<operator>:?[-?])?(?P<argument>[^}]*)\}")


class ComposeDrift(AssertionError):
    """The compose file asks for something the test does not know how to provide."""


def compose_services() -> dict:
    """The `services` of docker-compose.yaml, with YAML anchors and merge keys resolved."""
    return yaml.safe_load((PROJECT_DIR / "docker-compose.yaml").read_text())["services"]


def interpolate(text: str, variables: dict[str, str]) -> str:
    """`text` with ${NAME}, ${NAME:-default} and ${NAME:?message} filled as `docker compose` fills them."""

    def fill(match: re.Match) -> str:
        name, operator, argument = match["name"], match["operator"], match["argument"]
        if variables.get(name):
            return variables[name]
        if operator in (":-", "-"):
            return argument
        raise ComposeDrift(f"docker-compose.yaml needs ${{{name}}}, which the team-deployment test does not provide")

    return _REFERENCE.sub(fill, text).replace("$$", "$")


@dataclass
class Topology:
    """How the compose names map to this machine: variables (the `.env`), hosts and listen ports."""

    variables: dict[str, str]
    hosts: dict[str, str]  # "postgres:5432" -> "127.0.0.1:5432"
    ports: dict[str, int]  # service -> the port it listens on here

    def resolve(self, value: str) -> str:
        value = interpolate(str(value), self.variables)
        for compose_host, local in self.hosts.items():
            value = value.replace(compose_host, local)
        return value

    def command(self, service: dict, name: str) -> list[str]:
        """The service's command line, listening on 127.0.0.1 and its port here."""
        command = [self.resolve(part) for part in service["command"]]
        for flag, value in (("--host", "127.0.0.1"), ("--port", str(self.ports.get(name, "")))):
            if flag in command:
                command[command.index(flag) + 1] = value
        return command

    def environment(self, service: dict, expected: set[str], overrides: dict[str, str] | None = None) -> dict[str, str]:
        """The service's environment, resolved; its names must be exactly `expected`."""
        names = set(service.get("environment", {}))
        if names != expected:
            raise ComposeDrift(
                f"the service's environment names changed: now {sorted(names)}, the test expects "
                f"{sorted(expected)}; update tests/integration/test_team_deployment.py to match"
            )
        resolved = {key: self.resolve(value) for key, value in service["environment"].items()}
        return {**resolved, **(overrides or {})}


@dataclass
class Processes:
    """The processes a test started, each in its own session so that stopping takes its children too."""

    logs: Path
    started: dict[str, subprocess.Popen] = field(default_factory=dict)

    def start(self, name: str, command: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen:
        self.logs.mkdir(parents=True, exist_ok=True)
        with open(self.logs / f"{name}.log", "wb") as log:
            process = subprocess.Popen(
                command,
                env=env,
                cwd=cwd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.started[name] = process
        return process

    def log(self, name: str, lines: int = 40) -> str:
        path = self.logs / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else "(no log)"

    def wait_healthy(self, name: str, url: str, seconds: float = 240) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.started[name].poll() is not None:
                raise AssertionError(f"{name} exited with {self.started[name].returncode}:\n{self.log(name)}")
            try:
                if requests.get(url, timeout=5).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise AssertionError(f"{name} did not answer {url} within {seconds:.0f} s:\n{self.log(name)}")

    def stop_all(self) -> list[str]:
        """Stop every process group (SIGTERM, then SIGKILL); the names of those with survivors."""
        groups = {}
        for name, process in self.started.items():
            try:
                groups[name] = [
                    process.pid,
                    *(child.pid for child in psutil.Process(process.pid).children(recursive=True)),
                ]
                os.killpg(process.pid, signal.SIGTERM)
            except (ProcessLookupError, psutil.NoSuchProcess):
                groups[name] = [process.pid]
        deadline = time.monotonic() + 30
        for process in self.started.values():
            try:
                process.wait(timeout=max(1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
        time.sleep(0.5)
        return [
            name
            for name, pids in groups.items()
            if any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in pids)
        ]
