"""TLC trip files: where they come from, how they are cached and validated, how they are read.

A trip file is `{color}_tripdata_{YYYY}-{MM}.parquet`. The source is either a URL prefix
(TLC's public location by default) or a local folder. Downloads land in a cache folder,
written under a temporary name and renamed only after validation, so a file in the cache
is always one that passed validation.

Failures fall in three kinds, each a TripDataError whose message names the URL or file:
TripFileNotFound (the source has no such month; never retried), TripDownloadError (the
network or server kept failing; taxi_duration.data.download retries transient failures, with
doubling waits, before raising it) and TripFileInvalid (the file is there but unusable).
An unusable download, or a cached file that went bad, is kept only as `<name>.invalid`
for inspection, never under its real name; a folder source's files are the user's and are
never moved or deleted.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq

from taxi_duration import settings
from taxi_duration.data.download import DOWNLOAD_ATTEMPTS, DOWNLOAD_BACKOFF_SECONDS, download_file
from taxi_duration.data.periods import Month

# The error kinds are part of this module's interface too: callers catch data.TripDataError.
from taxi_duration.data.trip_errors import TripDataError, TripDownloadError, TripFileInvalid, TripFileNotFound  # noqa: F401 - re-exported

if TYPE_CHECKING:
    import pandas as pd

PICKUP_COLUMN = {"green": "lpep_pickup_datetime", "yellow": "tpep_pickup_datetime"}
DROPOFF_COLUMN = {"green": "lpep_dropoff_datetime", "yellow": "tpep_dropoff_datetime"}
LOCATION_COLUMNS = ("PULocationID", "DOLocationID")
DISTANCE_COLUMN = "trip_distance"


_log = logging.getLogger(__name__)


def required_columns(color: str, actuals: bool = True) -> tuple[str, ...]:
    """Columns the pipeline cannot work without, for one taxi colour.

    `actuals` False: what scoring needs, a month whose dropoff times may not be published yet.
    """
    dropoff = (DROPOFF_COLUMN[color],) if actuals else ()
    return (PICKUP_COLUMN[color], *dropoff, *LOCATION_COLUMNS, DISTANCE_COLUMN)


def trip_filename(color: str, month: Month) -> str:
    """TLC's name for the month's file of one colour: `{color}_tripdata_{YYYY-MM}.parquet`."""
    return f"{color}_tripdata_{month.label()}.parquet"


def trip_file_month(color: str, filename: str) -> Month | None:
    """The month of a file named as trip_filename names `color`'s files; None for any other name."""
    matched = re.fullmatch(rf"{re.escape(color)}_tripdata_(\d{{4}})-(0[1-9]|1[0-2])\.parquet", filename)
    return Month(int(matched[1]), int(matched[2])) if matched else None


def is_url(source: str) -> bool:
    """Whether a data source is an http(s) URL prefix (otherwise it is a folder)."""
    return source.startswith(("http://", "https://"))


def validate_trip_file(path: Path, color: str, name: str | None = None, *, actuals: bool = True) -> int:
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
    missing = [column for column in required_columns(color, actuals) if column not in names]
    if missing:
        raise TripFileInvalid(
            f"{name} lacks the column(s) {', '.join(missing)} that {color} trip files have; is it a {color} taxi file?"
        )
    if metadata.num_rows == 0:
        raise TripFileInvalid(f"{name} has no rows: it is valid parquet with the right columns but holds no trips.")
    return metadata.num_rows


