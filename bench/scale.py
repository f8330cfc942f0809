"""Scale run: the whole pipeline on two yellow-taxi-sized months, with time and peak memory per stage.

    .venv/bin/python bench/scale.py                  # 3.4 million trips a month (a yellow month)
    .venv/bin/python bench/scale.py --rows 200000    # quick

Writes synthetic yellow 2023-03 and 2023-04 files (taxi_duration.data.synthetic) into a temporary
folder and runs `flows/pipeline.py --year 2023 --month 3 --color yellow` on them as a user
would, with the outputs, download cache, stage cache, MLflow store, Prefect home and services
folder all inside that temporary folder (the project's own are left alone; Prefect runs its
ephemeral server).

Memory: the pipeline's process tree is sampled every --interval seconds with psutil. Each
notebook runs in a papermill child process (`python -m taxi_duration.runner.child <notebook>`)
whose kernel is that child's child; both are attributed to the notebook's stage. A process's
peak is its kernel-kept high-water mark (VmHWM in /proc/<pid>/status, so Linux only), read
at every sample: a peak is missed only if it falls within the process's last sample
interval. The "tree" column sums the RSS of every process of the tree at each sample (flow,
runner, kernel, Prefect's server) and keeps the largest sum seen while the stage ran. As a
cross-check, `getrusage(RUSAGE_CHILDREN).ru_maxrss` after the pipeline ends gives the
largest RSS any single waited-for descendant reached.

The target is that no process of the pipeline needs more than 4 GiB; the report also says
whether the whole tree at once stayed within it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from taxi_duration.data.periods import Month
from taxi_duration.data.synthetic import write_trip_file

PROJECT_DIR = Path(__file__).resolve().parents[1]
YELLOW_MONTHLY_TRIPS = 3_400_000
STAGES = ("01_explore", "02_features", "03_train")
TARGET_BYTES = 4 * 2**30
TRAIN_MONTH = Month(2023, 3)


@dataclass
class ProcessRecord:
    """What the samples saw of one process."""

    role: str  # "flow", "<stage> runner", "<stage> kernel" or "other: <name>"
    stage: str | None
    first_seen: float
    last_seen: float
    peak_bytes: int = 0


@dataclass
class StageWindow:
    started: float | None = None
    ended: float | None = None
    tree_peak_bytes: int = 0


@dataclass
class Observation:
    processes: dict[tuple[int, float], ProcessRecord] = field(default_factory=dict)
    stages: dict[str, StageWindow] = field(default_factory=lambda: {stage: StageWindow() for stage in STAGES})
    tree_peak_bytes: int = 0


def high_water_mark(process: psutil.Process) -> int:
    """The most RSS the process has had so far (VmHWM), in bytes; its current RSS if unreadable."""
    try:
        with open(f"/proc/{process.pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return process.memory_info().rss


def notebook_stage(command: list[str]) -> str | None:
    """The stage a papermill runner executes, from `python -m taxi_duration.runner.child <notebook> ...`."""
    if "taxi_duration.runner.child" not in command:
        return None
    notebook = command[command.index("taxi_duration.runner.child") + 1]
    return Path(notebook).stem


def sample(root: psutil.Process, observation: Observation, now: float) -> None:
    """One look at the process tree: each process's high-water mark, and the tree's RSS sum."""
    try:
        tree = [root, *root.children(recursive=True)]
        # Parents before children, so a kernel's runner is known when the kernel is first seen.
        tree.sort(key=lambda process: process.create_time())
    except psutil.NoSuchProcess:
        return
    runners: dict[int, str] = {}
    total = 0
    running: set[str] = set()
    for process in tree:
        try:
            with process.oneshot():
                key = (process.pid, process.create_time())
                record = observation.processes.get(key)
                if record is None:
                    record = ProcessRecord(*classify(process, root, runners), first_seen=now, last_seen=now)
                    observation.processes[key] = record
                if record.role.endswith("runner") and record.stage:
                    runners[process.pid] = record.stage
                rss = process.memory_info().rss
                record.peak_bytes = max(record.peak_bytes, high_water_mark(process), rss)
                record.last_seen = now
                total += rss
                if record.stage:
                    running.add(record.stage)
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            continue
    observation.tree_peak_bytes = max(observation.tree_peak_bytes, total)
    for stage in running:
        window = observation.stages[stage]
        window.started = now if window.started is None else window.started
        window.ended = now
        window.tree_peak_bytes = max(window.tree_peak_bytes, total)


def classify(process: psutil.Process, root: psutil.Process, runners: dict[int, str]) -> tuple[str, str | None]:
    if process.pid == root.pid:
        return "flow", None
    stage = notebook_stage(process.cmdline())
    if stage:
        return f"{stage} runner", stage
    parent = process.ppid()
    if parent in runners:
        return f"{runners[parent]} kernel", runners[parent]
    return f"other: {process.name()}", None


def isolated_environment(workdir: Path) -> dict[str, str]:
    """The user's environment with every store the pipeline writes moved into `workdir`."""
    environment = {
        **os.environ,
        "TAXI_OUTPUTS_DIR": str(workdir / "outputs"),
        "TAXI_DATA_DIR": str(workdir / "data"),
        "TAXI_CACHE_DIR": str(workdir / "stage-cache"),
        "TAXI_SERVICES_DIR": str(workdir / "services"),  # so no running project server is adopted
        "TAXI_PREFECT_SERVER": "ephemeral",
        "PREFECT_HOME": str(workdir / "prefect"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}",
        "MLFLOW_EXPERIMENT_NAME": "scale-bench",
        "TAXI_NOTEBOOK_TIMEOUT": "7200",
    }
    for name in ("PREFECT_API_URL", "TAXI_DATA_SOURCE"):
        environment.pop(name, None)
    return environment


