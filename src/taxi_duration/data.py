"""TLC trip files: where they come from, how they are cached and validated, how they are read.

A trip file is `{color}_tripdata_{YYYY}-{MM}.parquet`. The source is either a URL prefix
(TLC's public location by default) or a local folder. Downloads land in a cache folder,
written under a temporary name and renamed only after validation, so a file in the cache
is always one that passed validation.

Failures fall in three kinds, each a TripDataError whose message names the URL or file:
TripFileNotFound (the source has no such month; never retried), TripDownloadError (the
network or server kept failing; download_file retries transient failures itself, with
doubling waits, before raising it) and TripFileInvalid (the file is there but unusable).
An unusable download, or a cached file that went bad, is kept only as `<name>.invalid`
for inspection, never under its real name; a folder source's files are the user's and are
never moved or deleted.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq

from taxi_duration.periods import Month

if TYPE_CHECKING:
    import pandas as pd

PICKUP_COLUMN = {"green": "lpep_pickup_datetime", "yellow": "tpep_pickup_datetime"}
DROPOFF_COLUMN = {"green": "lpep_dropoff_datetime", "yellow": "tpep_dropoff_datetime"}
LOCATION_COLUMNS = ("PULocationID", "DOLocationID")
DISTANCE_COLUMN = "trip_distance"


class TripDataError(Exception):
    """A trip file that cannot be used; the message names the file and the problem."""


class TripFileNotFound(TripDataError):
    """The source has no file for that month (not published, or a wrong source)."""


class TripFileInvalid(TripDataError):
    """A file that is there but is not a usable trip file (not parquet, cut short, no rows, a column missing)."""


class TripDownloadError(TripDataError):
    """A download that failed for a reason other than the file being absent or invalid.

    Either every attempt failed on something transient (connection reset, timeout, HTTP 5xx,
    body cut short), or the server gave an answer no retry will change (e.g. HTTP 401).
    download_file has already retried; callers should not retry it again right away.
    """


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


def required_columns(color: str) -> tuple[str, ...]:
    """Columns the pipeline cannot work without, for one taxi colour."""
    return (PICKUP_COLUMN[color], DROPOFF_COLUMN[color], *LOCATION_COLUMNS, DISTANCE_COLUMN)


def trip_filename(color: str, month: Month) -> str:
    """TLC's name for the month's file of one colour: `{color}_tripdata_{YYYY-MM}.parquet`."""
    return f"{color}_tripdata_{month.label()}.parquet"


def is_url(source: str) -> bool:
    """Whether a data source is an http(s) URL prefix (otherwise it is a folder)."""
    return source.startswith(("http://", "https://"))


def validate_trip_file(path: Path, color: str, name: str | None = None) -> int:
    """Check that `path` is readable parquet with the required columns and at least one row.

    Returns the row count. Raises TripFileInvalid (a TripDataError) saying what is wrong,
    calling the file `name` (default: its path; a download passes its URL, since the bytes
    sit in a temporary file the user never sees). Only the footer is read, so this is cheap
    even for large files.
    """
    name = name or str(path)
    try:
        metadata = pq.read_metadata(path)
    except (OSError, pa.ArrowException) as error:
        raise TripFileInvalid(f"{name} is not a readable parquet file: {_why_unreadable(path, error)}") from error
    names = set(metadata.schema.to_arrow_schema().names)
    missing = [column for column in required_columns(color) if column not in names]
    if missing:
        raise TripFileInvalid(
            f"{name} lacks the column(s) {', '.join(missing)} that {color} trip files have; "
            f"is it a {color} taxi file?"
        )
    if metadata.num_rows == 0:
        raise TripFileInvalid(f"{name} has no rows: it is valid parquet with the right columns but holds no trips.")
    return metadata.num_rows


def trip_count(path: Path) -> int:
    """Trips in a local, validated trip file (read from the parquet footer: cheap)."""
    return pq.read_metadata(path).num_rows


def _why_unreadable(path: Path, error: Exception) -> str:
    """Name the usual culprits (missing, empty, an HTML page, cut short) instead of Arrow's wording."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(512)
            handle.seek(max(size - 4, 0))
            tail = handle.read(4)
    except FileNotFoundError:
        return "it does not exist."
    except OSError:
        return f"{str(error).strip()}."
    if size == 0:
        return "it is empty (0 bytes)."
    lowered = head.lower()
    if b"<html" in lowered or lowered.lstrip().startswith((b"<!doctype", b"<?xml")):
        return "it is an HTML/XML page, not data (an error or sign-in page served in place of the file?)."
    # Parquet starts and ends with the magic "PAR1"; a start without the end is a file cut short.
    if head.startswith(b"PAR1") and tail != b"PAR1":
        return f"it starts like parquet but its end is missing: it was cut short at {size} bytes (an interrupted download or copy?)."
    return f"{str(error).strip()}."