def available_columns(path: Path) -> list[str]:
    """The columns a local parquet file holds (from its footer)."""
    return list(pq.read_schema(path).names)


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

    def origin(self, color: str, month: Month) -> str:
        """Where the month's file comes from: its URL, or its path in the folder source."""
        if is_url(self.location):
            return f"{self.location.rstrip('/')}/{trip_filename(color, month)}"
        return str(self._local_path(color, month))

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
        actuals: bool = True,
    ) -> Path:
        """Return a validated local path to the month's file, downloading it if needed.

        Folder source: the file itself, which is the user's and is never moved or deleted,
        only reported. URL source: the cached copy; a cached copy that no longer validates
        is renamed `<name>.invalid` and downloaded again (see download_file for retries).

        Raises TripFileNotFound (no such file), TripFileInvalid (the file is unusable) or
        TripDownloadError (the download kept failing), all TripDataErrors. `actuals` False
        accepts a file without dropoff times (see required_columns).
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
                validate_trip_file(path, color, actuals=actuals)
            except TripFileInvalid as error:
                raise TripFileInvalid(
                    f"{error} The file belongs to the data source folder, so it was left untouched: "
                    f"replace it with TLC's {name}."
                ) from error
            return path
        cached = self._local_path(color, month)
        if cached.is_file():
            try:
                validate_trip_file(cached, color, actuals=actuals)
                return cached
            except TripFileInvalid as error:
                aside = _move_aside(cached)
                _log.warning("%s; moved aside as %s, downloading it again", error, aside)
        url = f"{self.location.rstrip('/')}/{name}"
        download_file(
            url,
            cached,
            timeout_seconds=timeout_seconds,
            validate=lambda path: validate_trip_file(path, color, name=url, actuals=actuals),
            attempts=attempts,
            backoff_seconds=backoff_seconds,
        )
        return cached


def _move_aside(path: Path) -> Path:
    """Rename a bad file to `<name>.invalid` (replacing an older one) so no later run trusts it."""
    target = path.with_name(path.name + ".invalid")
    with contextlib.suppress(FileNotFoundError):  # another run sharing the cache moved it first
        os.replace(path, target)
    return target


def read_trips(path: Path, color: str, columns: list[str] | None = None, *, actuals: bool = True) -> pd.DataFrame:
    """Read a trip file with explicit dtypes, whatever TLC file version wrote it.

    TLC changed types between releases (location ids int64 vs int32, counts double vs
    int64, `ehail_fee` null vs double); casting here keeps months comparable.

    Raises TripFileInvalid naming `path` when it is not a usable trip file (the same words
    as validate_trip_file), including damage the footer check cannot see.
    """
    import pandas as pd  # here, not at import: the command line decides which kernels to start without it

    try:
        validate_trip_file(path, color, actuals=actuals)
        frame = pd.read_parquet(path, columns=columns)
    except TripFileInvalid as error:
        raise TripFileInvalid(f"{error} Replace or delete the file and fetch the month again.") from error
    except (OSError, pa.ArrowException) as error:
        # The footer was fine but the data pages are not: a file damaged in the middle.
        raise TripFileInvalid(
            f"{path} could not be read as a {color} trip file ({str(error).strip()}). Replace or delete the file and fetch the month again."
        ) from error
    return normalize_trips(frame, color, actuals=actuals)


def normalize_trips(frame: pd.DataFrame, color: str, *, actuals: bool = True) -> pd.DataFrame:
    """Cast the columns the pipeline uses to one dtype each; raise naming a missing column."""
    import pandas as pd

    missing = [column for column in required_columns(color, actuals) if column not in frame.columns]
    if missing:
        raise TripDataError(f"trip data lacks required column(s): {', '.join(missing)}")
    frame = frame.copy()
    for column in (PICKUP_COLUMN[color], DROPOFF_COLUMN[color]):
        if column in frame.columns:
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
    """A TripSource from notebook/flow parameters; None means the configured default.

    Relative folders mean the project root (`settings.project_path`), wherever the process runs.
    """
    location = location or settings.data_source()
    if not is_url(location) and "://" not in location:
        location = str(settings.project_path(location))
    return TripSource(location, settings.project_path(cache_dir) if cache_dir else settings.data_dir())


def check_source_location(location: str) -> None:
    """A source must be an http(s) URL prefix or an existing folder; say which it is not."""
    if is_url(location):
        return
    if "://" in location:
        raise TripDataError(f"data source {location!r} is neither an http(s) URL nor a folder")
    if not settings.project_path(location).is_dir():
        raise TripDataError(f"data source {location!r} is not an http(s) URL and no such folder exists")
