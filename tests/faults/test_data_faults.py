"""Trip-file downloads and reads under faults: flaky networks, missing months, bad files.

A. Transient failures (reset connections, HTTP 5xx, bodies cut short, stalls) are retried
   inside download_file with doubling waits, and end in a TripDownloadError naming the URL,
   the attempts and the last cause, leaving nothing in the cache.
B. A month the source does not have is TripFileNotFound at once, never retried.
C. A file that is there but unusable (an HTML page, a truncated parquet, no rows, a column
   missing) is TripFileInvalid naming it; a downloaded or cached one is kept only as
   `<name>.invalid`, never under its real name; a folder source's file is never touched.

Every test passes tiny backoffs, so the whole module runs in a few seconds.
"""

from __future__ import annotations

import inspect
import io
import logging
import socket
import time

import pyarrow.parquet as pq
import pytest
from fault_server import (
    MONTH,
    NAME,
    cut_short,
    files_in,
    ok,
    reset_before_headers,
    reset_mid_body,
    stall,
    status,
)

from taxi_duration.data import tripfiles
from taxi_duration.data.download import download_file, retry_delays
from taxi_duration.data.synthetic import generate_trips_table
from taxi_duration.data.tripfiles import (
    TripDataError,
    TripDownloadError,
    TripFileInvalid,
    TripFileNotFound,
    TripSource,
    read_trips,
    validate_trip_file,
)

FAST = {"timeout_seconds": 5, "backoff_seconds": 0.001}
PATH = f"/trip-data/{NAME}"
HTML_PAGE = b"<!DOCTYPE html><html><body><h1>Service Temporarily Unavailable</h1></body></html>"


def fetch(server, cache, **options):
    """ensure_local for the test month from the fault server, fast unless told otherwise."""
    return TripSource(server.url + "/trip-data", cache).ensure_local("green", MONTH, **{**FAST, **options})


