"""A Prefect server that stops answering during a run: noticed in seconds, said once, never a lie.

Prefect's client retries a failed request PREFECT_CLIENT_MAX_RETRIES times (bounded in
settings.ENVIRONMENT_DEFAULTS), then raises. The first request that fails so (a progress or
summary artifact, the flow run's final state) marks the server lost for this process: the run
sends it nothing more it can do without, and the command line decides from the MLflow run the
flow owns whether the run's work stands (FINISHED: exit 0 and one warning) or not (exit 1).
Prefect's own log and event workers would retry the lost server at exit, with nothing left
they could deliver: the entry points then exit without waiting for them (cli.exit_process).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import httpx

T = TypeVar("T")

# Answers a proxy in front of a server that is down gives (a team's server behind one).
GATEWAY_STATUSES = (502, 503, 504)

_lost = threading.Event()


@dataclass
class OwnedRun:
    """How far a flow got with the MLflow run it owns, for when the flow run fails after it."""

    run_id: str | None = None
    run_dir: Path | None = None
    status: str | None = None  # the status the flow set on the MLflow run; None while it is RUNNING
    error: BaseException | None = None  # why the run failed, when it did
    result: dict[str, Any] | None = None  # what the flow's body returned: set only once the run is FINISHED


class PrefectServerLost(RuntimeError):
    """The Prefect server stopped answering; `run` says where the MLflow run the flow owns got to."""

    def __init__(self, url: str, cause: BaseException, run: OwnedRun | None = None) -> None:
        super().__init__(f"the Prefect server at {url} could not be reached ({describe(cause)})")
        self.url, self.cause, self.run = url, cause, run or OwnedRun()


def api_url() -> str:
    """The Prefect API this process reports to (PREFECT_API_URL)."""
    from prefect.settings import PREFECT_API_URL

    return (PREFECT_API_URL.value() or "").rstrip("/") or "(Prefect's temporary server)"


def describe(error: BaseException) -> str:
    """`error` in a few words: its message, else its type's name."""
    return str(error) or type(error).__name__


def unreachable(error: BaseException | None) -> bool:
    """Whether `error`, or what it arose from, is a request to Prefect's API that got no real answer."""
    import httpx

    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, httpx.TransportError) and _to_prefect(error):
            return True
        if (
            isinstance(error, httpx.HTTPStatusError)
            and error.response.status_code in GATEWAY_STATUSES
            and _to_prefect(error)
        ):
            return True
        error = error.__cause__ or error.__context__
    return False


def _to_prefect(error: httpx.HTTPError) -> bool:
    try:
        url = str(error.request.url)
    except RuntimeError:  # an httpx error raised without its request
        return False
    return url.startswith(api_url())


def lost() -> bool:
    """Whether this process found its Prefect server gone."""
    return _lost.is_set()


def unless_lost(send: Callable[[], T]) -> T | None:
    """`send()`, requests to Prefect's API the run can do without (artifacts); None once the server is lost."""
    if _lost.is_set():
        return None
    try:
        return send()
    except Exception as error:
        if not unreachable(error):
            raise
        _lost.set()
        return None


@contextlib.contextmanager
def noticing_loss(run: OwnedRun | None = None) -> Iterator[None]:
    """Within this block (a flow run), an unreachable Prefect API raises PrefectServerLost about `run`."""
    try:
        yield
    except PrefectServerLost:
        raise
    except Exception as error:
        if not unreachable(error):
            raise
        _lost.set()
        raise PrefectServerLost(api_url(), error, run) from error


# The loggers whose records Prefect sends to its API during a run (its run loggers, and the
# package's own through PREFECT_LOGGING_EXTRA_LOGGERS).
RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs", "taxi_duration")


class _QuietAfterLoss(logging.Filter):
    """Once the server is lost, the run's logs stay in the terminal (Prefect's log worker would
    fail on each batch, and say so); a failed request's own traceback is not shown: the command
    line says what happened, once."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and unreachable(record.exc_info[1]):
            return False
        if _lost.is_set():
            record.send_to_api = False  # Prefect's per-record opt-out of its API log handler
        return True


@contextlib.contextmanager
def said_once() -> Iterator[None]:
    """For a command line's flow run: PrefectServerLost when its server is lost, and no other account of it."""
    quiet = _QuietAfterLoss()
    loggers = [logging.getLogger(name) for name in RUN_LOGGERS]
    for logger in loggers:
        logger.addFilter(quiet)
    try:
        with noticing_loss():
            yield
    finally:
        for logger in loggers:
            logger.removeFilter(quiet)


def run_flow(flow: Callable[..., T], parameters: dict[str, Any], run: OwnedRun) -> T:
    """`flow(**parameters)`, whose body records its MLflow run in `run`; PrefectServerLost if the server went."""
    with noticing_loss(run):
        return flow(**parameters)


def outcome_lines(lost: PrefectServerLost, what: str) -> tuple[int, list[str]]:
    """The exit code and the lines (for stderr) that say how a run whose Prefect server was lost ended."""
    run, url = lost.run, lost.url
    if run.result is not None:
        return 0, [
            f"warning: the Prefect server at {url} stopped answering ({describe(lost.cause)}), so "
            f"Prefect's record of this run is incomplete; the run itself stands: MLflow run {run.run_id} "
            f"FINISHED, results in {run.run_dir}"
        ]
    lines = []
    if run.error is not None and not unreachable(run.error):
        lines.append(f"\n{what} failed: {describe(run.error)}")
    if run.run_id is None:
        lines.append(f"error: {lost}; no MLflow run was recorded")
    else:
        status = run.status or "still RUNNING (the next pipeline start on this host marks it KILLED)"
        lines.append(
            f"error: {lost}; MLflow run {run.run_id} is {status}, not FINISHED (what it did is in {run.run_dir})"
        )
    return 1, lines
