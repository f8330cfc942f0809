"""TLC trip files: where they come from, how they are cached and validated, how they are read.

A trip file is `{color}_tripdata_{YYYY}-{MM}.parquet`. The source is either a URL prefix
(TLC's public location by default) or a local folder. Downloads land in a cache folder,
written under a temporary name and renamed only after validation, so a file in the cache
is always one that passed validation.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from taxi_duration.periods import Month

PICKUP_COLUMN = {"green": "lpep_pickup_datetime", "yellow": "tpep_pickup_datetime"}
DROPOFF_COLUMN = {"green": "lpep_dropoff_datetime", "yellow": "tpep_dropoff_datetime"}
LOCATION_COLUMNS = ("PULocationID", "DOLocationID")
DISTANCE_COLUMN = "trip_distance"


class TripDataError(Exception):
    """A trip file that cannot be used; the message names the file and the problem."""


class TripFileNotFound(TripDataError):
    """The source has no file for that month (not published, or a wrong source)."""


def required_columns(color: str) -> tuple[str, ...]:
    """Columns the pipeline cannot work without, for one taxi colour."""
    return (PICKUP_COLUMN[color], DROPOFF_COLUMN[color], *LOCATION_COLUMNS, DISTANCE_COLUMN)


def trip_filename(color: str, month: Month) -> str:
    return f"{color}_tripdata_{month.label()}.parquet"


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def validate_trip_file(path: Path, color: str) -> int:
    """Check that `path` is readable parquet with the required columns and at least one row.

    Returns the row count. Raises TripDataError naming the file and what is wrong.
    """
    try:
        metadata = pq.read_metadata(path)
    except (OSError, pa.ArrowException) as error:
        raise TripDataError(f"{path} is not a readable parquet file: {error}") from error
    names = set(metadata.schema.to_arrow_schema().names)
    missing = [column for column in required_columns(color) if column not in names]
    if missing:
        raise TripDataError(
            f"{path} lacks the column(s) {', '.join(missing)} that {color} trip files have; "
            f"is it a {color} taxi file?"
        )
    if metadata.num_rows == 0:
        raise TripDataError(f"{path} has no rows")
    return metadata.num_rows


@dataclass(frozen=True)
class TripSource:
    """A place trip files come from (URL prefix or folder) and the cache for downloads."""

    location: str
    cache_dir: Path

    def ensure_local(self, color: str, month: Month, timeout_seconds: float = 60.0) -> Path:
        """Return a validated local path to the month's file, downloading it if needed."""
        name = trip_filename(color, month)
        if not is_url(self.location):
            path = Path(self.location).expanduser().resolve() / name
            if not path.is_file():
                raise TripFileNotFound(f"no {color} trip file for {month} at {path}")
            validate_trip_file(path, color)
            return path
        cached = self.cache_dir / color / name
        if cached.is_file():
            try:
                validate_trip_file(cached, color)
                return cached
            except TripDataError:
                _move_aside(cached)
        url = f"{self.location.rstrip('/')}/{name}"
        download_file(url, cached, timeout_seconds=timeout_seconds, validate=lambda p: validate_trip_file(p, color))
        return cached


def _move_aside(path: Path) -> Path:
    """Rename a bad file so no later run trusts it, keeping it for inspection."""
    target = path.with_name(path.name + ".invalid")
    os.replace(path, target)
    return target


def download_file(url: str, destination: Path, timeout_seconds: float = 60.0, validate=None) -> None:
    """Stream `url` to `destination` atomically: a temporary file, checked, then renamed.

    A body shorter than its Content-Length, an HTTP error or a failed `validate(path)` leaves
    nothing at `destination`.
    """
    import requests  # imported here: only downloads need it

    destination.parent.mkdir(parents=True, exist_ok=True)
    # Ask for the bytes as stored: Content-Length then counts what we write.
    headers = {"Accept-Encoding": "identity"}
    with requests.get(url, stream=True, timeout=timeout_seconds, headers=headers) as response:
        if response.status_code in (403, 404):
            raise TripFileNotFound(f"{url} answered HTTP {response.status_code}: not published or not found")
        response.raise_for_status()
        expected = response.headers.get("Content-Length")
        handle, temporary_name = tempfile.mkstemp(prefix=destination.name + ".", suffix=".part", dir=destination.parent)
        temporary = Path(temporary_name)
        try:
            with os.fdopen(handle, "wb") as sink:
                for chunk in response.iter_content(chunk_size=1 << 20):
                    sink.write(chunk)
            # Bytes that crossed the wire (before any Content-Encoding was undone), which is
            # what Content-Length counts.
            received = response.raw.tell()
            if expected is not None and received != int(expected):
                raise TripDataError(f"{url}: received {received} bytes of {expected}; the download was cut short")
            if validate is not None:
                validate(temporary)
            os.chmod(temporary, 0o644)  # mkstemp creates 0600; a shared cache must be readable
            os.replace(temporary, destination)
        finally:
            temporary.unlink(missing_ok=True)


def read_trips(path: Path, color: str, columns: list[str] | None = None) -> pd.DataFrame:
    """Read a trip file with explicit dtypes, whatever TLC file version wrote it.

    TLC changed types between releases (location ids int64 vs int32, counts double vs
    int64, `ehail_fee` null vs double); casting here keeps months comparable.
    """
    validate_trip_file(path, color)
    frame = pd.read_parquet(path, columns=columns)
    return normalize_trips(frame, color)


def normalize_trips(frame: pd.DataFrame, color: str) -> pd.DataFrame:
    """Cast the columns the pipeline uses to one dtype each; raise naming a missing column."""
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
