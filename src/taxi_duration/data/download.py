"""Downloading one file atomically, retrying what may pass next time, reporting what will not.

A download is written under a temporary name beside its destination and renamed only after
it passed `validate`, so the destination is always a complete, checked file or untouched.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from taxi_duration.data.trip_errors import TripDownloadError, TripFileInvalid, TripFileNotFound

# Four attempts, 0.5 + 1 + 2 s apart: rides out a dropped connection or a CDN hiccup
# without making a run that points at a dead source wait long before it says so.
DOWNLOAD_ATTEMPTS = 4
DOWNLOAD_BACKOFF_SECONDS = 0.5

# TLC's CloudFront answers 403 for an object that is not there, so 403 means "not
# published" as much as 404 does (same rule as schedule.is_published).
_NOT_FOUND_STATUSES = (403, 404)
# Answers that say "not now" rather than "no": the same request may well succeed later.
_TRANSIENT_STATUSES = (408, 429)

_log = logging.getLogger(__name__)


def retry_delays(attempts: int, backoff_seconds: float) -> list[float]:
    """Seconds to wait before attempts 2..N: doubling from `backoff_seconds` (0.5 -> 0.5, 1, 2)."""
    return [backoff_seconds * 2**retry for retry in range(attempts - 1)]


class _Transient(Exception):
    """An attempt that failed in a way the same request may get past next time; the message says how."""


def download_file(
    url: str,
    destination: Path,
    timeout_seconds: float = 60.0,
    validate: Callable[[Path], object] | None = None,
    *,
    attempts: int = DOWNLOAD_ATTEMPTS,
    backoff_seconds: float = DOWNLOAD_BACKOFF_SECONDS,
) -> None:
    """Stream `url` to `destination` atomically: a temporary file, checked, then renamed.

    Transient failures (connection refused or reset, timeout, HTTP 5xx/408/429, a body
    shorter than its Content-Length) are retried, `attempts` tries in all, waiting
    `retry_delays(attempts, backoff_seconds)` between them. Not retried, because another try
    gives the same answer: HTTP 403/404 (TripFileNotFound), any other HTTP error
    (TripDownloadError) and a body `validate(path)` rejects (TripFileInvalid; the body is kept
    as `<destination>.invalid` for inspection). After the last failed try: TripDownloadError
    naming the URL, the number of attempts and the last cause.

    A failed call leaves no temporary file and `destination` as it was.
    """
    if attempts < 1:
        raise ValueError(f"attempts must be at least 1, got {attempts}")
    destination.parent.mkdir(parents=True, exist_ok=True)
    delays = retry_delays(attempts, backoff_seconds)
    for attempt in range(1, attempts + 1):
        try:
            _download_once(url, destination, timeout_seconds, validate)
            return
        except _Transient as failure:
            if attempt == attempts:
                tries = "the only attempt failed" if attempts == 1 else f"all {attempts} attempts failed, the last"
                raise TripDownloadError(
                    f"could not download {url}: {tries} because {failure}. "
                    f"Nothing was saved as {destination}. The server or the network is having trouble: "
                    f"run again later, or use a data source folder that already holds {destination.name}."
                ) from failure.__cause__
            delay = delays[attempt - 1]
            _log.warning(
                "download of %s failed (%s); attempt %d of %d, retrying in %g s", url, failure, attempt, attempts, delay
            )
            time.sleep(delay)


def _download_once(
    url: str, destination: Path, timeout_seconds: float, validate: Callable[[Path], object] | None
) -> None:
    """One attempt of download_file; raises _Transient for a failure worth another try."""
    import requests  # imported here: only downloads need it

    # Ask for the bytes as stored: Content-Length then counts what we write.
    headers = {"Accept-Encoding": "identity"}
    try:
        response = requests.get(url, stream=True, timeout=timeout_seconds, headers=headers)
    except requests.Timeout as error:
        raise _Transient(f"the server did not answer within {timeout_seconds:g} s") from error
    except requests.ConnectionError as error:
        raise _Transient(f"the connection failed ({_innermost(error)})") from error
    except requests.RequestException as error:  # a malformed URL, a redirect loop: retrying will not help
        raise TripDownloadError(f"could not download {url}: {error}. Check the data source URL.") from error
    with response:
        status = response.status_code
        if status in _NOT_FOUND_STATUSES:
            raise TripFileNotFound(
                f"{url} answered HTTP {status}: the file is not published or not found there. "
                f"TLC publishes a month's file about two months after the month ends; pick an earlier month, "
                f"or check the data source URL."
            )
        if status >= 500 or status in _TRANSIENT_STATUSES:
            raise _Transient(f"the server answered HTTP {status} {response.reason or ''}".rstrip())
        if status >= 400:
            raise TripDownloadError(
                f"could not download {url}: the server answered HTTP {status} {response.reason or ''}".rstrip()
                + ", which another try will not change. Check the data source URL."
            )
        expected = response.headers.get("Content-Length")
        handle, temporary_name = tempfile.mkstemp(prefix=destination.name + ".", suffix=".part", dir=destination.parent)
        temporary = Path(temporary_name)
        try:
            try:
                with os.fdopen(handle, "wb") as sink:
                    for chunk in response.iter_content(chunk_size=1 << 20):
                        sink.write(chunk)
            except (
                requests.ConnectionError,
                requests.Timeout,
                requests.exceptions.ChunkedEncodingError,
                requests.exceptions.ContentDecodingError,
            ) as error:
                # urllib3 notices most short bodies itself (IncompleteRead); say it in the same words.
                received = response.raw.tell()
                of = f" of {expected}" if expected is not None else ""
                why = "" if "IncompleteRead" in str(error) else f" ({_innermost(error)})"
                raise _Transient(f"the body was cut short after {received}{of} bytes{why}") from error
            # Bytes that crossed the wire (before any Content-Encoding was undone), which is
            # what Content-Length counts.
            received = response.raw.tell()
            if expected is not None and received != int(expected):
                raise _Transient(
                    f"the body was cut short: {received} bytes arrived, shorter than its Content-Length {expected}"
                )
            if validate is not None:
                try:
                    validate(temporary)
                except Exception as error:
                    # Kept beside the cache rather than deleted: an HTML error page or a
                    # half file is the quickest way to see what the server did.
                    aside = _keep_rejected(temporary, destination)
                    raise TripFileInvalid(
                        f"{error} Nothing was cached as {destination}; the download is kept as {aside} "
                        f"for inspection, and the next run downloads the file again. If it happens again, "
                        f"the kept file shows what the data source serves instead of the month's trips."
                    ) from error
            os.chmod(temporary, 0o644)  # mkstemp creates 0600; a shared cache must be readable
            os.replace(temporary, destination)
        finally:
            temporary.unlink(missing_ok=True)


def _innermost(error: BaseException) -> str:
    """The socket-level reason inside requests' and urllib3's wrappers, e.g. "connection reset by peer"."""
    seen: set[int] = set()
    while id(error) not in seen:
        seen.add(id(error))
        # requests wraps urllib3's error in args; urllib3 keeps the socket error in args or .reason.
        inner = getattr(error, "reason", None)
        if not isinstance(inner, BaseException):
            inner = next((arg for arg in reversed(error.args) if isinstance(arg, BaseException)), None)
        if inner is None:
            break
        error = inner
    if isinstance(error, OSError) and error.strerror:
        return error.strerror.lower()
    # urllib3 prefixes messages with the connection object's repr, which says nothing useful.
    return re.sub(r"<[^>]* at 0x[0-9a-f]+>: ", "", str(error)).strip() or type(error).__name__


def _keep_rejected(temporary: Path, destination: Path) -> Path:
    """Move a rejected download to `<destination>.invalid` (replacing an older one), readable like the cache."""
    target = destination.with_name(destination.name + ".invalid")
    os.chmod(temporary, 0o644)
    os.replace(temporary, target)
    return target