def run_pipeline(source: Path, workdir: Path, interval: float) -> tuple[Observation, float, int, Path]:
    """Run the flow, sampling its tree; return what was seen, its wall time, return code and log."""
    log = workdir / "pipeline.log"
    command = [
        sys.executable,
        str(PROJECT_DIR / "flows" / "pipeline.py"),
        "--year",
        str(TRAIN_MONTH.year),
        "--month",
        str(TRAIN_MONTH.month),
        "--color",
        "yellow",
        "--data-source",
        str(source),
    ]
    observation = Observation()
    started = time.monotonic()
    with open(log, "wb") as sink:
        child = subprocess.Popen(
            command,
            cwd=PROJECT_DIR,
            env=isolated_environment(workdir),
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    root = psutil.Process(child.pid)
    try:
        while child.poll() is None:
            sample(root, observation, time.monotonic() - started)
            time.sleep(interval)
    finally:
        if child.poll() is None:  # interrupted: do not leave a pipeline running
            child.terminate()
            child.wait(timeout=60)
    return observation, time.monotonic() - started, child.returncode, log


def _mib(size: int) -> str:
    return f"{size / 2**20:,.0f}"


def stage_peak(observation: Observation, role: str) -> int:
    return max((record.peak_bytes for record in observation.processes.values() if record.role == role), default=0)


def manifests(outputs: Path) -> dict[str, dict]:
    found = {}
    for stage in STAGES:
        paths = sorted(outputs.rglob(f"{stage}.manifest.json"))
        if paths:
            found[stage] = json.loads(paths[-1].read_text())
    return found


def report(observation: Observation, wall_seconds: float, rows: int, largest_child: int, found: dict[str, dict]) -> str:
    flow_peak = stage_peak(observation, "flow")
    single_peak = max([record.peak_bytes for record in observation.processes.values()] + [largest_child])
    lines = [
        f"Scale run: `flows/pipeline.py --year 2023 --month 3 --color yellow` on synthetic yellow months of "
        f"{rows:,} trips each; time and peak RSS per stage (VmHWM of each process, sampled; "
        f"'tree' = the most RSS the whole process tree held at once while the stage ran).",
        "",
        "| stage | wall time (s) | kernel peak (MiB) | runner peak (MiB) | tree peak (MiB) |",
        "|---|---:|---:|---:|---:|",
    ]
    first_start = min((w.started for w in observation.stages.values() if w.started is not None), default=wall_seconds)
    last_end = max((w.ended for w in observation.stages.values() if w.ended is not None), default=wall_seconds)
    lines.append(f"| flow start-up and data checks | {first_start:.1f} | | | |")
    for stage, window in observation.stages.items():
        seconds = "not run" if window.started is None else f"{window.ended - window.started:.1f}"
        lines.append(
            f"| {stage} | {seconds} | {_mib(stage_peak(observation, f'{stage} kernel'))} "
            f"| {_mib(stage_peak(observation, f'{stage} runner'))} | {_mib(window.tree_peak_bytes)} |"
        )
    lines += [
        f"| flow wrap-up (archiving, run status) | {wall_seconds - last_end:.1f} | | | |",
        f"| **whole pipeline** | **{wall_seconds:.1f}** | | flow process: {_mib(flow_peak)} "
        f"| {_mib(observation.tree_peak_bytes)} |",
        "",
        f"Largest single process: {_mib(single_peak)} MiB (getrusage cross-check: {_mib(largest_child)} MiB); "
        f"target 4 GiB = 4,096 MiB: {'met' if single_peak <= TARGET_BYTES else 'NOT met'}. "
        f"Whole tree at once: {_mib(observation.tree_peak_bytes)} MiB "
        f"({'within' if observation.tree_peak_bytes <= TARGET_BYTES else 'over'} 4 GiB).",
    ]
    windows = [(stage, w) for stage, w in observation.stages.items() if w.started is not None]
    for index, (stage, window) in enumerate(windows):
        for other, later in windows[index + 1 :]:
            overlap = min(window.ended, later.ended) - max(window.started, later.started)
            if overlap > 0:
                lines.append(
                    f"{stage} and {other} ran side by side for {overlap:.0f} s (the flow runs them "
                    f"concurrently), so their 'tree' peaks include both kernels at once."
                )
    features = found.get("02_features", {})
    metrics = found.get("03_train", {}).get("metrics", {})
    if features:
        lines.append(
            f"Matrices: {features['train_rows']:,} train x {features['n_features']:,} features "
            f"(nnz {features['train_nnz']:,}), {features['val_rows']:,} validation (nnz {features['val_nnz']:,})"
            + (f"; validation RMSE {metrics['rmse']:.4f} min." if "rmse" in metrics else ".")
        )
    others = sorted({record.role for record in observation.processes.values() if record.role.startswith("other")})
    if others:
        lines.append(f"Other processes in the tree (counted in 'tree'): {', '.join(others)}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--rows", type=int, default=YELLOW_MONTHLY_TRIPS, help="trips per month (default: a yellow month)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between samples of the process tree")
    parser.add_argument("--output", type=Path, default=PROJECT_DIR / "outputs" / "bench" / "scale.md")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (data, outputs, log)")
    args = parser.parse_args(argv)
    if args.rows < 1 or args.interval <= 0:
        parser.error("--rows must be at least 1 and --interval positive")

    workdir = Path(tempfile.mkdtemp(prefix="taxi-scale-"))
    try:
        source = workdir / "source"
        for month in (TRAIN_MONTH, TRAIN_MONTH.next()):
            print(f"writing {write_trip_file(source, 'yellow', month, args.rows, args.seed)}", file=sys.stderr)
        print("running the pipeline...", file=sys.stderr)
        observation, wall_seconds, returncode, log = run_pipeline(source, workdir, args.interval)
        largest_child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        if returncode != 0:
            print(log.read_text(errors="replace")[-6000:], file=sys.stderr)
            print(f"the pipeline failed (exit {returncode}); its log is above", file=sys.stderr)
            args.keep = True
            return 1
        table = report(observation, wall_seconds, args.rows, largest_child, manifests(workdir / "outputs"))
        print(table)
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(table + "\n", encoding="utf-8")
        print(f"written to {args.output}", file=sys.stderr)
        return 0
    finally:
        if args.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
