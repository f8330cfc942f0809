"""A real MLflow server whose artifact uploads fail mid-run: retried, then a clear error, nothing lost."""

from __future__ import annotations

import http.client
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests
from mlflow.tracking import MlflowClient
from terminal import assert_one_clear_failure

from taxi_duration.servers import local_servers

pytestmark = pytest.mark.flow

UPLOAD_PREFIX = "/api/2.0/mlflow-artifacts/artifacts/"


@pytest.fixture
def mlflow_server(tmp_path, empty_tracking_store, free_port):
    """A real `mlflow server` on a free loopback port (SQLite store, proxied artifacts).

    Its store starts as a copy of the session's empty, migrated one: the server would otherwise
    run every schema migration before it answers.
    """
    port = free_port()
    shutil.copyfile(empty_tracking_store, tmp_path / "server.db")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'server.db'}",
            "--artifacts-destination",
            str(tmp_path / "server-artifacts"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", **local_servers.MLFLOW_SERVER_DEFAULTS},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except requests.RequestException:
            time.sleep(0.5)
    else:
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail("mlflow server did not become healthy within 120 s")
    yield url
    os.killpg(process.pid, signal.SIGTERM)  # the server and its uvicorn worker
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)


@pytest.fixture
def failing_uploads_proxy(mlflow_server):
    """Forwards everything to the server but answers 500 to every artifact upload; counts them."""
    upstream = mlflow_server.removeprefix("http://")
    refused: list[str] = []

    class Proxy(BaseHTTPRequestHandler):
        def _forward(self):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.command == "PUT" and self.path.startswith(UPLOAD_PREFIX):
                refused.append(self.path)
                self.send_response(500)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            connection = http.client.HTTPConnection(upstream, timeout=60)
            headers = {key: value for key, value in self.headers.items() if key.lower() not in ("host", "connection")}
            connection.request(self.command, self.path, body=body or None, headers=headers)
            answer = connection.getresponse()
            payload = answer.read()
            self.send_response(answer.status)
            for key, value in answer.getheaders():
                if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", refused
    server.shutdown()


def test_failing_artifact_uploads_fail_the_run_clearly_and_keep_local_copies(
    failing_uploads_proxy, mlflow_server, pipeline_cli, synthetic_source, isolated_stores
):
    proxy_url, refused = failing_uploads_proxy
    completed = pipeline_cli(
        "--data-source",
        str(synthetic_source),
        env={"MLFLOW_TRACKING_URI": proxy_url, "TAXI_OUTPUTS_DIR": str(isolated_stores["outputs"])},
    )

    assert completed.returncode == 1
    paragraph = assert_one_clear_failure(
        completed.stdout, completed.stderr, "Pipeline failed: could not archive ", proxy_url
    )
    # 01_explore and 02_features run side by side: whichever archives first meets the failure.
    assert re.search(r"could not archive 0[12]_(explore|features)\.ipynb", paragraph), paragraph
    assert len(refused) >= 2, "MLflow retries an upload before giving up"
    # Everything the notebook produced is still on disk, and the run is closed as FAILED.
    run_dir = next(isolated_stores["outputs"].glob("green/2023-03/*"))
    for name in ("01_explore.ipynb", "01_explore.html", "01_explore.review.html", "01_explore.manifest.json"):
        assert (run_dir / name).is_file(), name
    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("nyc-taxi-duration").experiment_id])
    assert [run.info.status for run in runs] == ["FAILED"]