@dataclass(frozen=True)
class TripSource:
    """A place trip files come from (URL prefix or folder) and the cache for downloads."""

    location: str
    cache_dir: Path

    def _local_path(self, color: str, month: Month) -> Path:
        """Where the month's file is read from: the folder's file itself, or the download cache's copy."""
        name = trip_filename(color, month)
        if is_url(self.location):
            return self.cache_dir / color / name
        return Path(self.location).expanduser().resolve() / name

    def local_copy(self, color: str, month: Month) -> Path | None:
        """Where the month's file already is on this machine, or None; never downloads or validates."""
        path = self._local_path(color, month)
        return path if path.is_file() else None

    def ensure_local(
        self,
        color: str,
        month: Month,
        timeout_seconds: float = 60.0,
        *,
        attempts: int = DOWNLOAD_ATTEMPTS,
        backoff_seconds: float = DOWNLOAD_BACKOFF_SECONDS,
    ) -> Path:
        """Return a validated local path to the month's file, downloading it if needed.

        Folder source: the file itself, which is the user's and is never moved or deleted,
        only reported. URL source: the cached copy; a cached copy that no longer validates
        is renamed `<name>.invalid` and downloaded again (see download_file for retries).

        Raises TripFileNotFound (no such file), TripFileInvalid (the file is unusable) or
        TripDownloadError (the download kept failing), all TripDataErrors.
        """
        name = trip_filename(color, month)
        if not is_url(self.location):
            path = self._local_path(color, month)
            if not path.is_file():
                raise TripFileNotFound(
                    f"no {color} trip file for {month} at {path}. Put TLC's {name} in that folder, "
                    f"or point the data source at a folder or URL that has it."
                )
            try:
                validate_trip_file(path, color)
            except TripFileInvalid as error:
                raise TripFileInvalid(
                    f"{error} The file belongs to the data source folder, so it was left untouched: "
                    f"replace it with TLC's {name}."
                ) from error
            return path
        cached = self._local_path(color, month)
        if cached.is_file():
            try:
                validate_trip_file(cached, color)
                return cached
            except TripFileInvalid as error:
                aside = _move_aside(cached)
                _log.warning("%s; moved aside as %s, downloading it again", error, aside)
        url = f"{self.location.rstrip('/')}/{name}"
        download_file(
            url, cached, timeout_seconds=timeout_seconds,
            validate=lambda path: validate_trip_file(path, color, name=url),
            attempts=attempts, backoff_seconds=backoff_seconds,
        )
        return cached


def _move_aside(path: Path) -> Path:
    """Rename a bad file to `<name>.invalid` (replacing an older one) so no later run trusts it."""
    target = path.with_name(path.name + ".invalid")
    try:
        os.replace(path, target)
    except FileNotFoundError:
        pass  # another run sharing the cache moved it first
    return target


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
            _log.warning("download of %s failed (%s); attempt %d of %d, retrying in %g s",
                         url, failure, attempt, attempts, delay)
            time.sleep(delay)


