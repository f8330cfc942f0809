"""Scheduled runs: which month a run without YEAR/MONTH trains on, and when runs happen.

TLC publishes each month's trip file roughly two months after the month ends, on no fixed
day. A training month needs its own file and the following month's (the validation data),
so a scheduled run cannot name its month in advance: it asks the data source which months
are there and trains on the newest month whose validation month is also published.

The deployment (flows/serve.py for `prefect.serve`, prefect.yaml for `prefect deploy`)
takes its schedule, name and default parameters from here, so both stay in step.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from taxi_duration import settings
from taxi_duration.data import tripfiles
from taxi_duration.data.periods import COLORS, FIRST_PUBLISHED, InvalidParameterError, Month, PipelineParams

DEPLOYMENT_NAME = "monthly"
DEPLOYMENT_TAGS = ("nyc-taxi", "scheduled")
DEPLOYMENT_DESCRIPTION = (
    "Monthly retraining of the NYC taxi trip-duration model. With YEAR and MONTH unset, a run "
    "trains on the newest month whose file and the following month's file TLC has published."
)

# 06:00 UTC on the 3rd of every month. TLC's publication day varies from month to month,
# so no date is guaranteed to see a new file; a monthly run early in the month trains on
# whatever appeared during the previous month, and a file published late is simply picked
# up by the next run, because the month is chosen when the run starts, not when it is
# scheduled. The 3rd rather than the 1st leaves room for uploads dated the month's end.
MONTHLY_CRON = "0 6 3 * *"
# Explicit so the run time does not move with the server's or the worker's local zone.
SCHEDULE_TIMEZONE = "UTC"

# The answers TLC's CloudFront gives for a file that is not there: it answers 403, not
# 404, for a missing object, so both mean "not published".
_NOT_PUBLISHED_STATUSES = (403, 404)


class NoPublishedMonthError(ValueError):
    """No month in the searched range has both its own and the next month's file."""


class PublicationCheckError(RuntimeError):
    """The source could not say whether a file exists (network error, unexpected HTTP status)."""


def is_published(location: str, color: str, month: Month, timeout_seconds: float = 10) -> bool:
    """Whether `location` has the trip file of `color` taxis for `month`.

    `location` is a folder (the file exists there) or an http(s) URL prefix (a HEAD request
    for `{prefix}/{filename}`: 200 means published, 403 or 404 means not). Only existence
    is checked; the pipeline validates the file's content when it fetches it.

    Raises PublicationCheckError for any other HTTP status or a network failure: a flaky
    network must not be mistaken for "not published" and make a run train on an older month.
    Raises data.TripDataError when `location` is neither a URL nor an existing folder.
    """
    name = tripfiles.trip_filename(color, month)
    tripfiles.check_source_location(location)
    if not tripfiles.is_url(location):
        return (settings.project_path(location) / name).is_file()

    import requests  # imported here: only URL sources need it

    url = f"{location.rstrip('/')}/{name}"
    try:
        # Redirects are followed so that a moved bucket answers with the file's own status.
        response = requests.head(url, timeout=timeout_seconds, allow_redirects=True)
    except requests.RequestException as error:
        raise PublicationCheckError(f"could not check whether {url} is published: {error}") from error
    if response.status_code == 200:
        return True
    if response.status_code in _NOT_PUBLISHED_STATUSES:
        return False
    raise PublicationCheckError(
        f"could not check whether {url} is published: HEAD answered HTTP {response.status_code} "
        f"(expected 200 for published, 403 or 404 for not published)"
    )


