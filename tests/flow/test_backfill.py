"""Backfill over several months: bounded parallelism, a summary, and cheap repeats."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from taxi_duration.data.periods import Month
from taxi_duration.data.synthetic import write_trip_file

pytestmark = pytest.mark.flow

PROJECT_DIR = Path(__file__).resolve().parents[2]


def _backfill(prefect_home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PREFECT_HOME": str(prefect_home)}
    env.pop("PREFECT_API_URL", None)
    return subprocess.run(
        [sys.executable, str(PROJECT_DIR / "flows" / "backfill.py"), *args],
        cwd=PROJECT_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )


@pytest.mark.long
def test_backfill_three_months_then_repeat_is_all_cached_and_a_failed_month_is_reported(
    tmp_path, isolated_stores, prefect_home
):
    source = tmp_path / "source"
    month = Month(2023, 1)
    while month <= Month(2023, 4):
        write_trip_file(source, "green", month, 2000, seed=5)
        month = month.next()

    first = _backfill(
        prefect_home, "--from", "2023-01", "--to", "2023-03", "--data-source", str(source), "--max-parallel", "2"
    )
    # stdout holds the per-month summary that says which month failed and why.
    assert first.returncode == 0, first.stdout[-4000:] + "\n--- stderr ---\n" + first.stderr[-3000:]
    assert "3 of 3 months finished" in first.stdout
    for label in ("2023-01", "2023-02", "2023-03"):
        assert any(line.startswith(f"{label}  FINISHED") for line in first.stdout.splitlines())

    client = MlflowClient(isolated_stores["tracking_uri"])
    experiment = client.get_experiment_by_name("nyc-taxi-duration")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(run.data.tags["taxi.train_month"] for run in runs) == ["2023-01", "2023-02", "2023-03"]
    assert {run.info.status for run in runs} == {"FINISHED"}

    repeat = _backfill(prefect_home, "--from", "2023-01", "--to", "2023-03", "--data-source", str(source))
    assert repeat.returncode == 0, repeat.stdout[-4000:] + "\n--- stderr ---\n" + repeat.stderr[-3000:]
    table = [line for line in repeat.stdout.splitlines() if line.startswith("2023-0")]
    assert len(table) == 3
    assert all("01_explore, 02_features, 03_train" in line for line in table)

    # A month that cannot run (2023-05 is missing: 2023-04 cannot validate) is reported, the
    # others still finish, and the backfill exits non-zero.
    failing = _backfill(prefect_home, "--from", "2023-03", "--to", "2023-04", "--data-source", str(source))
    assert failing.returncode == 1, failing.stdout[-4000:] + "\n--- stderr ---\n" + failing.stderr[-3000:]
    rows = {line[:7]: line for line in failing.stdout.splitlines() if line.startswith("2023-0")}
    assert "FINISHED" in rows["2023-03"]
    assert "FAILED" in rows["2023-04"] and "green_tripdata_2023-05.parquet" in rows["2023-04"]
    assert "1 of 2 months finished, 1 failed" in failing.stdout
    # The failed month's paragraph is in the table; the terminal shows no traceback of it.
    assert "Traceback (most recent call last)" not in failing.stdout + failing.stderr, failing.stderr[-6000:]
    assert "NoneType: None" not in failing.stdout + failing.stderr

    # SIGTERM while two forced months run their notebooks side by side: both MLflow runs end
    # KILLED, the command exits 143 within 30 s, and no runner or kernel is left.
    started = time.time()
    env = {**os.environ, "PREFECT_HOME": str(prefect_home)}
    env.pop("PREFECT_API_URL", None)
    command = [sys.executable, str(PROJECT_DIR / "flows" / "backfill.py"), "--from", "2023-01", "--to", "2023-02"]
    stopped = subprocess.Popen(
        [*command, "--data-source", str(source), "--force"],
        cwd=PROJECT_DIR,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    outputs = Path(isolated_stores["outputs"])
    while not [path for path in outputs.glob("green/2023-0[12]/*/01_explore.ipynb") if path.stat().st_mtime > started]:
        assert stopped.poll() is None and time.time() - started < 300, "the forced months never started a notebook"
        time.sleep(0.25)
    stopped.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    output, _ = stopped.communicate(timeout=60)
    assert time.monotonic() - signalled <= 30 and stopped.returncode == 143, output[-4000:]
    forced = [run for run in client.search_runs([experiment.experiment_id]) if run.info.start_time / 1000 >= started]
    assert sorted(run.info.status for run in forced) == ["KILLED", "KILLED"], output[-4000:]
    assert _processes_holding(str(outputs)) == []


def _processes_holding(marker: str) -> list[str]:
    """Live processes (not zombies) whose environment holds `marker`, after a moment to be reaped."""
    deadline = time.monotonic() + 5
    while True:
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                alive = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
                if alive and marker.encode() in (entry / "environ").read_bytes():
                    found.append((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
            except OSError:
                continue
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.25)


def test_backfill_rejects_a_bad_range_before_running(isolated_stores, prefect_home):
    completed = _backfill(prefect_home, "--from", "2023-05", "--to", "2023-02")
    assert completed.returncode == 2 and "before --from" in completed.stderr
