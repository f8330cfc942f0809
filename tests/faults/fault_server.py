"""A fault-injecting HTTP server for download tests: scripted replies per request, counted.

Each path has a script of replies; request n to that path gets reply n, and the last reply
repeats once the script runs out. Faults are real socket behaviour (a reset connection, a
body cut short of its Content-Length, a server that stalls), not mocks, so the tests go
through requests and urllib3 exactly as a download from TLC does.
"""

from __future__ import annotations

import http.server
import socket
import struct
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from taxi_duration.data.periods import Month

MONTH = Month(2024, 1)
NAME = "green_tripdata_2024-01.parquet"


def _reset(handler: http.server.BaseHTTPRequestHandler) -> None:
    """Abort the connection with a TCP RST (SO_LINGER 0), as a crashing proxy or server does."""
    handler.wfile.flush()
    connection = handler.connection
    connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    # The socket closes for real only once every file made from it is closed too.
    handler.rfile.close()
    connection.close()
    handler.close_connection = True


@dataclass(frozen=True)
class Reply:
    """One scripted answer: `status` with `body`, optionally cut short, reset or stalled.

    `send_bytes`: how much of `body` is actually sent (Content-Length still says all of it).
    `reset`: abort with RST after the headers and `send_bytes` (or before any byte, with
    `before_headers`). `stall_seconds`: wait that long before answering anything.
    """

    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    send_bytes: int | None = None
    reset: bool = False
    before_headers: bool = False
    stall_seconds: float = 0.0

    def send(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        if self.stall_seconds:
            time.sleep(self.stall_seconds)
        if self.reset and self.before_headers:
            _reset(handler)
            return
        handler.send_response(self.status)
        for key, value in {"Content-Length": str(len(self.body)), **self.headers}.items():
            handler.send_header(key, value)
        handler.end_headers()
        handler.wfile.write(self.body if self.send_bytes is None else self.body[: self.send_bytes])
        if self.reset:
            _reset(handler)


def ok(body: bytes, **headers: str) -> Reply:
    """200 with the whole body."""
    return Reply(200, body, headers)


def status(code: int, body: bytes = b"error") -> Reply:
    """An HTTP status with a small body, e.g. 503 or 404."""
    return Reply(code, body)


def cut_short(body: bytes, send_bytes: int | None = None) -> Reply:
    """200 announcing the whole body, sending only part of it, then closing cleanly."""
    return Reply(200, body, send_bytes=len(body) // 2 if send_bytes is None else send_bytes)


def reset_before_headers() -> Reply:
    """RST as soon as the request is read: no status line, no headers."""
    return Reply(reset=True, before_headers=True)


def reset_mid_body(body: bytes) -> Reply:
    """200 announcing the whole body, a third of it sent, then RST."""
    return Reply(200, body, send_bytes=len(body) // 3, reset=True)


def stall(seconds: float) -> Reply:
    """Say nothing for `seconds` (the client should time out first), then RST."""
    return Reply(stall_seconds=seconds, reset=True, before_headers=True)


class FaultServer:
    """A real HTTP server on 127.0.0.1 (ephemeral port) playing scripted replies per path."""

    def __init__(self) -> None:
        self.scripts: dict[str, list[Reply]] = {}
        self.hits: list[str] = []
        self._served: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # one request per connection: a retry is a new connection

            def do_GET(self) -> None:
                server.next_reply(self.path).send(self)

            def log_message(self, *args) -> None:
                pass

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address) -> None:
                pass  # a client that hung up on a stalled reply is part of the script

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def script(self, path: str, *replies: Reply) -> None:
        """Answer requests for `path` with `replies` in turn; the last one repeats."""
        self.scripts[path] = list(replies)

    def next_reply(self, path: str) -> Reply:
        with self._lock:
            self.hits.append(path)
            script = self.scripts.get(path) or [status(404, b"not found")]
            reply = script[min(self._served[path], len(script) - 1)]
            self._served[path] += 1
        return reply

    def count(self, path: str) -> int:
        return self.hits.count(path)


def files_in(folder: Path) -> list[str]:
    """Every file under `folder`, by name: what a failed download may have left behind."""
    return sorted(p.name for p in folder.rglob("*") if p.is_file()) if folder.exists() else []