def _download_once(url: str, destination: Path, timeout_seconds: float, validate: Callable[[Path], object] | None) -> None:
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
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
                    requests.exceptions.ContentDecodingError) as error:
                # urllib3 notices most short bodies itself (IncompleteRead); say it in the same words.
                received = response.raw.tell()
                of = f" of {expected}" if expected is not None else ""
                why = "" if "IncompleteRead" in str(error) else f" ({_innermost(error)})"
                raise _Transient(f"the body was cut short after {received}{of} bytes{why}") from error
            # Bytes that crossed the wire (before any Content-Encoding was undone), which is
            # what Content-Length counts.
            received = response.raw.tell()
            if expected is not None and received != int(expected):
                raise _Transient(f"the body was cut short: {received} bytes arrived, shorter than its Content-Length {expected}")
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


def read_trips(path: Path, color: str, columns: list[str] | None = None) -> pd.DataFrame:
    """Read a trip file with explicit dtypes, whatever TLC file version wrote it.

    TLC changed types between releases (location ids int64 vs int32, counts double vs
    int64, `ehail_fee` null vs double); casting here keeps months comparable.

    Raises TripFileInvalid naming `path` when it is not a usable trip file (the same words
    as validate_trip_file), including damage the footer check cannot see.
    """
    import pandas as pd  # here, not at import: the command line decides which kernels to start without it

    try:
        validate_trip_file(path, color)
        frame = pd.read_parquet(path, columns=columns)
    except TripFileInvalid as error:
        raise TripFileInvalid(f"{error} Replace or delete the file and fetch the month again.") from error
    except (OSError, pa.ArrowException) as error:
        # The footer was fine but the data pages are not: a file damaged in the middle.
        raise TripFileInvalid(
            f"{path} could not be read as a {color} trip file ({str(error).strip()}). Replace or delete the file and fetch the month again."
        ) from error
    return normalize_trips(frame, color)


def normalize_trips(frame: pd.DataFrame, color: str) -> pd.DataFrame:
    """Cast the columns the pipeline uses to one dtype each; raise naming a missing column."""
    import pandas as pd

    missing = [column for column in required_columns(color) if column not in frame.columns]
    if missing:
        raise TripDataError(f"trip data lacks required column(s): {', '.join(missing)}")
    frame = frame.copy()
    for column in (PICKUP_COLUMN[color], DROPOFF_COLUMN[color]):
        frame[column] = pd.to_datetime(frame[column]).astype("datetime64[us]")
    for column in LOCATION_COLUMNS:
        frame[column] = frame[column].astype("Int64")
    frame[DISTANCE_COLUMN] = frame[DISTANCE_COLUMN].astype("float64")
    if "VendorID" in frame.columns:
        frame["VendorID"] = frame["VendorID"].astype("Int64")
    for column in ("passenger_count", "RatecodeID", "payment_type", "trip_type"):
        if column in frame.columns:
            frame[column] = frame[column].astype("Float64")
    if "ehail_fee" in frame.columns:
        frame["ehail_fee"] = frame["ehail_fee"].astype("float64")
    if "store_and_fwd_flag" in frame.columns:
        frame["store_and_fwd_flag"] = frame["store_and_fwd_flag"].astype("string")
    return frame


def trip_source(location: str | None = None, cache_dir: str | Path | None = None) -> TripSource:
    """A TripSource from notebook/flow parameters; None means the configured default."""
    from taxi_duration import settings

    return TripSource(location or settings.data_source(), Path(cache_dir) if cache_dir else settings.data_dir())


def check_source_location(location: str) -> None:
    """A source must be an http(s) URL prefix or an existing folder; say which it is not."""
    if is_url(location):
        return
    if "://" in location:
        raise TripDataError(f"data source {location!r} is neither an http(s) URL nor a folder")
    if not Path(location).expanduser().is_dir():
        raise TripDataError(f"data source {location!r} is not an http(s) URL and no such folder exists")
