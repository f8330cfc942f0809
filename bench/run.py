"""Benchmark: the pipeline against the plain single script, alternating, in one invocation.

    .venv/bin/python bench/run.py                 # real green 2023-03/04, 5 repetitions (`make bench`)
    .venv/bin/python bench/run.py --repeat 3 --check
    .venv/bin/python bench/run.py --quick --output-dir /tmp/bench   # small synthetic files, 1 repetition

Variants, each a fresh process started as a user would start it:

  plain      bench/plain_script.py: the same recipe and training, no Prefect/papermill/notebooks,
             MLflow into a fresh SQLite file (the store the pipeline uses by default).
  plain, GC paused
             the same with --pause-gc: the collector paused during the imports and skipped at
             exit, as in the pipeline's processes. No target; the table's last ratio is to it.
  cold       flows/pipeline.py with nothing cached: fresh outputs (so a fresh stage cache), download
             cache and SQLite store. The local Prefect server is already running, as it is after
             the user's first `make run` (the steady state); it is started once, before the timings.
  rerun      the same command again on the outputs and store of the cold run just before it:
             every stage is reused from the stage cache.
  servers    the pipeline with `make services` up: a real `mlflow server` and the Prefect server,
             started once (`python -m taxi_duration.servers.local_servers start`); fresh outputs each time.
  first run  the first run ever: like cold, but with an empty services folder, so the pipeline
             starts the local Prefect server itself (stopped afterwards). Reported, no target.
  cold, fast start off
             cold with TAXI_FAST_START=0: taxi_duration.runner.fast_start's garbage-collector pause off.
  cold, no kernels ahead (only with --variants)
             cold with no runner started ahead of its stage (bench/pipeline_no_kernels_ahead.py).
             Below the table: what each saves a cold run (median and paired per repetition), with
             the CPU time (user + system of the reaped tree), which other work on the machine
             moves far less than the wall time.

    .venv/bin/python bench/run.py --repeat 3 --variants cold,cold-fast-start-off,cold-no-kernels-ahead

Each repetition runs the variants in a rotated order (rerun always right after its cold run),
so no variant is always first. Medians are compared with plain's median.

Isolation: every store lives in a temporary folder (outputs, stage cache, download cache, MLflow
stores and artifacts, Prefect home, services folder, free ports); the project's own mlflow.db,
outputs/ and .services/ are never touched, except the report in --output-dir.

Memory: a thread samples the measured process tree (the command, notebook runners, kernels,
and in "first run" the Prefect server it starts) every --interval seconds with psutil.
"tree" is the largest sum of RSS over the tree seen at one sample; "largest process" is the
largest per-process high-water mark (VmHWM from /proc, so peaks between samples count). Servers
started outside the measured command (cold, rerun, servers) are not in the tree; their RSS at
the end is in the report header.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
from scale import high_water_mark  # bench/ is the script's folder, first on sys.path

from taxi_duration import runfiles, settings
from taxi_duration.data.periods import Month
from taxi_duration.data.synthetic import write_trip_file
from taxi_duration.runner import fast_start

PROJECT_DIR = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = PROJECT_DIR.parent / "shared" / "data" / "tlc"
TRAIN_MONTH = Month(2023, 3)
COLOR = "green"
PLAIN_GC = "plain, GC paused"
FAST_START_OFF = "cold, fast start off"
NO_KERNELS_AHEAD = "cold, no kernels ahead"
# Cold runs with a speed-up switched off, to show what it saves (issue 28: one that saves < 3 % goes).
SPEED_UP_VARIANTS = (FAST_START_OFF, NO_KERNELS_AHEAD)
VARIANTS = ("plain", PLAIN_GC, "cold", "servers", "rerun", "first run", *SPEED_UP_VARIANTS)
DEFAULT_VARIANTS = ("plain", PLAIN_GC, "cold", "servers", "rerun", "first run", FAST_START_OFF)
# Rotated each repetition; rerun needs the cold run just before it, so they move together.
ROTATION_UNITS = (
    ("plain",),
    ("cold", "rerun"),
    (FAST_START_OFF,),
    (PLAIN_GC,),
    ("servers",),
    ("first run",),
    (NO_KERNELS_AHEAD,),
)
TARGETS = {"servers": 1.25, "cold": 1.6, "rerun": 0.35}
RMSE_DECIMALS = 4
QUICK_ROWS = 3000
# Variables of the user's that would point a run at their own stores or servers.
USER_KNOBS = ("PREFECT_API_URL", "PREFECT_HOME", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME")


class BenchError(RuntimeError):
    """A run failed or disagreed; the message says which and shows its output."""


@dataclass
class Measurement:
    variant: str
    repetition: int
    seconds: float
    tree_peak_bytes: int
    largest_process_bytes: int
    rmse: float | None
    log: str
    # user + system time of the command and the descendants it reaped (kernels, runners): unlike
    # the wall time, it barely moves when other work shares the cores, but it misses waits.
    cpu_seconds: float = 0.0


@dataclass
class Bench:
    """Where everything of one benchmark invocation lives, and what it measured."""

    work: Path
    data_dir: Path
    interval: float
    timeout: float
    measurements: list[Measurement] = field(default_factory=list)
    services_dirs: list[Path] = field(default_factory=list)  # every folder that may hold a running server
    server_pids: list[int] = field(default_factory=list)  # every server started, for the record
    counter: int = 0

    def folder(self, name: str) -> Path:
        self.counter += 1
        path = self.work / f"{self.counter:02d}-{slug(name)}"
        path.mkdir(parents=True)
        return path


# --- measuring one process tree --------------------------------------------------------------


class TreeSampler(threading.Thread):
    """Samples a process tree's summed RSS and its largest per-process peak until stopped."""

    def __init__(self, pid: int, interval: float) -> None:
        super().__init__(daemon=True)
        self.root = psutil.Process(pid)
        self.interval = interval
        self.finished = threading.Event()
        self.tree_peak = 0
        self.largest = 0

    def run(self) -> None:
        while True:
            self.sample()
            if self.finished.wait(self.interval):
                return

    def sample(self) -> None:
        try:
            processes = [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        total = 0
        for process in processes:
            try:
                total += process.memory_info().rss
                self.largest = max(self.largest, high_water_mark(process))
            except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
                continue
        self.tree_peak = max(self.tree_peak, total)


def measure(
    bench: Bench, command: list[str], env: dict[str, str], cwd: Path, log: Path
) -> tuple[float, int, int, str, float]:
    """Run `command`, timing it and sampling its tree; return (seconds, tree peak, largest, output, CPU seconds).

    Raises BenchError, with the tail of the output, when it exits non-zero or times out.
    """
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(log, "wb") as sink:
        started = time.monotonic()
        # Its own session: Ctrl-C reaches it only through us, and we can stop its whole group.
        child = subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        sampler = TreeSampler(child.pid, bench.interval)
        sampler.start()
        try:
            returncode = child.wait(timeout=bench.timeout)
        except BaseException:  # timeout, Ctrl-C, SIGTERM: do not leave it running
            _stop_group(child)
            raise
        finally:
            seconds = time.monotonic() - started
            sampler.finished.set()
            sampler.join()
    output = log.read_text(errors="replace")
    if returncode != 0:
        tail = "\n".join(output.splitlines()[-40:])
        raise BenchError(
            f"`{' '.join(command)}` exited with {returncode} after {seconds:.1f} s; last lines of {log}:\n{tail}"
        )
    children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = sum(getattr(children_after, f) - getattr(children_before, f) for f in ("ru_utime", "ru_stime"))
    return seconds, sampler.tree_peak, sampler.largest, output, cpu


def _stop_group(child: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 5)):
        try:
            os.killpg(child.pid, sig)
        except ProcessLookupError:
            return
        try:
            child.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


