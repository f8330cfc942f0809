"""Backfill: the pipeline once per month over a range, a bounded number at a time.

    python flows/backfill.py --from 2023-01 --to 2023-04 [--color green] [--data-source URL|DIR]
                             [--experiment NAME] [--max-parallel 2] [--force]
                             [--tune-trials N [--tune-workers N] [--tune-seed 42]]
                             [--dask | --dask-address tcp://HOST:8786]

Each month is one run of the pipeline flow (a subflow here), with its own MLflow run and run
folder. Months whose stages are unchanged since an earlier run reuse them, so repeating a
backfill costs seconds. Exits non-zero if any month failed; the others still run.

By default months run in threads of this process. `--dask` runs each month in a worker process
of a local Dask cluster (`--max-parallel` workers); `--dask-address` (default
$TAXI_DASK_ADDRESS) sends them to an existing Dask scheduler, whose workers may be on other
machines: those need the project installed, a route to this backfill's
Prefect server (PREFECT_API_URL, required then; it travels with each task), and the shared
MLflow server in their own MLFLOW_TRACKING_URI.

`--tune-trials N` tunes each month's model first (the pipeline's `--tune-trials`); its trials
run in local processes of whichever process runs the month (`--dask` here places months, not trials).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from taxi_duration import settings
from taxi_duration.data import tripfiles
from taxi_duration.data.periods import Color, InvalidParameterError, PipelineParams, month_range
from taxi_duration.orchestration import console, stopping
from taxi_duration.orchestration.pipeline import taxi_duration_pipeline
from taxi_duration.servers import endpoints, local_servers

DEFAULT_MAX_PARALLEL = 2
PIPELINE_MODULE = "taxi_duration.orchestration.pipeline"  # what a Dask worker must be able to import
DASK_ADDRESS_ENV = "TAXI_DASK_ADDRESS"
DASK_CONNECT_TIMEOUT_SECONDS = 10


class DaskUnavailableError(RuntimeError):
    """The Dask scheduler cannot be reached, has no workers, or its workers cannot run the pipeline."""


@task(name="backfill-month", task_run_name="{color}-{label}", cache_policy=NO_CACHE)
def run_month(
    label: str,
    year: int,
    month: int,
    color: Color,
    data_source: str | None,
    experiment: str | None,
    force: bool,
    tune: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One month's pipeline; a failure is reported in the result, not raised, so others go on.

    `tune`: the pipeline's tune_trials, tune_workers and tune_seed (None: no search).
    """
    worker = dask_worker()
    try:
        result = taxi_duration_pipeline(
            year=year,
            month=month,
            color=color,
            data_source=data_source,
            experiment=experiment,
            force=force,
            **(tune or {}),
        )
    except Exception as error:  # noqa: BLE001 - one month's failure must not stop the backfill
        return _failed_row(label, str(error), worker)
    return {
        "month": label,
        "status": "FINISHED",
        "rmse": result["rmse"],
        "reused": list(result["reused_stages"]),
        "mlflow_run_id": result["mlflow_run_id"],
        "tracking_uri": result["tracking_uri"],
        "worker": worker,
        "error": None,
    }


def _failed_row(label: str, error: str, worker: str | None = None) -> dict[str, Any]:
    return {
        "month": label,
        "status": "FAILED",
        "rmse": None,
        "reused": [],
        "mlflow_run_id": None,
        "tracking_uri": None,
        "worker": worker,
        "error": error,
    }


def dask_worker() -> str | None:
    """`<worker address> pid <pid>` when running inside a Dask worker, else None."""
    if "distributed" not in sys.modules:  # never imported, so certainly not in a Dask worker
        return None
    from distributed import get_worker

    try:
        worker = get_worker()
    except ValueError:
        return None
    return f"{worker.address} pid {os.getpid()}"


