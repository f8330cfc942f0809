"""Trip files: validation, folder sources, downloads through a real local HTTP server."""

from __future__ import annotations

import http.server
import threading
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from taxi_duration.data.download import download_file
from taxi_duration.data.periods import Month
from taxi_duration.data.synthetic import generate_trips_table, write_trip_file
from taxi_duration.data.tripfiles import (
    TripDataError,
    TripDownloadError,
    TripFileInvalid,
    TripFileNotFound,
    TripSource,
    check_source_location,
    normalize_trips,
    read_trips,
    required_columns,
    trip_count,
    trip_filename,
    trip_source,
    validate_trip_file,
)

MONTH = Month(2024, 1)
NAME = "green_tripdata_2024-01.parquet"


def parquet_bytes(tmp_path: Path, color="green", rows=50, legacy_dtypes=False) -> bytes:
    path = write_trip_file(tmp_path / "src", color, MONTH, rows, seed=1, legacy_dtypes=legacy_dtypes)
    return path.read_bytes()


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


# --- names and columns --------------------------------------------------------------


def test_trip_filename_follows_tlc_naming():
    assert trip_filename("green", Month(2023, 3)) == "green_tripdata_2023-03.parquet"
    assert trip_filename("yellow", Month(2024, 11)) == "yellow_tripdata_2024-11.parquet"


def test_required_columns_per_colour():
    assert required_columns("green") == (
        "lpep_pickup_datetime",
        "lpep_dropoff_datetime",
        "PULocationID",
        "DOLocationID",
        "trip_distance",
    )
    assert required_columns("yellow")[:2] == ("tpep_pickup_datetime", "tpep_dropoff_datetime")


# --- validate_trip_file ---------------------------------------------------------------


@pytest.mark.parametrize("color", ["green", "yellow"])
def test_valid_parquet_returns_its_row_count(tmp_path, color):
    path = write_trip_file(tmp_path, color, MONTH, 37)
    assert validate_trip_file(path, color) == 37
    assert trip_count(path) == 37


def test_html_page_saved_as_parquet_is_rejected_naming_the_file(tmp_path):
    path = tmp_path / NAME
    path.write_text("<!DOCTYPE html><html><body>Access Denied</body></html>")
    with pytest.raises(TripDataError) as info:
        validate_trip_file(path, "green")
    assert str(path) in str(info.value)
    assert "not a readable parquet file" in str(info.value)


def test_missing_file_is_a_trip_data_error(tmp_path):
    with pytest.raises(TripDataError, match="not a readable parquet file"):
        validate_trip_file(tmp_path / NAME, "green")


def test_parquet_lacking_dropoff_column_is_rejected_naming_the_column(tmp_path):
    table = generate_trips_table("green", MONTH, 10).drop_columns(["lpep_dropoff_datetime"])
    path = tmp_path / NAME
    pq.write_table(table, path)
    with pytest.raises(TripDataError) as info:
        validate_trip_file(path, "green")
    message = str(info.value)
    assert "lpep_dropoff_datetime" in message
    assert str(path) in message
    assert "lpep_pickup_datetime" not in message


def test_yellow_file_is_not_accepted_as_green(tmp_path):
    path = write_trip_file(tmp_path, "yellow", MONTH, 10)
    with pytest.raises(TripDataError, match="lpep_pickup_datetime, lpep_dropoff_datetime"):
        validate_trip_file(path, "green")


def test_zero_row_parquet_is_rejected(tmp_path):
    path = tmp_path / NAME
    pq.write_table(generate_trips_table("green", MONTH, 0), path)
    assert pq.read_metadata(path).num_rows == 0
    with pytest.raises(TripDataError, match="has no rows") as info:
        validate_trip_file(path, "green")
    assert str(path) in str(info.value)


# --- normalize_trips / read_trips ----------------------------------------------------


def test_normalize_trips_names_every_missing_column():
    frame = pd.DataFrame({"lpep_pickup_datetime": [pd.Timestamp("2024-01-01")], "trip_distance": [1.0]})
    with pytest.raises(TripDataError) as info:
        normalize_trips(frame, "green")
    for column in ("lpep_dropoff_datetime", "PULocationID", "DOLocationID"):
        assert column in str(info.value)