# --- environments ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def base_environment() -> dict[str, str]:
    """The user's environment without anything pointing at their stores or servers, plus the
    pipeline's library defaults (telemetry off...), applied to every variant alike.

    Note: main() sets OMP_NUM_THREADS in our own environment for --threads, so it arrives here.
    """
    environment = {
        key: value for key, value in os.environ.items() if not key.startswith("TAXI_") and key not in USER_KNOBS
    }
    environment.update(settings.ENVIRONMENT_DEFAULTS)
    return environment


def services_environment(services_dir: Path, prefect_port: int, mlflow_port: int) -> dict[str, str]:
    return {
        **base_environment(),
        "TAXI_SERVICES_DIR": str(services_dir),
        "TAXI_PREFECT_PORT": str(prefect_port),
        "TAXI_MLFLOW_PORT": str(mlflow_port),
    }


def pipeline_environment(services: dict[str, str], run: Path, prefect_home: Path) -> dict[str, str]:
    """A pipeline run with its outputs (and stage cache), download cache and SQLite store in `run`."""
    return {
        **services,
        "TAXI_OUTPUTS_DIR": str(run / "outputs"),
        "TAXI_DATA_DIR": str(run / "data"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{run / 'mlflow.db'}",
        "PREFECT_HOME": str(prefect_home),
    }


def services_command(action: str) -> list[str]:
    return [sys.executable, "-m", "taxi_duration.servers.local_servers", action]


def start_services(bench: Bench, env: dict[str, str], log: Path) -> None:
    bench.services_dirs.append(Path(env["TAXI_SERVICES_DIR"]))
    completed = subprocess.run(
        services_command("start"), cwd=PROJECT_DIR, env=env, capture_output=True, text=True, timeout=600
    )
    log.write_text(completed.stdout + completed.stderr)
    if completed.returncode != 0:
        raise BenchError(f"could not start the benchmark's servers:\n{completed.stdout}{completed.stderr}")


def recorded_server_pids(services_dir: Path) -> list[int]:
    pids = []
    for state_file in sorted(services_dir.glob("*.json")):
        try:
            pids.append(int(json.loads(state_file.read_text())["pid"]))
        except (OSError, ValueError, KeyError):
            continue
    return pids


def stop_services(services_dir: Path) -> None:
    """`python -m taxi_duration.servers.local_servers stop` for one folder: only the servers recorded there."""
    env = {**base_environment(), "TAXI_SERVICES_DIR": str(services_dir)}
    completed = subprocess.run(
        services_command("stop"), cwd=PROJECT_DIR, env=env, capture_output=True, text=True, timeout=120
    )
    if completed.returncode != 0:
        print(
            f"warning: stopping the servers in {services_dir} failed:\n{completed.stdout}{completed.stderr}",
            file=sys.stderr,
        )


def services_rss(services_dir: Path) -> dict[str, int]:
    """Current RSS of each recorded server's process tree (gunicorn workers included)."""
    sizes = {}
    for state_file in sorted(services_dir.glob("*.json")):
        try:
            state = json.loads(state_file.read_text())
            root = psutil.Process(int(state["pid"]))
            sizes[state["name"]] = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
        except (OSError, ValueError, KeyError, psutil.Error):
            continue
    return sizes


# --- the variants ----------------------------------------------------------------------------

SUMMARY_RMSE = re.compile(r"validation RMSE\s+([0-9.]+) minutes")
SUMMARY_RUN_DIR = re.compile(r"reports \(review\)\s+(\S+?)/?$", re.MULTILINE)
PLAIN_RMSE = re.compile(r"validation RMSE (\S+) minutes")
REUSED_LINE = re.compile(r"reused, unchanged (.*)$", re.MULTILINE)
STAGES = ("01_explore", "02_features", "03_train")


def pipeline_command() -> list[str]:
    return [
        sys.executable,
        str(PROJECT_DIR / "flows" / "pipeline.py"),
        "--year",
        str(TRAIN_MONTH.year),
        "--month",
        str(TRAIN_MONTH.month),
        "--color",
        COLOR,
    ]


def pipeline_rmse(output: str, log: Path) -> float:
    """The validation RMSE of a pipeline run: full precision from its training manifest,
    checked against the summary line the user reads."""
    shown, run_dir = SUMMARY_RMSE.search(output), SUMMARY_RUN_DIR.search(output)
    if not shown or not run_dir:
        raise BenchError(f"the pipeline exited 0 but printed no summary with the validation RMSE; see {log}")
    rmse = float(runfiles.read_manifest(Path(run_dir.group(1)), "03_train")["metrics"]["rmse"])
    if f"{rmse:.3f}" != shown.group(1):
        raise BenchError(f"the summary shows RMSE {shown.group(1)} but the run's manifest has {rmse}; see {log}")
    return rmse


def run_plain(bench: Bench, repetition: int, base: dict[str, str], pause_gc: bool = False) -> Measurement:
    run = bench.folder("plain-gc-paused" if pause_gc else "plain")
    command = [
        sys.executable,
        str(PROJECT_DIR / "bench" / "plain_script.py"),
        "--data-dir",
        str(bench.data_dir),
        "--year",
        str(TRAIN_MONTH.year),
        "--month",
        str(TRAIN_MONTH.month),
        "--color",
        COLOR,
        "--tracking-uri",
        f"sqlite:///{run / 'mlflow.db'}",
        "--experiment",
        "plain-script",
        *(["--pause-gc"] if pause_gc else []),
    ]
    log = run / "output.log"
    seconds, tree, largest, output, cpu = measure(bench, command, base, run, log)
    found = PLAIN_RMSE.search(output)
    if not found:
        raise BenchError(f"the plain script exited 0 but printed no RMSE; see {log}")
    variant = PLAIN_GC if pause_gc else "plain"
    return Measurement(variant, repetition, seconds, tree, largest, float(found.group(1)), str(log), cpu)


def run_pipeline(
    bench: Bench, variant: str, repetition: int, env: dict[str, str], log: Path, script: Path | None = None
) -> Measurement:
    """flows/pipeline.py's command line (or `script` with the same arguments) on the bench's data."""
    command = [*pipeline_command(), "--data-source", str(bench.data_dir)]
    if script is not None:
        command[1] = str(script)
    seconds, tree, largest, output, cpu = measure(bench, command, env, PROJECT_DIR, log)
    # A rerun that executed notebooks, or a cold run that reused some, measured something else.
    reused = REUSED_LINE.search(output)
    reused_stages = sorted(re.findall(r"(\d\d_\w+) \(run", reused.group(1))) if reused else []
    if variant == "rerun" and reused_stages != list(STAGES):
        raise BenchError(
            f"the rerun reused {reused_stages or 'no stage'} instead of every stage {list(STAGES)}: "
            f"the stage cache missed; see {log}"
        )
    if variant != "rerun" and reused_stages:
        raise BenchError(f"the {variant} run reused {reused_stages} although nothing should be cached; see {log}")
    return Measurement(variant, repetition, seconds, tree, largest, pipeline_rmse(output, log), str(log), cpu)


def reset_registry(tracking_uri: str) -> None:
    """Remove the registered model left by an earlier repetition on the long-lived MLflow server.

    Every cold run starts with an empty registry; without this, later `servers` runs would also
    re-score the previous champion, work the cold runs never do.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(tracking_uri).delete_registered_model("nyc-taxi-duration")
    except MlflowException as error:
        if "RESOURCE_DOES_NOT_EXIST" not in str(error) and "not found" not in str(error).lower():
            raise


def run_repetition(bench: Bench, repetition: int, order: list[str], shared: dict) -> None:
    base = base_environment()
    cold_run: Path | None = None
    for variant in order:
        print(f"  repetition {repetition + 1}: {variant} ...", end="", flush=True)
        if variant == "plain":
            measurement = run_plain(bench, repetition, base)
        elif variant == PLAIN_GC:
            measurement = run_plain(bench, repetition, base, pause_gc=True)
        elif variant == "cold":
            cold_run = bench.folder("cold")
            env = pipeline_environment(shared["local_env"], cold_run, shared["prefect_home"])
            measurement = run_pipeline(bench, "cold", repetition, env, cold_run / "output.log")
        elif variant in SPEED_UP_VARIANTS:
            run = bench.folder(variant)
            env = pipeline_environment(shared["local_env"], run, shared["prefect_home"])
            script = None
            if variant == NO_KERNELS_AHEAD:
                script = PROJECT_DIR / "bench" / "pipeline_no_kernels_ahead.py"
            else:
                env[fast_start.SWITCH] = "0"
            measurement = run_pipeline(bench, variant, repetition, env, run / "output.log", script)
        elif variant == "rerun":
            assert cold_run is not None, "rerun is scheduled right after its cold run"
            env = pipeline_environment(shared["local_env"], cold_run, shared["prefect_home"])
            measurement = run_pipeline(bench, "rerun", repetition, env, cold_run / "rerun-output.log")
        elif variant == "servers":
            run = bench.folder("servers")
            reset_registry(shared["mlflow_url"])
            env = {
                **pipeline_environment(shared["servers_env"], run, shared["prefect_home"]),
                "MLFLOW_TRACKING_URI": shared["mlflow_url"],
                "PREFECT_API_URL": shared["prefect_api"],
            }
            measurement = run_pipeline(bench, "servers", repetition, env, run / "output.log")
        else:  # first run: nothing exists yet, not even the local Prefect server or Prefect's home
            run = bench.folder("first-run")
            services_dir = run / "services"
            bench.services_dirs.append(services_dir)
            env = pipeline_environment(
                services_environment(services_dir, free_port(), free_port()), run, run / "prefect-home"
            )
            try:
                measurement = run_pipeline(bench, "first run", repetition, env, run / "output.log")
            finally:
                bench.server_pids += recorded_server_pids(services_dir)
                stop_services(services_dir)
        bench.measurements.append(measurement)
        print(
            f" {measurement.seconds:.1f} s ({measurement.cpu_seconds:.1f} s CPU), RMSE {measurement.rmse}", flush=True
        )


def slug(variant: str) -> str:
    """A variant's name on the command line (--variants): "cold, fast start off" -> cold-fast-start-off."""
    return variant.lower().replace(", ", "-").replace(" ", "-")


def rotated_order(repetition: int, selected: tuple[str, ...]) -> list[str]:
    units = [kept for unit in ROTATION_UNITS if (kept := tuple(v for v in unit if v in selected))]
    shift = repetition % len(units)
    return [variant for unit in units[shift:] + units[:shift] for variant in unit]


# --- report ----------------------------------------------------------------------------------


def _mib(size: int) -> str:
    return f"{size / 2**20:,.0f} MiB"


def machine_description() -> dict[str, object]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_bytes": psutil.virtual_memory().total,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def git_description() -> str:
    def git(*args: str) -> str:
        completed = subprocess.run(["git", *args], cwd=PROJECT_DIR, capture_output=True, text=True, timeout=30)
        return completed.stdout.strip() if completed.returncode == 0 else ""

    commit = git("rev-parse", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return commit + (" (with uncommitted changes in the checkout)" if dirty else "")


def data_description(data_dir: Path, quick: bool) -> dict[str, object]:
    import pyarrow.parquet as pq

    files = {}
    for month in (TRAIN_MONTH, TRAIN_MONTH.next()):
        path = data_dir / f"{COLOR}_tripdata_{month.label()}.parquet"
        files[month.label()] = {"path": str(path), "rows": pq.ParquetFile(path).metadata.num_rows}
    return {"kind": "synthetic (taxi_duration.data.synthetic)" if quick else "real TLC files", "files": files}


def _median_of(bench: Bench, variant: str) -> float | None:
    seconds = [m.seconds for m in bench.measurements if m.variant == variant]
    return statistics.median(seconds) if seconds else None


def summarize(bench: Bench) -> list[dict[str, object]]:
    plain_median = _median_of(bench, "plain")
    assert plain_median is not None, "plain is always measured"
    plain_gc_median = _median_of(bench, PLAIN_GC)
    rows = []
    for variant in VARIANTS:
        runs = [m for m in bench.measurements if m.variant == variant]
        if not runs:
            continue
        seconds = [m.seconds for m in runs]
        median = statistics.median(seconds)
        ratio = median / plain_median
        target = TARGETS.get(variant)
        rows.append(
            {
                "variant": variant,
                "median": median,
                "min": min(seconds),
                "max": max(seconds),
                "ratio": ratio,
                "ratio_to_plain_gc_paused": None if plain_gc_median is None else median / plain_gc_median,
                "target": target,
                "within_target": None if target is None else ratio <= target,
                "tree_peak_bytes": max(m.tree_peak_bytes for m in runs),
                "largest_process_bytes": max(m.largest_process_bytes for m in runs),
            }
        )
    return rows


def speed_up_savings(bench: Bench) -> list[dict[str, object]]:
    """What each switched-off speed-up costs a cold run: the cold run without it minus the cold run.

    `saved_share` is the saving as a share of the cold run without it. `paired` are the same
    differences within each repetition (both ran minutes apart), which cancel slow spells of the
    shared machine that a median of each alone keeps.
    """
    cold = {m.repetition: m.seconds for m in bench.measurements if m.variant == "cold"}
    cold_cpu = [m.cpu_seconds for m in bench.measurements if m.variant == "cold"]
    savings = []
    for variant in SPEED_UP_VARIANTS:
        without = {m.repetition: m.seconds for m in bench.measurements if m.variant == variant}
        if not without or not cold:
            continue
        without_cpu = [m.cpu_seconds for m in bench.measurements if m.variant == variant]
        cold_median, without_median = statistics.median(cold.values()), statistics.median(without.values())
        paired = [without[r] - cold[r] for r in sorted(without) if r in cold]
        savings.append(
            {
                "variant": variant,
                "cold_median": cold_median,
                "without_median": without_median,
                "saved": without_median - cold_median,
                "saved_share": (without_median - cold_median) / without_median,
                "paired": paired,
                "paired_median": statistics.median(paired) if paired else None,
                "cpu_cold_median": statistics.median(cold_cpu),
                "cpu_without_median": statistics.median(without_cpu),
                "repetitions": len(without),
            }
        )
    return savings


def render_savings(savings: list[dict[str, object]]) -> list[str]:
    if not savings:
        return []
    lines = [
        "",
        "What the speed-ups save a cold run (issue 28: a speed-up that saves less than 3 % of a cold run goes). "
        "saved = median of the cold runs without it - median of the cold runs; share = saved / median without it; "
        "paired = (without - cold) within each repetition.",
        "",
        "| switched off | runs with | N | median s without | median s cold | saved s | share | paired: median "
        "(min..max) s | CPU s without / cold (medians) |",
        "|---|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for row in savings:
        how = "`TAXI_FAST_START=0`" if row["variant"] == FAST_START_OFF else "bench/pipeline_no_kernels_ahead.py"
        paired = row["paired"]
        spread = f"{row['paired_median']:+.1f} ({min(paired):+.1f}..{max(paired):+.1f})" if paired else "-"
        lines.append(
            f"| {row['variant'].removeprefix('cold, ')} | {how} | {row['repetitions']} | {row['without_median']:.1f} "
            f"| {row['cold_median']:.1f} | {row['saved']:+.1f} | {row['saved_share']:+.1%} | {spread} "
            f"| {row['cpu_without_median']:.1f} / {row['cpu_cold_median']:.1f} |"
        )
    return lines


def rmse_check(bench: Bench) -> dict[str, object]:
    """Every run's RMSE against the plain script's, to RMSE_DECIMALS decimals."""
    plain = next(m.rmse for m in bench.measurements if m.variant == "plain")
    tolerance = 0.5 * 10**-RMSE_DECIMALS
    disagreeing = [asdict(m) for m in bench.measurements if m.rmse is None or abs(m.rmse - plain) >= tolerance]
    return {
        "plain_rmse": plain,
        "decimals": RMSE_DECIMALS,
        "equal": not disagreeing,
        "disagreeing": disagreeing,
        "all": {f"{m.variant} #{m.repetition + 1}": m.rmse for m in bench.measurements},
    }


def render_markdown(
    header: dict[str, object],
    rows: list[dict[str, object]],
    rmse: dict[str, object],
    quick: bool,
    savings: list[dict[str, object]],
) -> str:
    machine = header["machine"]
    data = header["data"]
    files = ", ".join(f"{label}: {info['rows']:,} rows" for label, info in data["files"].items())
    lines = [
        "# Pipeline vs plain script",
        "",
        f"- date: {header['date']}",
        f"- machine: {machine['cpu']}, {machine['cores']} cores, {machine['ram_bytes'] / 2**30:.1f} GiB RAM; "
        f"load average {header['load_before'][0]:.2f} before, {header['load_after'][0]:.2f} after (1 min)",
        f"- python {machine['python']} ({machine['platform']})",
        f"- data: {data['kind']}, {COLOR} {TRAIN_MONTH.label()} (train) and {TRAIN_MONTH.next().label()} "
        f"(validation); {files}",
        f"- git commit: {header['git']}",
        f"- OMP_NUM_THREADS: {header['omp_num_threads'] or 'unset (libraries choose)'}, the same for every variant",
        f"- repetitions: {header['repetitions']}, variant order rotated each repetition "
        "(rerun right after its cold run)",
        f"- validation RMSE: plain {rmse['plain_rmse']:.6f}; every pipeline run "
        + ("agrees" if rmse["equal"] else "DOES NOT agree")
        + f" to {rmse['decimals']} decimals",
        "- peak memory: tree = largest sum of RSS over the measured process tree at one sample "
        f"(every {header['interval']} s); largest = largest single-process peak (VmHWM)",
        "- servers started outside the measured runs (not in the tree), RSS at the end: "
        + (", ".join(f"{name} {_mib(size)}" for name, size in header["servers_rss"].items()) or "n/a")
        + f"; starting both took {header['servers_start_seconds']} s (not in any row)",
        "",
        "| variant | median s | min | max | ratio to plain | target | within target? | ratio to plain, GC paused "
        "| peak memory |",
        "|---|---:|---:|---:|---:|---|---|---:|---|",
    ]
    for row in rows:
        target = "-" if row["target"] is None else f"<= {row['target']}x"
        if row["within_target"] is None:
            within = "-"
        else:
            within = ("yes" if row["within_target"] else "no") + (" (not enforced: quick)" if quick else "")
        lines.append(
            f"| {row['variant']} | {row['median']:.1f} | {row['min']:.1f} | {row['max']:.1f} | {row['ratio']:.2f}x "
            f"| {target} | {within} | {_ratio(row['ratio_to_plain_gc_paused'])} "
            f"| tree {_mib(row['tree_peak_bytes'])}, largest {_mib(row['largest_process_bytes'])} |"
        )
    lines += [
        "",
        "plain: bench/plain_script.py. plain, GC paused: the same with `--pause-gc`, the garbage-collector "
        "pause the pipeline's own processes use (taxi_duration.runner.fast_start); the targets are against plain, the last "
        "ratio shows what the pipeline costs against a script that uses the same trick. "
        "cold: the pipeline, nothing cached, local Prefect server already running. "
        "servers: with `make services` (MLflow server + Prefect server). rerun: cold again, every stage reused. "
        "first run: cold plus starting the local Prefect server (no target). "
        "cold, fast start off: cold with TAXI_FAST_START=0 (taxi_duration.runner.fast_start's garbage-collector pause off). "
        "cold, no kernels ahead: cold with no runner started ahead (bench/pipeline_no_kernels_ahead.py).",
        *render_savings(savings),
    ]
    return "\n".join(lines) + "\n"


def _ratio(value: object) -> str:
    return "-" if value is None else f"{value:.2f}x"


# --- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[1:]),
    )
    parser.add_argument("--repeat", type=int, help="repetitions of every variant (default 5; 1 with --quick)")
    parser.add_argument(
        "--data-dir", type=Path, help=f"folder with {COLOR} 2023-03 and 2023-04 (default {DEFAULT_DATA_DIR})"
    )
    parser.add_argument(
        "--quick", action="store_true", help="small synthetic files, 1 repetition, targets not enforced"
    )
    parser.add_argument(
        "--rows", type=int, default=QUICK_ROWS, help=f"trips per synthetic month with --quick (default {QUICK_ROWS})"
    )
    parser.add_argument(
        "--output-dir", type=Path, default=PROJECT_DIR / "outputs" / "bench", help="where the table and JSON go"
    )
    parser.add_argument(
        "--variants",
        default=",".join(map(slug, DEFAULT_VARIANTS)),
        help="comma-separated variants to run (plain always runs; rerun needs cold); default: "
        f"{','.join(map(slug, DEFAULT_VARIANTS))}; also: "
        f"{','.join(slug(v) for v in VARIANTS if v not in DEFAULT_VARIANTS)}",
    )
    parser.add_argument("--check", action="store_true", help="exit 1 when a ratio misses its target")
    parser.add_argument("--interval", type=float, default=0.15, help="memory sampling interval, seconds (default 0.15)")
    parser.add_argument("--timeout", type=float, default=3600, help="limit for one run, seconds (default 3600)")
    parser.add_argument(
        "--threads",
        type=int,
        help="OMP_NUM_THREADS for every variant (default: the libraries' "
        "own choice; 1 with --quick, where oversubscribed OpenMP threads make tiny trainings slow)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, stores) afterwards")
    args = parser.parse_args(argv)
    if args.repeat is None:
        args.repeat = 1 if args.quick else 5
    if args.threads is None and args.quick:
        args.threads = 1
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    if args.repeat < 1:
        parser.error(f"--repeat must be at least 1, got {args.repeat}")
    if args.quick and args.data_dir:
        parser.error("--quick generates its own data; do not pass --data-dir with it")
    selected = {name.strip() for name in args.variants.split(",") if name.strip()} | {"plain"}
    unknown = selected - {slug(v) for v in VARIANTS}
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {','.join(map(slug, VARIANTS))}")
    if "rerun" in selected and "cold" not in selected:
        parser.error("rerun reuses a cold run's outputs: select cold too")
    args.variants = tuple(v for v in VARIANTS if slug(v) in selected)
    if args.rows < 100:
        parser.error(f"--rows must be at least 100, got {args.rows}")
    return args


def _exit_on_sigterm(signum: int, frame) -> None:
    raise SystemExit(128 + signum)  # unwind through the finally blocks that stop the servers


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    if args.threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    work = Path(tempfile.mkdtemp(prefix="taxi-bench-"))
    if args.quick:
        data_dir = work / "data-source"
        for month in (TRAIN_MONTH, TRAIN_MONTH.next()):
            write_trip_file(data_dir, COLOR, month, args.rows, seed=7)
    else:
        data_dir = (args.data_dir or DEFAULT_DATA_DIR).resolve()
        missing = [
            name
            for month in (TRAIN_MONTH, TRAIN_MONTH.next())
            if not (data_dir / (name := f"{COLOR}_tripdata_{month.label()}.parquet")).is_file()
        ]
        if missing:
            shutil.rmtree(work)
            print(
                f"error: {data_dir} lacks {', '.join(missing)}. Pass --data-dir with a folder holding the real "
                f"TLC files, or use --quick for a small synthetic run.",
                file=sys.stderr,
            )
            return 2
    bench = Bench(work=work, data_dir=data_dir, interval=args.interval, timeout=args.timeout)
    data = data_description(data_dir, args.quick)
    load_before = os.getloadavg()
    git_before = git_description()
    ok = False
    try:
        print(f"benchmark folder {work}; starting the benchmark's MLflow and Prefect servers ...", flush=True)
        setup_started = time.monotonic()
        services_dir = work / "services"
        services_env = services_environment(services_dir, free_port(), free_port())
        mlflow_store = work / "mlflow-server"
        mlflow_store.mkdir()
        start_services(
            bench,
            {
                **services_env,
                "TAXI_MLFLOW_BACKEND_URI": f"sqlite:///{mlflow_store / 'mlflow.db'}",
                # The server's artifact destination is <project>/mlartifacts; only for this
                # command, the "project" is a temporary folder, so the user's is untouched.
                "TAXI_PROJECT_DIR": str(mlflow_store),
            },
            work / "services-start.log",
        )
        states = {name: json.loads((services_dir / f"{name}.json").read_text()) for name in ("prefect", "mlflow")}
        bench.server_pids += [int(state["pid"]) for state in states.values()]
        shared = {
            # cold and rerun find the running Prefect server through the services folder, as a
            # user's `make run` does; their MLflow store is their own SQLite file.
            "local_env": services_env,
            "servers_env": services_env,
            "prefect_home": work / "prefect-home",
            "mlflow_url": states["mlflow"]["env_value"],
            "prefect_api": states["prefect"]["env_value"],
        }
        setup_seconds = time.monotonic() - setup_started
        for repetition in range(args.repeat):
            run_repetition(bench, repetition, rotated_order(repetition, args.variants), shared)
        servers_rss = services_rss(services_dir)
        ok = True
    except BenchError as error:
        print(f"\nbenchmark failed: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nbenchmark interrupted", file=sys.stderr)
        return 130
    finally:
        for folder in reversed(bench.services_dirs):
            stop_services(folder)
        if ok and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"logs and stores kept in {work}", file=sys.stderr)

    rows = summarize(bench)
    rmse = rmse_check(bench)
    savings = speed_up_savings(bench)
    header = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine_description(),
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "data": data,
        # Others may commit while a long benchmark runs: say so rather than name one commit.
        "git": git_before
        if git_description() == git_before
        else f"{git_before} at the start, {git_description()} at the end",
        "repetitions": args.repeat,
        "quick": args.quick,
        "interval": args.interval,
        "servers_rss": servers_rss,
        "servers_start_seconds": round(setup_seconds, 1),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    markdown = render_markdown(header, rows, rmse, args.quick, savings)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "pipeline.md").write_text(markdown)
    (args.output_dir / "pipeline.json").write_text(
        json.dumps(
            {
                **header,
                "targets": TARGETS,
                "summary": rows,
                "speed_up_savings": savings,
                "rmse_check": rmse,
                "server_pids": bench.server_pids,
                "measurements": [asdict(m) for m in bench.measurements],
            },
            indent=2,
            default=str,
        )
    )
    print()
    print(markdown)
    print(f"written: {args.output_dir / 'pipeline.md'} and pipeline.json")
    if not rmse["equal"]:
        print(f"error: pipeline RMSE differs from the plain script's: {rmse['disagreeing']}", file=sys.stderr)
        return 1
    if args.check and not args.quick:
        missed = [row["variant"] for row in rows if row["within_target"] is False]
        if missed:
            print(f"--check: outside target: {', '.join(missed)}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
