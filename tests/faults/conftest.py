"""Fixtures for the fault tests: the fault-injecting server and real trip-file bytes."""

from __future__ import annotations

import pytest
from fault_server import MONTH, FaultServer

from taxi_duration.data.synthetic import write_trip_file


@pytest.fixture
def fault_server(monkeypatch):
    """A started FaultServer, reached directly (never through a proxy), stopped afterwards."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    server = FaultServer()
    server.thread.start()
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()
    server.thread.join(timeout=5)


@pytest.fixture(scope="session")
def trip_bytes(tmp_path_factory) -> bytes:
    """A real green-taxi parquet file (64 rows) as served by TLC."""
    return write_trip_file(tmp_path_factory.mktemp("trip-bytes"), "green", MONTH, 64, seed=3).read_bytes()