def newest_trainable_month(
    location: str,
    color: str,
    today: dt.date | None = None,
    lookback_months: int | None = None,
    timeout_seconds: float = 10,
) -> Month:
    """The newest training month M whose own file and validation file (M + 1) are published.

    M must also be trainable on `today`: its validation month must have ended (two months
    before today's month at the latest, see PipelineParams.parse), and M is never before
    TLC's first month for `color`. `today` defaults to the local date, the one
    PipelineParams.parse checks against, so the month returned always passes the flow's own
    check.

    A folder source is listed: the newest month with both files wins, whatever its age. A URL
    source cannot be listed, so it is asked file by file (each file at most once), walking
    back at most `lookback_months` months (default: settings.latest_lookback_months, the
    `TAXI_LATEST_LOOKBACK_MONTHS` knob).

    Raises NoPublishedMonthError naming the source (and for a URL the months searched and the
    knob) when no month qualifies, InvalidParameterError for an unknown colour or a
    `lookback_months` below 1, and PublicationCheckError when a URL source cannot answer
    (see is_published).
    """
    color_text = str(color).strip().lower()
    if color_text not in COLORS:
        raise InvalidParameterError(f"color must be one of {', '.join(COLORS)}, got {color!r}")
    if lookback_months is None:
        lookback_months = settings.latest_lookback_months()
    if lookback_months < 1:
        raise InvalidParameterError(f"lookback_months must be at least 1, got {lookback_months}")
    tripfiles.check_source_location(location)
    today = today or dt.date.today()

    newest = Month(today.year, today.month).previous().previous()
    first = Month(*FIRST_PUBLISHED[color_text])
    where = f"{color_text} trip files at {location}"
    if newest < first:
        raise NoPublishedMonthError(
            f"no trainable month for {where}: on {today.isoformat()} the newest possible training month is "
            f"{newest}, before TLC's first {color_text} month ({first})"
        )
    if tripfiles.is_url(location):
        return _newest_published_by_asking(location, color_text, today, newest, first, lookback_months, timeout_seconds)
    return _newest_in_folder(settings.project_path(location), color_text, today, newest, first)


def _trainable(month: Month, color: str, today: dt.date) -> Month:
    """`month` as PipelineParams.parse accepts it: the one definition of a valid training month.

    The callers only pass months within TLC's range whose validation month is over, so an
    error here would be a bug worth seeing rather than a month to skip.
    """
    return PipelineParams.parse(month.year, month.month, color, today=today).train_month


def _newest_in_folder(folder: Path, color: str, today: dt.date, newest: Month, first: Month) -> Month:
    """The newest month of `folder` (listed) whose next month's file is there too."""
    present = {
        month for path in folder.iterdir() if path.is_file() and (month := tripfiles.trip_file_month(color, path.name))
    }
    trainable = [month for month in present if first <= month <= newest and month.next() in present]
    if trainable:
        return _trainable(max(trainable), color, today)
    found_text = ", ".join(str(month) for month in sorted(present)) if present else "none"
    raise NoPublishedMonthError(
        f"no trainable month for {color} trip files in the folder {folder}: no month from {first} to {newest} "
        f"(the newest that can be trained on {today.isoformat()}) has both its own file and the next month's; "
        f"files found for: {found_text}"
    )


def _newest_published_by_asking(
    prefix: str, color: str, today: dt.date, newest: Month, first: Month, lookback_months: int, timeout_seconds: float
) -> Month:
    """Walk back from `newest` over at most `lookback_months` months, asking the URL source."""
    published: dict[Month, bool] = {}

    def check(month: Month) -> bool:
        if month not in published:
            published[month] = is_published(prefix, color, month, timeout_seconds)
        return published[month]

    candidate = newest
    oldest_searched = newest
    for _ in range(lookback_months):
        if candidate < first:
            break
        oldest_searched = candidate
        # The validation month first: walking back, it is the month checked just before.
        if check(candidate.next()) and check(candidate):
            return _trainable(candidate, color, today)
        candidate = candidate.previous()

    found = sorted(month for month, present in published.items() if present)
    found_text = ", ".join(str(month) for month in found) if found else "none"
    raise NoPublishedMonthError(
        f"no trainable month for {color} trip files at {prefix}: searched training months {oldest_searched} to "
        f"{newest}, the last {lookback_months} (each needs its own file and the next month's; "
        f"{settings.LATEST_LOOKBACK_KNOB} sets how many months back a URL source is searched); "
        f"files found for: {found_text}"
    )


def deployment_parameters() -> dict[str, Any]:
    """Default parameters of the scheduled deployment.

    YEAR and MONTH are None so that each run trains on the newest published month; a
    manual run overrides them (and any other flow parameter) by name.
    """
    return {"year": None, "month": None, "color": "green"}
