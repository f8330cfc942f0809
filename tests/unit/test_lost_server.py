"""How a lost Prefect server is recognized and what the command line then says (no server needed)."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
import pytest

from taxi_duration.orchestration import lost_server

API = "http://prefect.example.org:4200/api"


@pytest.fixture(autouse=True)
def fresh_latch(monkeypatch):
    """Each test starts with the server not lost, and points Prefect's client at API."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.setattr(lost_server, "_lost", threading.Event())
    with temporary_settings(updates={PREFECT_API_URL: API}):
        yield


def _refused(url: str = f"{API}/flow_runs/1/set_state") -> httpx.ConnectError:
    return httpx.ConnectError("[Errno 111] Connection refused", request=httpx.Request("POST", url))


def _send_refused():
    raise _refused()


def test_only_a_request_to_prefects_api_that_got_no_real_answer_is_a_lost_server():
    assert lost_server.unreachable(_refused())
    try:
        try:
            raise _refused()
        except httpx.ConnectError as refused:
            raise RuntimeError("while setting the state") from refused
    except RuntimeError as wrapped:
        assert lost_server.unreachable(wrapped), "what an error arose from counts"
    gateway = httpx.Request("GET", f"{API}/hello")
    assert lost_server.unreachable(
        httpx.HTTPStatusError("502", request=gateway, response=httpx.Response(502, request=gateway))
    )
    assert not lost_server.unreachable(
        httpx.HTTPStatusError("404", request=gateway, response=httpx.Response(404, request=gateway))
    )
    assert not lost_server.unreachable(_refused("https://d37ci6vzurychx.cloudfront.net/trip-data/x.parquet"))
    assert not lost_server.unreachable(ValueError("a cell raised"))
    assert not lost_server.unreachable(None)


def test_artifacts_stop_once_the_server_is_lost_and_other_errors_still_raise():
    calls = []

    def refused():
        calls.append("sent")
        _send_refused()

    def broken():
        raise ValueError("not the server")

    with pytest.raises(ValueError):
        lost_server.unless_lost(broken)
    assert not lost_server.lost()
    assert lost_server.unless_lost(refused) is None
    assert lost_server.lost()
    assert lost_server.unless_lost(refused) is None
    assert calls == ["sent"], "nothing more is sent to a lost server"


def test_a_finished_run_stands_with_one_warning_naming_the_server_and_the_run():
    run = lost_server.OwnedRun("abc123", Path("/runs/abc"), "FINISHED", None, {"mlflow_run_id": "abc123"})
    with pytest.raises(lost_server.PrefectServerLost) as raised, lost_server.noticing_loss(run):
        raise _refused()
    code, lines = lost_server.outcome_lines(raised.value, "Pipeline")
    assert code == 0
    (warning,) = lines
    assert warning.startswith("warning: ") and API in warning and "abc123" in warning and "/runs/abc" in warning
    assert "Prefect's record of this run is incomplete" in warning


def test_a_run_that_did_not_finish_exits_1_with_its_own_failure_then_the_server():
    failure = RuntimeError("notebook 03_train.ipynb failed: cell 7 raised ...")
    run = lost_server.OwnedRun("abc123", Path("/runs/abc"), "FAILED", failure)
    code, lines = lost_server.outcome_lines(lost_server.PrefectServerLost(API, _refused(), run), "Pipeline")
    assert code == 1
    assert lines == [
        "\nPipeline failed: notebook 03_train.ipynb failed: cell 7 raised ...",
        f"error: the Prefect server at {API} could not be reached ([Errno 111] Connection refused); "
        "MLflow run abc123 is FAILED, not FINISHED (what it did is in /runs/abc)",
    ]
    code, lines = lost_server.outcome_lines(lost_server.PrefectServerLost(API, _refused()), "Scoring")
    assert (code, lines) == (
        1,
        [
            f"error: the Prefect server at {API} could not be reached "
            "([Errno 111] Connection refused); no MLflow run was recorded"
        ],
    )


def test_the_lost_requests_own_tracebacks_are_not_shown_and_later_logs_stay_local():
    import logging

    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record)

    logger = logging.getLogger("prefect.flow_runs")
    keep, level = Keep(), logger.level
    # Prefect's own (its API-key filter) are there once anything in this process set up its logging.
    filters_before = list(logger.filters)
    logger.addHandler(keep)
    logger.setLevel(logging.INFO)
    try:
        with pytest.raises(lost_server.PrefectServerLost), lost_server.said_once():
            try:
                raise _refused()
            except httpx.ConnectError:
                logger.exception("Encountered exception during execution")
            logger.info("cell 7/12 done")
            lost_server.unless_lost(_send_refused)  # a progress artifact finds the server lost
            logger.info("Finished in state Running()")
            _send_refused()
    finally:
        logger.removeHandler(keep)
        logger.setLevel(level)
    assert [record.getMessage() for record in seen] == ["cell 7/12 done", "Finished in state Running()"]
    assert [getattr(record, "send_to_api", True) for record in seen] == [True, False]
    assert logger.filters == filters_before, "the filter goes with the flow run"