# Prefect types `task_runner` as TaskRunner[PrefectFuture[Any]], which no runner of its own is (the generic is invariant).
@flow(
    name="nyc-taxi-duration-backfill",
    log_prints=True,
    task_runner=ThreadPoolTaskRunner(max_workers=DEFAULT_MAX_PARALLEL),  # type: ignore[arg-type]
)
def backfill(
    first: str,
    last: str,
    color: str = "green",
    data_source: str | None = None,
    experiment: str | None = None,
    force: bool = False,
    tune_trials: int = 0,
    tune_workers: int | None = None,
    tune_seed: int = settings.DEFAULT_TUNE_SEED,
) -> list[dict[str, Any]]:
    """Run the pipeline for every month from `first` to `last` (YYYY-MM, inclusive); `tune_trials` > 0 tunes each."""
    months = [PipelineParams.parse(m.year, m.month, color) for m in month_range(first, last)]
    tune = {"tune_trials": tune_trials, "tune_workers": tune_workers, "tune_seed": tune_seed} if tune_trials else None
    futures = [
        run_month.submit(p.train_month.label(), p.year, p.month, p.color, data_source, experiment, force, tune)
        for p in months
    ]
    rows = []
    for params, future in zip(months, futures, strict=True):
        try:
            rows.append(future.result())
        except Exception as error:  # noqa: BLE001 - e.g. a Dask worker that died or could not load the task
            rows.append(_failed_row(params.train_month.label(), f"{type(error).__name__}: {error}"))
    return rows


def task_runner(max_parallel: int, dask: bool = False, dask_address: str | None = None) -> TaskRunner:
    """Threads of this process (default), a local Dask cluster, or an existing Dask scheduler."""
    if max_parallel < 1:
        raise InvalidParameterError(f"--max-parallel must be at least 1, got {max_parallel}")
    if dask and dask_address:
        raise InvalidParameterError("--dask starts a local cluster and --dask-address uses an existing one: choose one")
    if not (dask or dask_address):
        return ThreadPoolTaskRunner(max_workers=max_parallel)
    from prefect_dask import DaskTaskRunner

    if dask_address:
        return DaskTaskRunner(address=dask_address)
    return DaskTaskRunner(
        cluster_kwargs={
            "n_workers": max_parallel,
            # One month per worker process at a time: each month gets a process of its own,
            # which is what --dask is for.
            "threads_per_worker": 1,
            "processes": True,
            # The heavy work runs in notebook kernels, child processes Dask does not measure;
            # a limit would only let Dask kill a worker mid-month, leaving its MLflow run RUNNING.
            "memory_limit": 0,
            # A free loopback port, so that two backfills at once do not both want 8787 (without
            # bokeh installed the page only says so).
            "dashboard_address": "127.0.0.1:0",
        }
    )