def test_normalize_trips_casts_to_one_dtype_per_column():
    frame = pd.DataFrame(
        {
            "lpep_pickup_datetime": ["2024-01-01 10:00:00"],
            "lpep_dropoff_datetime": pd.to_datetime(["2024-01-01 10:15:00"]).astype("datetime64[ns]"),
            "PULocationID": pd.array([132], dtype="int32"),
            "DOLocationID": [236.0],
            "trip_distance": [3],
            "passenger_count": [1],
            "ehail_fee": [None],
        }
    )
    out = normalize_trips(frame, "green")
    assert str(out["lpep_pickup_datetime"].dtype) == "datetime64[us]"
    assert str(out["lpep_dropoff_datetime"].dtype) == "datetime64[us]"
    assert str(out["PULocationID"].dtype) == "Int64" and str(out["DOLocationID"].dtype) == "Int64"
    assert out["trip_distance"].dtype == "float64"
    assert str(out["passenger_count"].dtype) == "Float64"
    assert out["ehail_fee"].dtype == "float64" and out["ehail_fee"].isna().all()
    assert str(frame["PULocationID"].dtype) == "int32"  # the input is left alone


def test_read_trips_gives_same_frame_for_old_and_new_file_versions(tmp_path):
    old = write_trip_file(tmp_path / "old", "green", MONTH, 200, seed=5, legacy_dtypes=True)
    new = write_trip_file(tmp_path / "new", "green", MONTH, 200, seed=5, legacy_dtypes=False)
    assert pq.read_schema(old).field("ehail_fee").type == pa.null()
    pd.testing.assert_frame_equal(read_trips(old, "green"), read_trips(new, "green"))


def test_read_trips_rejects_invalid_file(tmp_path):
    path = tmp_path / NAME
    path.write_bytes(b"not parquet")
    with pytest.raises(TripDataError, match=NAME):
        read_trips(path, "green")


# --- check_source_location ---------------------------------------------------------


@pytest.mark.parametrize("location", ["https://d37ci6vzurychx.cloudfront.net/trip-data", "http://127.0.0.1:8000/x"])
def test_url_source_is_accepted(location):
    check_source_location(location)


def test_existing_folder_source_is_accepted(tmp_path):
    check_source_location(str(tmp_path))