def table_bytes(table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


# What each unusable file is, and the words its error must contain.
BAD_FILES = {
    "html-page": (lambda good: HTML_PAGE, "HTML"),
    "truncated-parquet": (lambda good: good[: len(good) // 2], "cut short"),
    "empty-month": (lambda good: table_bytes(generate_trips_table("green", MONTH, 0)), "has no rows"),
    "missing-column": (
        lambda good: table_bytes(generate_trips_table("green", MONTH, 20).drop_columns(["DOLocationID"])),
        "DOLocationID",
    ),
}


@pytest.fixture(params=sorted(BAD_FILES))
def bad_file(request, trip_bytes) -> tuple[bytes, str]:
    """(bytes, words the error must contain) for each kind of unusable trip file."""
    make, words = BAD_FILES[request.param]
    return make(trip_bytes), words


# --- A. transient failures are retried inside download_file ---------------------------


def test_default_schedule_is_four_attempts_half_a_second_doubling():
    for function in (download_file, TripSource.ensure_local):
        parameters = inspect.signature(function).parameters
        assert parameters["attempts"].default == 4
        assert parameters["backoff_seconds"].default == 0.5
    assert retry_delays(4, 0.5) == [0.5, 1.0, 2.0]
    assert retry_delays(1, 0.5) == []


@pytest.mark.parametrize(
    "first, second", [("503", "502"), ("reset", "500"), ("429", "cut-short"), ("reset-mid-body", "504")]
)
def test_two_failures_then_success_gives_a_valid_file_after_three_requests(
    tmp_path, fault_server, trip_bytes, first, second
):
    faults = {
        "reset": reset_before_headers(),
        "cut-short": cut_short(trip_bytes),
        "reset-mid-body": reset_mid_body(trip_bytes),
    }
    fault_server.script(
        PATH, faults.get(first) or status(int(first)), faults.get(second) or status(int(second)), ok(trip_bytes)
    )
    cache = tmp_path / "cache"

    path = fetch(fault_server, cache)

    assert path.read_bytes() == trip_bytes
    assert validate_trip_file(path, "green") == 64
    assert fault_server.count(PATH) == 3
    assert files_in(cache) == [NAME]  # no temporary from the failed attempts


def test_connection_reset_before_headers_then_success(tmp_path, fault_server, trip_bytes):
    fault_server.script(PATH, reset_before_headers(), ok(trip_bytes))
    path = fetch(fault_server, tmp_path / "cache")
    assert path.read_bytes() == trip_bytes
    assert fault_server.count(PATH) == 2


def test_connection_reset_mid_body_then_success(tmp_path, fault_server, trip_bytes):
    fault_server.script(PATH, reset_mid_body(trip_bytes), ok(trip_bytes))
    path = fetch(fault_server, tmp_path / "cache")
    assert path.read_bytes() == trip_bytes
    assert fault_server.count(PATH) == 2


@pytest.mark.parametrize("attempts", [1, 2, 4])
def test_always_503_fails_after_exactly_the_attempts_and_leaves_nothing(tmp_path, fault_server, attempts):
    fault_server.script(PATH, status(503))
    cache = tmp_path / "cache"

    with pytest.raises(TripDownloadError) as info:
        fetch(fault_server, cache, attempts=attempts)

    message = str(info.value)
    assert f"{fault_server.url}{PATH}" in message
    assert ("the only attempt failed" if attempts == 1 else f"all {attempts} attempts failed") in message
    assert "HTTP 503" in message
    assert fault_server.count(PATH) == attempts
    assert files_in(cache) == []  # no *.part, nothing under the real name


def test_body_cut_short_every_time_says_so(tmp_path, fault_server, trip_bytes):
    fault_server.script(PATH, cut_short(trip_bytes))
    cache = tmp_path / "cache"

    with pytest.raises(TripDownloadError) as info:
        fetch(fault_server, cache, attempts=3)

    message = str(info.value)
    assert "all 3 attempts failed" in message
    assert "cut short" in message
    assert f"of {len(trip_bytes)} bytes" in message
    assert f"{fault_server.url}{PATH}" in message
    assert fault_server.count(PATH) == 3
    assert files_in(cache) == []


def test_connection_reset_every_time_names_the_cause(tmp_path, fault_server):
    fault_server.script(PATH, reset_before_headers())
    with pytest.raises(TripDownloadError, match="all 2 attempts failed, the last because the connection failed"):
        fetch(fault_server, tmp_path / "cache", attempts=2)
    assert files_in(tmp_path / "cache") == []


def test_server_that_stalls_times_out_and_is_retried(tmp_path, fault_server, trip_bytes):
    fault_server.script(PATH, stall(1.0), ok(trip_bytes))
    path = fetch(fault_server, tmp_path / "cache", timeout_seconds=0.2)
    assert path.read_bytes() == trip_bytes
    assert fault_server.count(PATH) == 2


def test_nothing_listening_is_retried_then_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    with socket.socket() as probe:  # a port that was free a moment ago: connections are refused
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/{NAME}"
    with pytest.raises(TripDownloadError) as info:
        download_file(url, tmp_path / "cache" / NAME, attempts=2, **FAST)
    assert url in str(info.value) and "all 2 attempts failed" in str(info.value)
    assert files_in(tmp_path / "cache") == []


def test_waits_double_between_attempts(tmp_path, fault_server, caplog):
    fault_server.script(PATH, status(503))
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="taxi_duration.data.download"), pytest.raises(TripDownloadError):
        fetch(fault_server, tmp_path / "cache", attempts=4, backoff_seconds=0.02)
    elapsed = time.monotonic() - started

    retries = [record.getMessage() for record in caplog.records if "retrying in" in record.getMessage()]
    assert [message.split("retrying in ")[1] for message in retries] == ["0.02 s", "0.04 s", "0.08 s"]
    assert "attempt 1 of 4" in retries[0] and "HTTP 503" in retries[0]
    assert elapsed >= 0.14


def test_failed_download_leaves_an_existing_destination_as_it_was(tmp_path, fault_server):
    fault_server.script("/blob", status(500))
    destination = tmp_path / "out" / "blob.bin"
    destination.parent.mkdir()
    destination.write_bytes(b"previous")
    with pytest.raises(TripDownloadError):
        download_file(f"{fault_server.url}/blob", destination, attempts=2, **FAST)
    assert destination.read_bytes() == b"previous"
    assert files_in(tmp_path / "out") == ["blob.bin"]


def test_download_error_is_a_trip_data_error_so_the_flow_does_not_retry_it_again():
    # The fetch task (taxi_duration.orchestration.tasks) skips its own retries for TripDataError.
    assert issubclass(TripDownloadError, TripDataError)
    assert not issubclass(TripDownloadError, TripFileNotFound)


# --- B. a month missing at the source --------------------------------------------------


@pytest.mark.parametrize("code", [403, 404])
def test_missing_month_is_not_found_at_once_and_not_retried(tmp_path, fault_server, code):
    fault_server.script(PATH, status(code, b"<Error><Code>AccessDenied</Code></Error>"))
    cache = tmp_path / "cache"

    with pytest.raises(TripFileNotFound) as info:
        fetch(fault_server, cache, attempts=4)

    message = str(info.value)
    assert f"{fault_server.url}{PATH}" in message
    assert f"HTTP {code}" in message
    assert "not published or not found" in message
    assert fault_server.count(PATH) == 1
    assert files_in(cache) == []


def test_folder_source_without_the_month_names_the_path(tmp_path):
    folder = tmp_path / "tlc"
    folder.mkdir()
    with pytest.raises(TripFileNotFound) as info:
        TripSource(str(folder), tmp_path / "cache").ensure_local("green", MONTH)
    assert str((folder / NAME).resolve()) in str(info.value)
    assert not (tmp_path / "cache").exists()


# --- C. a file that is there but unusable ---------------------------------------------


def test_invalid_download_is_kept_aside_not_cached_and_not_retried(tmp_path, fault_server, bad_file):
    body, words = bad_file
    fault_server.script(PATH, ok(body))
    cache = tmp_path / "cache"

    with pytest.raises(TripFileInvalid) as info:
        fetch(fault_server, cache, attempts=4)

    message = str(info.value)
    assert words in message
    assert f"{fault_server.url}{PATH}" in message
    aside = cache / "green" / (NAME + ".invalid")
    assert str(aside) in message
    assert ".part" not in message  # the temporary name means nothing to a user
    assert aside.read_bytes() == body
    assert files_in(cache) == [NAME + ".invalid"]  # never under the real name
    assert fault_server.count(PATH) == 1


def test_next_run_after_an_invalid_download_downloads_again(tmp_path, fault_server, trip_bytes):
    fault_server.script(PATH, ok(HTML_PAGE), ok(trip_bytes))
    cache = tmp_path / "cache"
    with pytest.raises(TripFileInvalid):
        fetch(fault_server, cache)

    path = fetch(fault_server, cache)

    assert path.read_bytes() == trip_bytes
    assert fault_server.count(PATH) == 2
    assert files_in(cache) == sorted([NAME, NAME + ".invalid"])


def test_cached_file_that_went_bad_is_moved_aside_and_downloaded_again(tmp_path, fault_server, trip_bytes, bad_file):
    body, _ = bad_file
    fault_server.script(PATH, ok(trip_bytes))
    cached = tmp_path / "cache" / "green" / NAME
    cached.parent.mkdir(parents=True)
    cached.write_bytes(body)

    path = fetch(fault_server, tmp_path / "cache")

    assert path == cached and path.read_bytes() == trip_bytes
    assert (cached.parent / (NAME + ".invalid")).read_bytes() == body
    assert fault_server.count(PATH) == 1


def test_folder_source_file_is_reported_and_never_touched(tmp_path, bad_file):
    body, words = bad_file
    folder = tmp_path / "tlc"
    folder.mkdir()
    (folder / NAME).write_bytes(body)

    with pytest.raises(TripFileInvalid) as info:
        TripSource(str(folder), tmp_path / "cache").ensure_local("green", MONTH)

    message = str(info.value)
    assert str((folder / NAME).resolve()) in message
    assert words in message
    assert "left untouched" in message
    assert (folder / NAME).read_bytes() == body
    assert files_in(folder) == [NAME]
    assert not (tmp_path / "cache").exists()


def test_read_trips_gives_the_same_clear_error(tmp_path, bad_file):
    body, words = bad_file
    path = tmp_path / NAME
    path.write_bytes(body)
    with pytest.raises(TripFileInvalid) as info:
        read_trips(path, "green")
    assert str(path) in str(info.value)
    assert words in str(info.value)


def test_read_trips_names_a_file_damaged_past_its_footer(tmp_path, trip_bytes):
    # The footer is intact, so validation passes; the data pages are garbage.
    footer_start = len(trip_bytes) - 8 - int.from_bytes(trip_bytes[-8:-4], "little")
    damaged = bytearray(trip_bytes)
    damaged[4:footer_start] = b"\xff" * (footer_start - 4)
    path = tmp_path / NAME
    path.write_bytes(bytes(damaged))
    assert validate_trip_file(path, "green") == 64
    with pytest.raises(TripFileInvalid) as info:
        read_trips(path, "green")
    assert str(path) in str(info.value)


def test_missing_file_reads_as_does_not_exist(tmp_path):
    with pytest.raises(TripFileInvalid, match="does not exist"):
        validate_trip_file(tmp_path / NAME, "green")


def test_bad_file_errors_are_trip_data_errors():
    assert issubclass(TripFileInvalid, TripDataError)
    assert tripfiles.TripFileInvalid is TripFileInvalid
