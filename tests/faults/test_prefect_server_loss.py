"""The Prefect server lost while 03_train runs: the exit code, the MLflow run, the champion and the terminal agree, at once."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from taxi_duration import settings
from taxi_duration.servers import local_servers

pytestmark = pytest.mark.flow

PROJECT_DIR = Path(__file__).resolve().parents[2]
NOTICED_WITHIN_SECONDS = 30


@pytest.fixture
def doomed_prefect_server(tmp_path, monkeypatch, free_port) -> dict:
    """A real Prefect server of this test's own (the session's shared one serves the other tests),
    API only: what the pipeline talks to, without the scheduler's services or the UI."""
    monkeypatch.setenv("TAXI_SERVICES_DIR", str(tmp_path / "services"))
    service = local_servers.prefect_service(port=free_port())
    service = dataclasses.replace(
        service,
        command=[*service.command, "--no-services"],
        environment={**service.environment, "PREFECT_SERVER_UI_ENABLED": "false"},
    )
    state = local_servers.start(service)
    yield state
    local_servers.stop("prefect")  # nothing left to stop once the test killed it


def _gate_position() -> int:
    """Where 03_train's registry gate is among the cells its kernel runs (papermill adds one after `parameters`)."""
    notebook = json.loads((PROJECT_DIR / "notebooks" / "03_train.ipynb").read_text())
    code = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    (index,) = [i for i, cell in enumerate(code) if "register_and_gate(" in "".join(cell["source"])]
    return index + 2


class _Pipeline:
    """`python flows/pipeline.py` as a user runs it, its output read line by line as it comes."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(PROJECT_DIR / "flows" / "pipeline.py"), *args],
            cwd=PROJECT_DIR,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._readers = [
            threading.Thread(target=self._read, args=(pipe, lines), daemon=True)
            for pipe, lines in ((self.process.stdout, self.stdout), (self.process.stderr, self.stderr))
        ]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _read(pipe, lines: list[str]) -> None:
        for line in pipe:
            lines.append(line.rstrip("\n"))

    def wait_for_line(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.stderr):
            assert self.process.poll() is None, "the pipeline ended first:\n" + "\n".join(self.stderr[-40:])
            assert time.monotonic() < deadline, f"no {text!r} within {timeout:.0f} s"
            time.sleep(0.2)

    def wait(self, timeout: float) -> int:
        code = self.process.wait(timeout=timeout)
        for reader in self._readers:
            reader.join(timeout=10)
        return code


def _assert_outcome_agrees(code: int, tracking_uri: str, stderr: list[str], api_url: str) -> None:
    """Exit 0, FINISHED, its model the champion and one warning; or exit 1, not FINISHED, no champion moved, an error."""
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("nyc-taxi-duration").experiment_id])
    try:
        champion_run = client.get_model_version_by_alias(settings.DEFAULT_REGISTERED_MODEL, "champion").run_id
    except MlflowException:
        champion_run = None
    text = "\n".join(stderr)
    assert "Traceback" not in text and "NoneType: None" not in text, text[-4000:]
    if code == 0:
        assert run.info.status == "FINISHED"
        assert champion_run == run.info.run_id
        (warning,) = [line for line in stderr if "warning:" in line]
        assert api_url in warning and "Prefect's record of this run is incomplete" in warning, warning
        assert stderr[-1] == warning, "the warning is the last word"
        assert run.info.run_id in warning
        assert "Pipeline failed" not in text and "error:" not in text
    else:
        assert code == 1, text[-4000:]
        assert run.info.status != "FINISHED"
        assert champion_run is None, "a run that does not stand moved the champion"
        (error,) = [line for line in stderr if line.startswith("error:")]
        assert api_url in error and run.info.run_id in error and "not FINISHED" in error, error
        assert stderr[-1] == error, "the error is the last word"


def test_prefect_server_killed_after_the_gate_the_run_stands_with_one_warning(
    doomed_prefect_server, isolated_stores, prefect_home, synthetic_source
):
    """The local Prefect server killed while 03_train runs, after the registry gate: the champion
    has moved, so the run's work must stand. The pipeline is pointed at the server with
    PREFECT_API_URL, exactly as at a team's remote server, and the project's own local server is
    adopted through that same variable: one case covers both."""
    api_url = doomed_prefect_server["env_value"]
    env = {**os.environ, **settings.ENVIRONMENT_DEFAULTS, "PREFECT_HOME": str(prefect_home), "PREFECT_API_URL": api_url}
    pipeline = _Pipeline(["--data-source", str(synthetic_source)], env)
    try:
        pipeline.wait_for_line(f"03_train: cell {_gate_position()}/", timeout=600)
        os.killpg(int(doomed_prefect_server["pid"]), signal.SIGKILL)
        killed = time.monotonic()
        code = pipeline.wait(timeout=120)
        took = time.monotonic() - killed
    finally:
        if pipeline.process.poll() is None:  # the test failed first: its runner then stops the kernels
            pipeline.process.kill()

    _assert_outcome_agrees(code, isolated_stores["tracking_uri"], pipeline.stderr, api_url)
    assert code == 0, "\n".join(pipeline.stderr[-40:])
    assert any("Pipeline finished" in line for line in pipeline.stdout)
    assert took < NOTICED_WITHIN_SECONDS, f"the command ended {took:.0f} s after the server was killed"
