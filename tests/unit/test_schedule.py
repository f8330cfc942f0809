"""schedule: which month a scheduled run trains on, from a folder or a real local HTTP server."""

from __future__ import annotations

import datetime as dt
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from taxi_duration.data.periods import InvalidParameterError, Month
from taxi_duration.data.tripfiles import TripDataError, trip_filename
from taxi_duration.orchestration import schedule
from taxi_duration.orchestration.schedule import (
    NoPublishedMonthError,
    PublicationCheckError,
    is_published,
    newest_trainable_month,
)

AUGUST_15 = dt.date(2023, 8, 15)


def months(first: str, last: str) -> list[Month]:
    """Every month from `first` to `last` (YYYY-MM), inclusive."""
    month, end = Month(*map(int, first.split("-"))), Month(*map(int, last.split("-")))
    result = []
    while month <= end:
        result.append(month)
        month = month.next()
    return result


def folder_with(tmp_path: Path, *published: Month, color: str = "green") -> Path:
    """A data-source folder holding empty placeholder files: is_published checks existence only."""
    folder = tmp_path / "tlc"
    folder.mkdir(exist_ok=True)
    for month in published:
        (folder / trip_filename(color, month)).touch()
    return folder


# --- is_published: folders ------------------------------------------------------------


def test_folder_file_present_is_published(tmp_path):
    folder = folder_with(tmp_path, Month(2023, 3))
    assert is_published(str(folder), "green", Month(2023, 3)) is True


def test_folder_file_absent_is_not_published(tmp_path):
    folder = folder_with(tmp_path, Month(2023, 3))
    assert is_published(str(folder), "green", Month(2023, 4)) is False
    assert is_published(str(folder), "yellow", Month(2023, 3)) is False


def test_missing_folder_is_an_error_not_an_empty_source(tmp_path):
    with pytest.raises(TripDataError, match="no such folder"):
        is_published(str(tmp_path / "nowhere"), "green", Month(2023, 3))


# --- is_published: a real HTTP server ---------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    """Answers HEAD with the status the server's table gives the path (404 by default)."""

    def do_HEAD(self) -> None:
        self.server.requests.append(self.path)
        status, location, delay = self.server.answers.get(self.path, (404, None, 0))
        time.sleep(delay)
        self.send_response(status)
        if location:
            self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format, *args) -> None:  # keep test output clean
        pass


class _Server:
    def __init__(self, httpd: ThreadingHTTPServer) -> None:
        self.httpd = httpd
        self.prefix = f"http://127.0.0.1:{httpd.server_address[1]}/trip-data"

    def answer(self, color: str, month: Month, status: int, location: str | None = None, delay: float = 0) -> None:
        self.httpd.answers[f"/trip-data/{trip_filename(color, month)}"] = (status, location, delay)

    @property
    def requests(self) -> list[str]:
        return self.httpd.requests


