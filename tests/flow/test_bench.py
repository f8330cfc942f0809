"""bench/run.py --quick: every variant runs, the report is complete, the user's stores are left alone.

No timing assertions: the quick mode checks the instrument, not the pipeline's speed.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.flow

PROJECT_DIR = Path(__file__).resolve().parents[2]
# `make bench`'s default variants: the cold run with TAXI_FAST_START=0 measures what the speed-ups save.
VARIANTS = ("plain", "plain, GC paused", "cold", "servers", "rerun", "first run", "cold, fast start off")
# What a benchmark must never write to: the project's own stores, and the default report
# files (the test passes --output-dir). The rest of outputs/bench/ is left out: other
# benchmarks (bench/scale.py...) write their reports there and may run meanwhile.
USER_STORES = (
    "mlflow.db",
    "mlartifacts",
    "mlruns",
    "outputs",
    ".services",
    "data",
    "outputs/bench/pipeline.md",
    "outputs/bench/pipeline.json",
)
SHARED_REPORTS = PROJECT_DIR / "outputs" / "bench"


def _snapshot(path: Path) -> dict[str, tuple[int, int]] | None:
    """Every file and folder under `path` with its size and mtime; None when it does not exist."""
    if not path.exists():
        return None
    entries = [path, *path.rglob("*")] if path.is_dir() else [path]
    found = {}
    for entry in entries:
        if entry.is_relative_to(SHARED_REPORTS) and path != entry:
            continue
        try:
            stat = entry.stat()
        except FileNotFoundError:
            continue
        found[str(entry.relative_to(PROJECT_DIR))] = (stat.st_size, stat.st_mtime_ns)
    return found


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.long
def test_quick_bench_measures_every_variant_and_leaves_user_stores_alone(tmp_path):
    before = {name: _snapshot(PROJECT_DIR / name) for name in USER_STORES}
    output_dir = tmp_path / "bench"
    env = {key: value for key, value in os.environ.items() if key not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")}

    completed = subprocess.run(
        [sys.executable, str(PROJECT_DIR / "bench" / "run.py"), "--quick", "--output-dir", str(output_dir)],
        cwd=PROJECT_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]

    table = (output_dir / "pipeline.md").read_text()
    assert table in completed.stdout, "the table is printed too"
    assert (
        "| variant | median s | min | max | ratio to plain | target | within target? "
        "| ratio to plain, GC paused | peak memory |"
    ) in table
    rows = {}
    for line in table.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if cells[0] in VARIANTS:
            rows[cells[0]] = cells
    assert sorted(rows) == sorted(VARIANTS), table
    for variant, cells in rows.items():
        median, low, high = (float(cells[i]) for i in (1, 2, 3))
        assert 0 < low <= median <= high, (variant, cells)
        assert re.fullmatch(r"\d+\.\d\dx", cells[4]), (variant, cells)
        assert re.fullmatch(r"\d+\.\d\dx", cells[7]), (variant, cells)
        assert re.fullmatch(r"tree [\d,]+ MiB, largest [\d,]+ MiB", cells[8]), (variant, cells)
    assert rows["plain"][4] == "1.00x" and rows["plain, GC paused"][7] == "1.00x"
    assert rows["plain, GC paused"][5] == "-"
    assert rows["servers"][5] == "<= 1.25x" and rows["cold"][5] == "<= 1.6x" and rows["rerun"][5] == "<= 0.35x"
    assert rows["first run"][5] == "-" and rows["cold, fast start off"][5] == "-"
    assert "every pipeline run agrees to 4 decimals" in table
    assert "2023-03: 3,000 rows, 2023-04: 3,000 rows" in table
    assert re.search(r"git commit: [0-9a-f]{40}", table)

    report = json.loads((output_dir / "pipeline.json").read_text())
    measured = [entry["variant"] for entry in report["measurements"]]
    assert sorted(measured) == sorted(VARIANTS), "one run of each variant with --quick"
    assert all(entry["seconds"] > 0 and entry["tree_peak_bytes"] > 0 for entry in report["measurements"])
    assert report["rmse_check"]["equal"] is True
    rmses = {entry["rmse"] for entry in report["measurements"]}
    assert len({round(value, 4) for value in rmses}) == 1, rmses
    assert {row["variant"] for row in report["summary"]} == set(VARIANTS)

    after = {name: _snapshot(PROJECT_DIR / name) for name in USER_STORES}
    for name in USER_STORES:
        assert after[name] == before[name], f"the benchmark touched the project's {name}"
    work = re.search(r"benchmark folder (\S+?);", completed.stdout)
    assert work and not Path(work.group(1)).exists(), "the temporary folder is removed after a successful run"
    # The benchmark's own servers and the one the first run started are all stopped.
    assert len(report["server_pids"]) == 3, report["server_pids"]
    alive = [pid for pid in report["server_pids"] if _running(pid)]
    assert not alive, f"servers still running after the benchmark: {alive}"
