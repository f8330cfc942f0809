"""What can be wrong with a trip file: one TripDataError kind per cause, each naming the file.

TripFileNotFound: the source has no such month (never retried). TripDownloadError: the
network or server kept failing (taxi_duration.data.download has retried already). TripFileInvalid:
the file is there but unusable.
"""

from __future__ import annotations


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