def test_missing_folder_source_is_rejected_naming_it(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(TripDataError, match="no such folder exists") as info:
        check_source_location(missing)
    assert missing in str(info.value)


@pytest.mark.parametrize("location", ["ftp://x", "s3://bucket/trip-data", "file:///tmp"])
def test_non_http_url_source_is_rejected(location):
    with pytest.raises(TripDataError, match="neither an http\\(s\\) URL nor a folder") as info:
        check_source_location(location)
    assert location in str(info.value)


# --- TripSource with a folder -------------------------------------------------------


def test_folder_source_returns_the_file_in_place(tmp_path):
    written = write_trip_file(tmp_path / "tlc", "green", MONTH, 20)
    source = TripSource(str(tmp_path / "tlc"), tmp_path / "cache")
    assert source.ensure_local("green", MONTH) == written.resolve()
    assert not (tmp_path / "cache").exists()  # nothing copied into the cache


def test_folder_source_without_the_file_names_the_path(tmp_path):
    (tmp_path / "tlc").mkdir()
    source = TripSource(str(tmp_path / "tlc"), tmp_path / "cache")
    with pytest.raises(TripFileNotFound) as info:
        source.ensure_local("green", Month(2024, 2))
    message = str(info.value)
    assert str((tmp_path / "tlc" / "green_tripdata_2024-02.parquet").resolve()) in message
    assert "2024-02" in message


def test_folder_source_with_an_invalid_file_raises(tmp_path):
    (tmp_path / "tlc").mkdir()
    (tmp_path / "tlc" / NAME).write_text("<html></html>")
    source = TripSource(str(tmp_path / "tlc"), tmp_path / "cache")
    with pytest.raises(TripDataError, match=NAME):
        source.ensure_local("green", MONTH)


# --- downloads through a local HTTP server ----------------------------------------


class LocalServer:
    """A real HTTP server on 127.0.0.1 serving canned responses by path."""

    def __init__(self):
        self.routes: dict[str, tuple[int, dict[str, str], bytes]] = {}
        self.hits: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # one request per connection; a short body ends at close

            def do_GET(self):
                server.hits.append(self.path)
                status, headers, body = server.routes.get(self.path, (404, {}, b"not found"))
                self.send_response(status)
                headers = {"Content-Length": str(len(body)), **headers}
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def serve(self, path: str, body: bytes, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self.routes[path] = (status, headers or {}, body)


@pytest.fixture
def server(monkeypatch):
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    local = LocalServer()
    local.thread.start()
    yield local
    local.httpd.shutdown()
    local.httpd.server_close()
    local.thread.join(timeout=5)


def test_download_lands_a_valid_file_in_the_cache(tmp_path, server):
    body = parquet_bytes(tmp_path, rows=64)
    server.serve(f"/trip-data/{NAME}", body)
    cache = tmp_path / "cache"
    source = TripSource(server.url + "/trip-data/", cache)

    path = source.ensure_local("green", MONTH, timeout_seconds=5)

    assert path == cache / "green" / NAME
    assert path.read_bytes() == body
    assert validate_trip_file(path, "green") == 64
    assert files_in(cache) == [NAME]  # no temporary left beside it
    assert server.hits == [f"/trip-data/{NAME}"]


def test_valid_cached_file_is_not_downloaded_again(tmp_path, server):
    server.serve(f"/{NAME}", parquet_bytes(tmp_path))
    source = TripSource(server.url, tmp_path / "cache")
    first = source.ensure_local("green", MONTH, timeout_seconds=5)
    second = source.ensure_local("green", MONTH, timeout_seconds=5)
    assert first == second
    assert len(server.hits) == 1


def test_http_404_is_trip_file_not_found_naming_the_url_and_leaves_nothing(tmp_path, server):
    cache = tmp_path / "cache"
    source = TripSource(server.url, cache)
    with pytest.raises(TripFileNotFound) as info:
        source.ensure_local("green", Month(2024, 2), timeout_seconds=5)
    message = str(info.value)
    assert f"{server.url}/green_tripdata_2024-02.parquet" in message
    assert "404" in message
    assert files_in(cache) == []


def test_http_403_is_trip_file_not_found(tmp_path, server):
    server.serve(f"/{NAME}", b"denied", status=403)
    with pytest.raises(TripFileNotFound, match="403"):
        TripSource(server.url, tmp_path / "cache").ensure_local("green", MONTH, timeout_seconds=5)
    assert files_in(tmp_path / "cache") == []


def test_server_error_is_retried_then_raises_and_leaves_nothing(tmp_path, server):
    server.serve(f"/{NAME}", b"oops", status=500)
    with pytest.raises(TripDownloadError, match="HTTP 500") as info:
        TripSource(server.url, tmp_path / "cache").ensure_local(
            "green", MONTH, timeout_seconds=5, attempts=2, backoff_seconds=0.001
        )
    assert "all 2 attempts failed" in str(info.value)
    assert files_in(tmp_path / "cache") == []
    assert len(server.hits) == 2


def test_other_client_error_is_not_retried(tmp_path, server):
    server.serve(f"/{NAME}", b"who are you", status=401)
    with pytest.raises(TripDownloadError, match="HTTP 401") as info:
        TripSource(server.url, tmp_path / "cache").ensure_local(
            "green", MONTH, timeout_seconds=5, backoff_seconds=0.001
        )
    assert f"{server.url}/{NAME}" in str(info.value)
    assert len(server.hits) == 1
    assert files_in(tmp_path / "cache") == []


def test_body_shorter_than_content_length_raises_and_leaves_no_file(tmp_path, server):
    body = parquet_bytes(tmp_path)
    server.serve(f"/{NAME}", body[: len(body) // 2], headers={"Content-Length": str(len(body))})
    cache = tmp_path / "cache"
    # requests itself notices the cut (ChunkedEncodingError), else download_file's own size
    # check does; either way it is reported as a cut-short body and nothing is left behind.
    with pytest.raises(TripDownloadError, match="cut short"):
        TripSource(server.url, cache).ensure_local("green", MONTH, timeout_seconds=5, attempts=1)
    assert files_in(cache) == []
    assert not list(cache.rglob("*.part"))


def test_download_file_does_not_publish_a_truncated_body_even_unvalidated(tmp_path, server):
    server.serve("/blob", b"x" * 100, headers={"Content-Length": "500"})
    destination = tmp_path / "out" / "blob.bin"
    with pytest.raises(TripDownloadError, match=r"the only attempt failed.*cut short"):
        download_file(f"{server.url}/blob", destination, timeout_seconds=5, attempts=1)
    assert files_in(tmp_path / "out") == []


def test_download_file_without_validation_writes_the_body(tmp_path, server):
    server.serve("/blob", b"hello" * 1000)
    destination = tmp_path / "out" / "nested" / "blob.bin"
    download_file(f"{server.url}/blob", destination, timeout_seconds=5)
    assert destination.read_bytes() == b"hello" * 1000
    assert files_in(tmp_path / "out") == ["blob.bin"]


def test_non_parquet_body_is_rejected_and_kept_only_as_invalid(tmp_path, server):
    server.serve(
        f"/{NAME}", b"<!DOCTYPE html><html><body>Maintenance</body></html>", headers={"Content-Type": "text/html"}
    )
    cache = tmp_path / "cache"
    with pytest.raises(TripFileInvalid) as info:
        TripSource(server.url, cache).ensure_local("green", MONTH, timeout_seconds=5)
    assert NAME in str(info.value)
    assert "HTML" in str(info.value)
    # Kept for inspection under a name no run trusts, never under the real one.
    assert files_in(cache) == [NAME + ".invalid"]
    assert len(server.hits) == 1  # an invalid body is not retried


def test_wrong_colour_file_from_server_is_rejected_and_not_cached(tmp_path, server):
    server.serve(f"/{NAME}", parquet_bytes(tmp_path, color="yellow"))
    cache = tmp_path / "cache"
    with pytest.raises(TripFileInvalid, match="lpep_pickup_datetime"):
        TripSource(server.url, cache).ensure_local("green", MONTH, timeout_seconds=5)
    assert files_in(cache) == [NAME + ".invalid"]


def test_invalid_cached_file_is_moved_aside_and_downloaded_again(tmp_path, server):
    body = parquet_bytes(tmp_path, rows=12)
    server.serve(f"/{NAME}", body)
    cache = tmp_path / "cache"
    bad = cache / "green" / NAME
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"<html>truncated earlier</html>")

    path = TripSource(server.url, cache).ensure_local("green", MONTH, timeout_seconds=5)

    assert path == bad
    assert path.read_bytes() == body
    assert validate_trip_file(path, "green") == 12
    aside = cache / "green" / (NAME + ".invalid")
    assert aside.read_bytes() == b"<html>truncated earlier</html>"
    assert files_in(cache) == sorted([NAME, NAME + ".invalid"])
    assert server.hits == [f"/{NAME}"]


def test_gzip_encoded_response_is_accepted(tmp_path, server):
    import gzip

    body = parquet_bytes(tmp_path, rows=64)
    server.serve(f"/{NAME}", gzip.compress(body), headers={"Content-Encoding": "gzip"})
    path = TripSource(server.url, tmp_path / "cache").ensure_local("green", MONTH, timeout_seconds=5)
    assert path.read_bytes() == body


def test_local_copy_finds_a_folder_file_or_a_cached_download_and_never_fetches(tmp_path):
    month = Month(2023, 3)
    folder = tmp_path / "tlc"
    folder.mkdir()
    assert trip_source(str(folder), tmp_path / "cache").local_copy("green", month) is None
    written = write_trip_file(folder, "green", month, 50, seed=1)
    assert trip_source(str(folder), tmp_path / "cache").local_copy("green", month) == written.resolve()

    # A URL source (nothing listens on port 9): only its download cache is looked at.
    remote = trip_source("http://127.0.0.1:9/trip-data", tmp_path / "cache")
    assert remote.local_copy("green", month) is None
    cached = write_trip_file(tmp_path / "cache" / "green", "green", month, 50, seed=1)
    assert remote.local_copy("green", month) == cached


def test_a_relative_folder_source_means_the_project_root_so_notebooks_in_another_folder_read_it(tmp_path, monkeypatch):
    # `TAXI_DATA_SOURCE=../shared/data/tlc`: a kernel runs in notebooks/, papermill wherever it was started.
    (tmp_path / "shared" / "tlc").mkdir(parents=True)
    (tmp_path / "project" / "notebooks").mkdir(parents=True)
    monkeypatch.setenv("TAXI_PROJECT_DIR", str(tmp_path / "project"))
    monkeypatch.chdir(tmp_path / "project" / "notebooks")
    source = trip_source("../shared/tlc")
    assert source.location == str(tmp_path / "shared" / "tlc")
    assert trip_source("https://example.org/trip-data").location == "https://example.org/trip-data"