@contextmanager
def prefect_api_for_workers(dask: bool, dask_address: str | None) -> Iterator[None]:
    """Make sure Dask workers report to the same Prefect API as this process.

    Needed only in the `ephemeral` Prefect server mode (TAXI_PREFECT_SERVER): otherwise
    PREFECT_API_URL is set by now. Without it each worker process starts a temporary Prefect server of its own:
    slow, several servers writing one SQLite file here, and on another machine a database of
    its own. For a local cluster we start the temporary server here and hand its URL to the
    workers (it travels in the Prefect settings serialized with each task); workers behind a
    scheduler may be elsewhere, so they need a server everyone can reach.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if not (dask or dask_address) or PREFECT_API_URL.value():
        yield
        return
    require_prefect_api(dask_address)
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start()  # stopped at exit, like Prefect's own temporary server
    with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        yield


def require_prefect_api(dask_address: str | None) -> str | None:
    """The Prefect API URL workers behind `dask_address` will use; a warning if it is likely out of their reach.

    Those workers may be on other machines: they need a server everyone can reach, named
    explicitly, not a temporary or local one started on this machine for this run.
    """
    from prefect.settings import PREFECT_API_URL

    if not dask_address:
        return None
    url = os.environ.get("PREFECT_API_URL") or PREFECT_API_URL.value()
    if not url:
        raise DaskUnavailableError(
            f"--dask-address {dask_address}: the Dask workers need a Prefect server they can reach; set PREFECT_API_URL "
            "(e.g. run `prefect server start --host 0.0.0.0` and use http://<this host>:4200/api)"
        )
    if _is_loopback(url) and not _is_loopback(dask_address):
        return (
            f"warning: PREFECT_API_URL {url} is on this machine only; Dask workers on other machines cannot report "
            "their months to it"
        )
    return None


def _is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: assume it is reachable
        return False


def check_dask_scheduler(address: str, timeout: float = DASK_CONNECT_TIMEOUT_SECONDS) -> int:
    """The number of worker threads at `address`, after checking its workers can run the pipeline.

    Fails fast with the address in the message rather than leaving the backfill waiting on a
    scheduler that is not there or has no workers.
    """
    from distributed import Client
    from distributed.comm import connect

    async def reachable() -> None:
        comm = await connect(address, timeout=timeout)
        await comm.close()

    try:
        # A bare connection first: a Client that failed to connect still waits 30 s to close at exit.
        asyncio.run(reachable())
        with Client(address, timeout=timeout, set_as_default=False) as client:
            threads = client.nthreads()
            # exec, a builtin, reaches any worker; a function of this package would need the package there.
            imported = client.run(exec, f"import {PIPELINE_MODULE}", {}, on_error="return")
            cannot_import = {
                worker: f"{type(error).__name__}: {error}"
                for worker, error in imported.items()
                if isinstance(error, BaseException)
            }
    except Exception as error:  # noqa: BLE001 - whatever answered (or did not), it is no usable scheduler
        raise DaskUnavailableError(
            f"cannot use the Dask scheduler at {address}: {type(error).__name__}: {error}"
        ) from None
    if not threads:
        raise DaskUnavailableError(f"the Dask scheduler at {address} has no workers")
    if cannot_import:
        details = "; ".join(f"{worker}: {error}" for worker, error in sorted(cannot_import.items()))
        raise DaskUnavailableError(
            f"Dask workers at {address} cannot import the pipeline flow (install the project where they run, "
            f"e.g. `make env` in a checkout, and start them from that environment): {details}"
        )
    return sum(threads.values())


def run_backfill(
    first: str,
    last: str,
    max_parallel: int = DEFAULT_MAX_PARALLEL,
    dask: bool = False,
    dask_address: str | None = None,
    **options: Any,
) -> list[dict[str, Any]]:
    """`backfill` with `max_parallel` months at a time, in threads or on Dask (see `task_runner`)."""
    runner = task_runner(max_parallel, dask, dask_address)
    with (
        endpoints.prefect_api_for_run(),
        prefect_api_for_workers(dask, dask_address),
        endpoints.without_flow_heartbeats(),
    ):
        # Prefect's annotation again, as on @flow above.
        return backfill.with_options(task_runner=runner)(first=first, last=last, **options)  # type: ignore[arg-type]


def format_table(results: list[dict[str, Any]]) -> str:
    on_dask = any(row.get("worker") for row in results)
    worker_column = f" {'Dask worker':<32}" if on_dask else ""
    lines = [f"{'month':<8} {'status':<9} {'RMSE':>7}  {'reused stages':<36}{worker_column} MLflow run / error"]
    for row in results:
        rmse = "" if row["rmse"] is None else f"{row['rmse']:.3f}"
        reused = ", ".join(row["reused"]) or "-"
        worker = f" {row.get('worker') or '-':<32}" if on_dask else ""
        tail = row["mlflow_run_id"] if row["status"] == "FINISHED" else row["error"]
        lines.append(f"{row['month']:<8} {row['status']:<9} {rmse:>7}  {reused:<36}{worker} {tail}")
    failed = sum(row["status"] != "FINISHED" for row in results)
    lines.append(
        f"{len(results) - failed} of {len(results)} months finished" + (f", {failed} failed" if failed else "")
    )
    return "\n".join(lines)


def elsewhere_tracked(results: list[dict[str, Any]], tracking_uri: str) -> list[str]:
    """Warnings for months a worker recorded in another MLflow store than this process's."""
    return [
        f"warning: {row['month']} was recorded in MLflow at {row['tracking_uri']} (the worker's MLFLOW_TRACKING_URI), "
        f"not {tracking_uri}"
        for row in results
        if row.get("tracking_uri") and row["tracking_uri"] != tracking_uri
    ]


