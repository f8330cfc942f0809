"""What a command line's terminal shows of a failed run: its one paragraph, not Python's tracebacks.

Prefect's flow and task engines log a failure with its traceback. For the failures the project
recognises and words itself (bad data, bad parameters, a failed notebook, a server that cannot
be reached), the terminal shows those log lines without the traceback, and the command ends
with the paragraph that names the problem. The traceback stays where it helps: Prefect's API
log handler still sends it to the run's logs (the UI), and `--verbose` keeps it in the terminal.
Unexpected errors keep their tracebacks everywhere.

Prefect's task engine also logs a task that returned a Failed state "with" the exception being
handled, when there is none: the logging module prints that as `NoneType: None`. That empty
traceback is dropped from every handler, verbose or not.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Iterator

from taxi_duration.orchestration.lost_server import RUN_LOGGERS

SETTLE_TIMEOUT_SECONDS = 10.0

# The failures whose message is the whole story: raised by the project, naming the problem.
# By module and name: a class whose module was never imported cannot have been raised, and
# importing some of them (registry, scoring) takes seconds.
RECOGNISED_FAILURES = (
    ("taxi_duration.data.trip_errors", "TripDataError"),  # a month missing, an empty or wrong file, a failed download
    ("taxi_duration.data.periods", "InvalidParameterError"),  # bad parameters
    ("taxi_duration.runner.parameters", "NotebookParameterError"),
    ("taxi_duration.orchestration.schedule", "NoPublishedMonthError"),
    ("taxi_duration.runner.parent", "NotebookExecutionError"),  # a failed notebook: the runner's paragraph
    ("taxi_duration.runner.parent", "NotebookStopped"),
    ("taxi_duration.tracking.mlflow_runs", "TrackingUnavailableError"),  # a server that cannot be reached
    ("taxi_duration.servers.local_servers", "ServiceError"),
    ("taxi_duration.orchestration.lost_server", "PrefectServerLost"),
    ("taxi_duration.orchestration.schedule", "PublicationCheckError"),
    ("taxi_duration.orchestration.backfill", "DaskUnavailableError"),
    ("taxi_duration.tracking.gate_lock", "GateLockError"),
    ("taxi_duration.tracking.registry", "RegistryError"),
    ("taxi_duration.modeling.batch_scoring", "ModelNotFoundError"),
)


def recognised_failures() -> tuple[type[BaseException], ...]:
    """The classes of RECOGNISED_FAILURES this process has imported.

    A module another thread is still importing (a backfill's months start side by side) is in
    sys.modules before its classes exist: those are skipped, not an error in a log handler.
    """
    found = (getattr(sys.modules.get(module), name, None) for module, name in RECOGNISED_FAILURES)
    return tuple(cls for cls in found if isinstance(cls, type))


def is_recognised(error: BaseException | None) -> bool:
    """Whether `error` is a failure the project words itself (RECOGNISED_FAILURES)."""
    return error is not None and isinstance(error, recognised_failures())


class _WithoutRecognisedTracebacks(logging.Formatter):
    """A console handler's formatter, leaving out the traceback of a recognised failure."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info and is_recognised(record.exc_info[1]):
            # A copy: the same record goes on to other handlers (Prefect's API handler keeps it whole).
            record = logging.makeLogRecord({**record.__dict__, "exc_info": None, "exc_text": None})
        return self.inner.format(record)


class _NoEmptyTraceback(logging.Filter):
    """Drops `exc_info` that holds no exception (logged outside any `except`): `NoneType: None`."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is None:
            record.exc_info = None
        return True


def add_verbose_flag(parser: argparse.ArgumentParser) -> None:
    """`--verbose`, the same on every command line that runs flows: what `one_clear_failure` is told."""
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="show the Python traceback of a failure the run recognises (bad data, a failed notebook)",
    )


def console_handlers() -> list[logging.Handler]:
    """Prefect's console handlers (on the root logger once Prefect has set up logging)."""
    from prefect.logging.configuration import ensure_logging_setup
    from prefect.logging.handlers import PrefectConsoleHandler

    ensure_logging_setup()
    return [handler for handler in logging.getLogger().handlers if isinstance(handler, PrefectConsoleHandler)]


@contextlib.contextmanager
def one_clear_failure(verbose: bool = False) -> Iterator[None]:
    """Within this block, the terminal shows no traceback of a recognised failure (unless `verbose`)
    and no `NoneType: None`; Prefect's API log handler still gets every traceback."""
    no_empty = _NoEmptyTraceback()
    loggers = [logging.getLogger(name) for name in RUN_LOGGERS]
    for logger in loggers:
        logger.addFilter(no_empty)
    wrapped = [] if verbose else console_handlers()
    originals = [handler.formatter for handler in wrapped]
    for handler in wrapped:
        handler.setFormatter(_WithoutRecognisedTracebacks(handler.formatter or logging.Formatter()))
    try:
        yield
    finally:
        for handler, original in zip(wrapped, originals, strict=True):
            handler.setFormatter(original)
        for logger in loggers:
            logger.removeFilter(no_empty)


def settle_prefect_workers(timeout_seconds: float = SETTLE_TIMEOUT_SECONDS) -> None:
    """Send the run's last logs and events to Prefect now rather than at exit, so that what Prefect
    prints while it sends them ("Still processing items") comes before the command's last words.
    Not for a lost server: they could not arrive (lost_server)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=timeout_seconds)
    EventsWorker.drain_all(timeout=timeout_seconds)