@pytest.fixture
def http_source():
    """A real HTTP server on an ephemeral port of 127.0.0.1, serving HEAD from a table."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.answers = {}
    httpd.requests = []
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield _Server(httpd)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def test_http_200_is_published(http_source):
    http_source.answer("green", Month(2023, 3), 200)
    assert is_published(http_source.prefix, "green", Month(2023, 3)) is True
    assert http_source.requests == ["/trip-data/green_tripdata_2023-03.parquet"]


def test_http_trailing_slash_in_prefix_is_ignored(http_source):
    http_source.answer("green", Month(2023, 3), 200)
    assert is_published(http_source.prefix + "/", "green", Month(2023, 3)) is True


def test_http_404_is_not_published(http_source):
    http_source.answer("green", Month(2023, 3), 404)
    assert is_published(http_source.prefix, "green", Month(2023, 3)) is False


def test_http_403_is_not_published_as_cloudfront_answers_for_missing_files(http_source):
    http_source.answer("green", Month(2023, 3), 403)
    assert is_published(http_source.prefix, "green", Month(2023, 3)) is False


def test_http_redirect_is_followed_to_the_file(http_source):
    http_source.answer("green", Month(2023, 3), 301, location="/moved/green_tripdata_2023-03.parquet")
    http_source.httpd.answers["/moved/green_tripdata_2023-03.parquet"] = (200, None, 0)
    assert is_published(http_source.prefix, "green", Month(2023, 3)) is True


def test_http_500_is_an_error_naming_the_url_and_status(http_source):
    http_source.answer("green", Month(2023, 3), 500)
    with pytest.raises(PublicationCheckError, match=r"green_tripdata_2023-03\.parquet.*HTTP 500"):
        is_published(http_source.prefix, "green", Month(2023, 3))


def test_http_timeout_is_an_error_not_unpublished(http_source):
    http_source.answer("green", Month(2023, 3), 200, delay=1.0)
    with pytest.raises(PublicationCheckError, match="could not check whether"):
        is_published(http_source.prefix, "green", Month(2023, 3), timeout_seconds=0.2)


def test_connection_refused_is_an_error_not_unpublished():
    # A bound socket that never listens: connections to it are refused, and no other
    # process can take the port while the test holds it.
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        prefix = f"http://127.0.0.1:{closed.getsockname()[1]}/trip-data"
        with pytest.raises(PublicationCheckError, match=f"127.0.0.1:{closed.getsockname()[1]}"):
            is_published(prefix, "green", Month(2023, 3), timeout_seconds=2)


# --- newest_trainable_month ---------------------------------------------------------------


def test_newest_month_whose_next_month_is_published(tmp_path):
    folder = folder_with(tmp_path, *months("2023-01", "2023-05"))
    # 2023-06 and 2023-07 could be trained on by date, but 2023-06 and 2023-07 have no files.
    assert newest_trainable_month(str(folder), "green", today=AUGUST_15) == Month(2023, 4)


def test_gap_skips_both_months_that_need_the_missing_file(tmp_path):
    folder = folder_with(tmp_path, *months("2023-01", "2023-03"), Month(2023, 5))
    # 2023-04 is missing: neither 2023-04 (its own file) nor 2023-03 (its validation file).
    assert newest_trainable_month(str(folder), "green", today=AUGUST_15) == Month(2023, 2)


def test_validation_month_must_have_ended_even_if_its_file_exists(tmp_path):
    folder = folder_with(tmp_path, *months("2023-01", "2023-05"))
    # On May 1st, May has not ended: 2023-04 cannot be validated yet, whatever the folder holds.
    assert newest_trainable_month(str(folder), "green", today=dt.date(2023, 5, 1)) == Month(2023, 3)
    assert newest_trainable_month(str(folder), "green", today=dt.date(2023, 5, 31)) == Month(2023, 3)
    assert newest_trainable_month(str(folder), "green", today=dt.date(2023, 6, 1)) == Month(2023, 4)


def test_too_early_for_any_published_pair_names_folder_and_newest_trainable_month(tmp_path):
    folder = folder_with(tmp_path, *months("2023-01", "2023-05"))
    # On 2023-02-10 the newest trainable month is 2022-12, and nothing that old is in the folder.
    with pytest.raises(NoPublishedMonthError) as raised:
        newest_trainable_month(str(folder), "green", today=dt.date(2023, 2, 10))
    message = str(raised.value)
    assert str(folder) in message
    assert "2013-08 to 2022-12" in message
    assert "2023-01, 2023-02, 2023-03, 2023-04, 2023-05" in message


def test_a_folder_is_listed_whatever_the_age_of_its_files(tmp_path):
    # The scheduled case on a folder of old files: 2021 only, years before today's window.
    folder = folder_with(tmp_path, Month(2021, 1), Month(2021, 2))
    assert newest_trainable_month(str(folder), "green", today=dt.date(2026, 12, 2)) == Month(2021, 1)
    # The newest pair wins, even with an older pair and lone newer files around it.
    folder = folder_with(tmp_path, Month(2022, 1), Month(2022, 2), *months("2023-01", "2023-05"), Month(2024, 7))
    assert newest_trainable_month(str(folder), "green", today=dt.date(2026, 12, 2)) == Month(2023, 4)


def test_a_folder_ignores_other_colours_other_names_and_folders(tmp_path):
    folder = folder_with(tmp_path, Month(2021, 1), Month(2021, 2))
    folder_with(tmp_path, Month(2023, 1), Month(2023, 2), color="yellow")
    (folder / "green_tripdata_2023-03.parquet.partial").touch()
    (folder / "green_tripdata_2023-04.parquet").mkdir()
    (folder / "green_tripdata_2023-13.parquet").touch()
    (folder / "green_tripdata_2023-05.csv").touch()
    assert newest_trainable_month(str(folder), "green", today=dt.date(2026, 12, 2)) == Month(2021, 1)
    assert newest_trainable_month(str(folder), "yellow", today=dt.date(2026, 12, 2)) == Month(2023, 1)


def test_the_real_folder_trains_on_its_newest_pair():
    real = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "tlc"
    if not (real / "green_tripdata_2023-05.parquet").is_file():
        pytest.skip(f"the real TLC files are not at {real}")
    assert newest_trainable_month(str(real), "green") == Month(2023, 4)


def test_year_boundary(tmp_path):
    folder = folder_with(tmp_path, Month(2022, 12), Month(2023, 1))
    assert newest_trainable_month(str(folder), "green", today=dt.date(2023, 3, 10)) == Month(2022, 12)


def test_nothing_published_names_the_folder_the_range_and_what_was_found(tmp_path):
    folder = folder_with(tmp_path, Month(2023, 2), Month(2023, 4))  # never two consecutive months
    with pytest.raises(NoPublishedMonthError) as raised:
        newest_trainable_month(str(folder), "green", today=AUGUST_15)
    message = str(raised.value)
    assert str(folder) in message
    assert "2013-08 to 2023-06" in message
    assert "2023-02, 2023-04" in message
    assert isinstance(raised.value, ValueError)


def test_empty_folder_is_an_error_naming_the_folder(tmp_path):
    folder = folder_with(tmp_path)
    with pytest.raises(NoPublishedMonthError, match="files found for: none") as raised:
        newest_trainable_month(str(folder), "green", today=AUGUST_15)
    assert f"in the folder {folder}:" in str(raised.value)


def test_lookback_limits_the_search_of_a_url_source(http_source):
    http_source.answer("green", Month(2023, 1), 200)
    http_source.answer("green", Month(2023, 2), 200)
    with pytest.raises(NoPublishedMonthError) as raised:
        newest_trainable_month(http_source.prefix, "green", today=AUGUST_15, lookback_months=3)
    message = str(raised.value)
    assert "searched training months 2023-04 to 2023-06, the last 3" in message
    assert "TAXI_LATEST_LOOKBACK_MONTHS sets how many months back" in message
    assert http_source.prefix in message
    assert newest_trainable_month(http_source.prefix, "green", today=AUGUST_15, lookback_months=6) == Month(2023, 1)


def test_lookback_of_a_url_source_is_a_knob(http_source, monkeypatch):
    http_source.answer("green", Month(2023, 1), 200)
    http_source.answer("green", Month(2023, 2), 200)
    monkeypatch.setenv("TAXI_LATEST_LOOKBACK_MONTHS", "3")
    with pytest.raises(NoPublishedMonthError, match="the last 3"):
        newest_trainable_month(http_source.prefix, "green", today=AUGUST_15)
    monkeypatch.setenv("TAXI_LATEST_LOOKBACK_MONTHS", "6")
    assert newest_trainable_month(http_source.prefix, "green", today=AUGUST_15) == Month(2023, 1)
    monkeypatch.setenv("TAXI_LATEST_LOOKBACK_MONTHS", "a year")
    with pytest.raises(ValueError, match="TAXI_LATEST_LOOKBACK_MONTHS must be a whole number of months, got 'a year'"):
        newest_trainable_month(http_source.prefix, "green", today=AUGUST_15)


def test_search_stops_at_the_first_month_tlc_published_for_the_colour(tmp_path):
    # Green taxi records start in 2013-08.
    folder = folder_with(tmp_path, Month(2013, 8), Month(2013, 9))
    assert newest_trainable_month(str(folder), "green", today=dt.date(2013, 10, 5)) == Month(2013, 8)
    # 2013-07 and earlier are not searched, whatever the lookback.
    (folder / trip_filename("green", Month(2013, 9))).unlink()
    with pytest.raises(NoPublishedMonthError, match="2013-08 to 2013-09"):
        newest_trainable_month(str(folder), "green", today=dt.date(2013, 11, 5))
    with pytest.raises(NoPublishedMonthError, match=r"before TLC's first green month \(2013-08\)"):
        newest_trainable_month(str(folder), "green", today=dt.date(2013, 9, 15))


def test_colour_is_normalised_and_checked(tmp_path):
    folder = folder_with(tmp_path, *months("2023-01", "2023-05"), color="yellow")
    assert newest_trainable_month(str(folder), " Yellow ", today=AUGUST_15) == Month(2023, 4)
    with pytest.raises(InvalidParameterError, match="color must be one of green, yellow"):
        newest_trainable_month(str(folder), "blue", today=AUGUST_15)


def test_lookback_must_be_positive(tmp_path):
    with pytest.raises(InvalidParameterError, match="lookback_months must be at least 1"):
        newest_trainable_month(str(folder_with(tmp_path)), "green", today=AUGUST_15, lookback_months=0)


def test_url_source_checks_each_file_once(http_source):
    for month in months("2023-01", "2023-05"):
        http_source.answer("green", month, 200)
    assert newest_trainable_month(http_source.prefix, "green", today=AUGUST_15) == Month(2023, 4)
    # Walking back, a month's validation file is the month checked just before it.
    checked = [path.rsplit("_", 1)[1] for path in http_source.requests]
    assert checked == ["2023-07.parquet", "2023-06.parquet", "2023-05.parquet", "2023-04.parquet"]


def test_url_source_error_stops_the_search_instead_of_falling_back(http_source):
    for month in months("2023-01", "2023-05"):
        http_source.answer("green", month, 200)
    http_source.answer("green", Month(2023, 6), 503)
    with pytest.raises(PublicationCheckError, match="HTTP 503"):
        newest_trainable_month(http_source.prefix, "green", today=AUGUST_15)


def test_today_defaults_to_the_date_periods_checks_against(tmp_path):
    folder = folder_with(tmp_path)
    with pytest.raises(NoPublishedMonthError) as raised:
        newest_trainable_month(str(folder), "green")
    today = dt.date.today()
    newest = Month(today.year, today.month)
    for _ in range(2):
        newest = Month(newest.year - 1, 12) if newest.month == 1 else Month(newest.year, newest.month - 1)
    assert f"to {newest}" in str(raised.value)


# --- deployment defaults -----------------------------------------------------------------


def test_deployment_parameters_pick_the_newest_green_month():
    assert schedule.deployment_parameters() == {"year": None, "month": None, "color": "green"}


def test_deployment_parameters_are_a_fresh_dict_each_call():
    schedule.deployment_parameters()["color"] = "yellow"
    assert schedule.deployment_parameters()["color"] == "green"