def main(argv: list[str] | None = None) -> int:
    stopping.install()  # SIGTERM and Ctrl-C stop every month's notebooks at once (those on Dask workers end with the cluster)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="first", required=True, help="first training month, YYYY-MM")
    parser.add_argument("--to", dest="last", required=True, help="last training month, YYYY-MM")
    parser.add_argument("--color", default="green")
    parser.add_argument("--data-source")
    parser.add_argument("--experiment")
    parser.add_argument(
        "--max-parallel",
        type=int,
        default=DEFAULT_MAX_PARALLEL,
        help="months run at the same time (default 2); with --dask-address the cluster's worker threads decide",
    )
    parser.add_argument("--force", action="store_true", help="rerun every stage of every month")
    parser.add_argument("--tune-trials", type=int, default=0, metavar="N", help="tune each month with N trials first")
    parser.add_argument("--tune-workers", type=int, metavar="N", help="trials at a time (default: the cores)")
    parser.add_argument("--tune-seed", type=int, default=settings.DEFAULT_TUNE_SEED, help="the search's seed")
    console.add_verbose_flag(parser)
    parser.add_argument("--dask", action="store_true", help="run each month in a process of a local Dask cluster")
    parser.add_argument(
        "--dask-address",
        metavar="tcp://HOST:PORT",
        help=f"run the months on the workers of this Dask scheduler (default ${DASK_ADDRESS_ENV} unless --dask)",
    )
    args = parser.parse_args(argv)
    # An explicit --dask (local cluster) wins over an address that only comes from the environment.
    dask_address = args.dask_address or (None if args.dask else os.environ.get(DASK_ADDRESS_ENV) or None)
    try:
        for m in month_range(args.first, args.last):
            PipelineParams.parse(m.year, m.month, args.color)
        tripfiles.check_source_location(tripfiles.trip_source(args.data_source).location)
        task_runner(args.max_parallel, args.dask, dask_address)
        if args.tune_trials < 0 or (args.tune_workers is not None and args.tune_workers < 1):
            raise ValueError("--tune-trials must be 0 or more and --tune-workers at least 1")
        settings.prefect_server_mode()
    except (InvalidParameterError, tripfiles.TripDataError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        if dask_address:
            warning = require_prefect_api(dask_address)
            if warning:
                print(warning, file=sys.stderr)
            threads = check_dask_scheduler(dask_address)
            print(f"Dask scheduler {dask_address}: {threads} worker thread(s), so up to {threads} months at a time")
        with console.one_clear_failure(args.verbose):
            results = run_backfill(
                args.first,
                args.last,
                max_parallel=args.max_parallel,
                dask=args.dask,
                dask_address=dask_address,
                color=args.color,
                data_source=args.data_source,
                experiment=args.experiment,
                force=args.force,
                tune_trials=args.tune_trials,
                tune_workers=args.tune_workers,
                tune_seed=args.tune_seed,
            )
    except (DaskUnavailableError, local_servers.ServiceError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    console.settle_prefect_workers()
    print("\n" + format_table(results))
    for warning in elsewhere_tracked(results, settings.tracking_uri()):
        print(warning, file=sys.stderr)
    return 0 if all(row["status"] == "FINISHED" for row in results) else 1
