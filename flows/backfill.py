"""Backfill: the pipeline once per month over a range, a bounded number at a time.

    python flows/backfill.py --from 2023-01 --to 2023-04 [--color green] [--data-source URL|DIR]
                             [--experiment NAME] [--max-parallel 2] [--force]

Each month is one run of the pipeline flow (a subflow here), with its own MLflow run and run
folder. Months whose stages are unchanged since an earlier run reuse them, so repeating a
backfill costs seconds. Exits non-zero if any month failed; the others still run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # flows/ is a folder of scripts, not a package

from taxi_duration import settings  # noqa: E402

settings.apply_environment_defaults()

from prefect import flow, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.task_runners import ThreadPoolTaskRunner  # noqa: E402

from pipeline import taxi_duration_pipeline  # noqa: E402
from taxi_duration import data  # noqa: E402
from taxi_duration.periods import InvalidParameterError, PipelineParams, month_range  # noqa: E402

DEFAULT_MAX_PARALLEL = 2


@task(name="backfill-month", task_run_name="{color}-{label}", cache_policy=NO_CACHE)
def run_month(
    label: str, year: int, month: int, color: str, data_source: str | None, experiment: str | None, force: bool
) -> dict[str, Any]:
    """One month's pipeline; a failure is reported in the result, not raised, so others go on."""
    try:
        result = taxi_duration_pipeline(
            year=year, month=month, color=color, data_source=data_source, experiment=experiment, force=force
        )
    except Exception as error:  # noqa: BLE001 - one month's failure must not stop the backfill
        return {"month": label, "status": "FAILED", "rmse": None, "reused": [], "mlflow_run_id": None, "error": str(error)}
    return {
        "month": label,
        "status": "FINISHED",
        "rmse": result["rmse"],
        "reused": list(result["reused_stages"]),
        "mlflow_run_id": result["mlflow_run_id"],
        "error": None,
    }


@flow(name="nyc-taxi-duration-backfill", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=DEFAULT_MAX_PARALLEL))
def backfill(
    first: str,
    last: str,
    color: str = "green",
    data_source: str | None = None,
    experiment: str | None = None,
    force: bool = False,
) -> list[dict[str, Any]]:
    """Run the pipeline for every month from `first` to `last` (YYYY-MM, inclusive)."""
    months = [PipelineParams.parse(m.year, m.month, color) for m in month_range(first, last)]
    futures = [
        run_month.submit(p.train_month.label(), p.year, p.month, p.color, data_source, experiment, force)
        for p in months
    ]
    return [future.result() for future in futures]


def run_backfill(first: str, last: str, max_parallel: int = DEFAULT_MAX_PARALLEL, **options: Any) -> list[dict[str, Any]]:
    """`backfill` with `max_parallel` months at a time."""
    if max_parallel < 1:
        raise InvalidParameterError(f"--max-parallel must be at least 1, got {max_parallel}")
    runner = ThreadPoolTaskRunner(max_workers=max_parallel)
    return backfill.with_options(task_runner=runner)(first=first, last=last, **options)


def format_table(results: list[dict[str, Any]]) -> str:
    lines = [f"{'month':<8} {'status':<9} {'RMSE':>7}  {'reused stages':<36} MLflow run / error"]
    for row in results:
        rmse = "" if row["rmse"] is None else f"{row['rmse']:.3f}"
        reused = ", ".join(row["reused"]) or "-"
        tail = row["mlflow_run_id"] if row["status"] == "FINISHED" else row["error"]
        lines.append(f"{row['month']:<8} {row['status']:<9} {rmse:>7}  {reused:<36} {tail}")
    failed = sum(row["status"] != "FINISHED" for row in results)
    lines.append(f"{len(results) - failed} of {len(results)} months finished" + (f", {failed} failed" if failed else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="first", required=True, help="first training month, YYYY-MM")
    parser.add_argument("--to", dest="last", required=True, help="last training month, YYYY-MM")
    parser.add_argument("--color", default="green")
    parser.add_argument("--data-source")
    parser.add_argument("--experiment")
    parser.add_argument("--max-parallel", type=int, default=DEFAULT_MAX_PARALLEL, help="months run at the same time (default 2)")
    parser.add_argument("--force", action="store_true", help="rerun every stage of every month")
    args = parser.parse_args(argv)
    try:
        for m in month_range(args.first, args.last):
            PipelineParams.parse(m.year, m.month, args.color)
        data.check_source_location(data.trip_source(args.data_source).location)
        if args.max_parallel < 1:
            raise InvalidParameterError(f"--max-parallel must be at least 1, got {args.max_parallel}")
    except (InvalidParameterError, data.TripDataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    results = run_backfill(
        args.first, args.last, max_parallel=args.max_parallel,
        color=args.color, data_source=args.data_source, experiment=args.experiment, force=args.force,
    )
    print("\n" + format_table(results))
    return 0 if all(row["status"] == "FINISHED" for row in results) else 1


if __name__ == "__main__":
    sys.exit(main())
