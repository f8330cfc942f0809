"""What the terminal shows of a failure (taxi_duration.orchestration.console), against Prefect's own engines.

The pipeline's fault tests check whole outputs of real runs; these pin down the mechanism on a
tiny flow, and fail when a Prefect upgrade changes what it relies on: the console handler on
the root logger, the engines' loggers, the traceback kept for the API.
"""

from __future__ import annotations

import importlib
import logging
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from taxi_duration import settings
from taxi_duration.orchestration import console
from taxi_duration.servers import local_servers

PROJECT_DIR = Path(__file__).resolve().parents[2]

# A flow with a task that returns a Failed state (Prefect then logs it with an empty traceback)
# and one that raises a recognised failure; the flow run's id on stdout.
PROBE = """
import sys

from taxi_duration.servers import endpoints
from taxi_duration.orchestration import console  # first: it sets the environment Prefect reads at import
from taxi_duration.data.trip_errors import TripFileInvalid

from prefect import flow, task
from prefect.states import Failed


@task
def returns_failed():
    return Failed(message="notebook 01_explore.ipynb failed: cell 4 raised ValueError")


@task
def raises_recognised():
    raise TripFileInvalid("green_tripdata_2023-04.parquet has no rows")


@flow
def probe():
    returns_failed(return_state=True)
    raises_recognised()


with endpoints.prefect_api_for_run(), console.one_clear_failure(verbose="--verbose" in sys.argv):
    state = probe(return_state=True)
console.settle_prefect_workers()
print(state.state_details.flow_run_id)
"""


def _probe(prefect_home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **settings.ENVIRONMENT_DEFAULTS, "PREFECT_HOME": str(prefect_home)}
    env.pop("PREFECT_API_URL", None)  # the tests' local server, as pipeline_cli runs use
    completed = subprocess.run(
        [sys.executable, "-c", PROBE, *args], cwd=PROJECT_DIR, env=env, capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed


def _api_log_messages(flow_run_id: str) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    state = local_servers.read_state("prefect")
    assert state is not None, "the probe ran on the tests' local Prefect server"
    with temporary_settings(updates={PREFECT_API_URL: state["env_value"]}), get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[uuid.UUID(flow_run_id)])))
    return [log.message for log in logs]


@pytest.mark.flow
def test_the_terminal_drops_recognised_tracebacks_and_the_ui_keeps_them(prefect_home: Path) -> None:
    completed = _probe(prefect_home)

    assert "has no rows" in completed.stderr, completed.stderr
    assert "Traceback (most recent call last)" not in completed.stderr, completed.stderr
    assert "NoneType: None" not in completed.stderr, completed.stderr
    messages = _api_log_messages(completed.stdout.split()[-1])
    kept = [message for message in messages if "Traceback (most recent call last)" in message]
    assert kept and all("TripFileInvalid" in message for message in kept), messages
    assert not any("NoneType: None" in message for message in messages), messages


@pytest.mark.flow
def test_verbose_shows_the_traceback_in_the_terminal(prefect_home: Path) -> None:
    completed = _probe(prefect_home, "--verbose")

    assert "Traceback (most recent call last)" in completed.stderr, completed.stderr
    assert (
        "taxi_duration.data.trip_errors.TripFileInvalid: green_tripdata_2023-04.parquet has no rows" in completed.stderr
    )
    assert "NoneType: None" not in completed.stderr, completed.stderr


def test_every_recognised_failure_names_an_exception_class() -> None:
    for module, name in console.RECOGNISED_FAILURES:
        found = getattr(importlib.import_module(module), name)
        assert isinstance(found, type) and issubclass(found, Exception), (module, name)
    assert console.is_recognised(sys.modules["taxi_duration.data.trip_errors"].TripFileInvalid("no rows"))
    assert not console.is_recognised(KeyError("surprise"))
    assert not console.is_recognised(None)


def _formatted(handler: logging.Handler, error: BaseException) -> str:
    try:
        raise error
    except type(error):
        record = logging.LogRecord("taxi_duration.runner", logging.ERROR, __file__, 1, "failed", None, sys.exc_info())
    return handler.format(record)


def test_only_recognised_failures_lose_their_traceback_and_only_in_the_block() -> None:
    from taxi_duration.data.trip_errors import TripFileInvalid

    (handler, *_) = console.console_handlers()
    original = handler.formatter
    with console.one_clear_failure():
        assert "Traceback" not in _formatted(handler, TripFileInvalid("no rows"))
        assert "Traceback" in _formatted(handler, KeyError("surprise"))
    assert handler.formatter is original
    assert "Traceback" in _formatted(handler, TripFileInvalid("no rows"))


def test_a_module_half_imported_by_another_thread_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    # A backfill's months import the package side by side: a module can be in sys.modules
    # before its classes exist, while another thread's failure is being logged.
    from types import ModuleType

    from taxi_duration.data.trip_errors import TripDataError

    monkeypatch.setitem(sys.modules, "taxi_duration.tracking.registry", ModuleType("taxi_duration.tracking.registry"))
    assert TripDataError in console.recognised_failures()
    assert console.is_recognised(TripDataError("no rows"))
    assert not console.is_recognised(KeyError("surprise"))
