"""Benchmark: the same hyperparameter search trials sequentially, in local worker processes and on a local Dask cluster.

    .venv/bin/python bench/tuning.py                 # 16 trials, real green 2023-03
    .venv/bin/python bench/tuning.py --trials 8 --workers 2

Needs the real green-taxi files for 2023-03 and 2023-04 in ../shared/data/tlc (or --data-dir);
without them it says so and exits 0. The training month's matrices are built as 02_features
builds them (features.prepare_trips, build_matrices) and its last 7 days held out
(tuning.search_data). The sequential search runs first, in this process on all the cores; the
two parallel ones then run exactly its trials (the recipe first, the rest handed over as
first_trials), `--workers` at a time, each trial on cores // workers threads. Times are wall
clock from the call to run_search to its return: start-up of the worker processes or the
cluster included. No MLflow: the bench measures the trials, not their logging.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from taxi_duration import settings
from taxi_duration.data import tripfiles
from taxi_duration.modeling import features, tuning

PROJECT_DIR = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = PROJECT_DIR.parent / "shared" / "data" / "tlc"


def load_search_data(data_dir: Path) -> tuning.SearchData | None:
    paths = [data_dir / f"green_tripdata_2023-0{month}.parquet" for month in (3, 4)]
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        print(f"skipped: real TLC files not present ({', '.join(missing)})")
        return None
    columns = list(tripfiles.required_columns("green"))
    train, validation = (
        features.prepare_trips(tripfiles.read_trips(path, "green", columns), "green") for path in paths
    )
    train = train.reset_index(drop=True)
    matrices = features.build_matrices(train, validation)
    return tuning.search_data(matrices, train[tripfiles.PICKUP_COLUMN["green"]], pd.Timestamp("2023-04-01"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--workers", type=int, default=tuning.local_cores())
    parser.add_argument("--seed", type=int, default=tuning.DEFAULT_SEED)
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    args = parser.parse_args(argv)
    settings.apply_environment_defaults()  # OMP_WAIT_POLICY=PASSIVE, as the pipeline's processes have it
    search_data = load_search_data(args.data_dir)
    if search_data is None:
        return 0
    sizes = search_data.summary()
    print(
        f"green 2023-03: {sizes['fit_rows']:,} trips to fit, {sizes['holdout_rows']:,} held out (last 7 days); "
        f"{args.trials} trials, {args.workers} workers, {tuning.local_cores()} cores, seed {args.seed}"
    )
    rows = []
    trials: list[dict] = []
    for label, options in (
        ("sequential", {"workers": 1}),
        ("local processes", {"workers": args.workers}),
        ("local Dask cluster", {"workers": args.workers, "dask": True}),
    ):
        started = time.perf_counter()
        result = tuning.run_search(search_data, args.trials, seed=args.seed, first_trials=trials, **options)
        seconds = time.perf_counter() - started
        if not trials:
            trials = [trial.params for trial in result.trials[1:]]
        assert [t.params for t in result.trials[1:]] == trials, "the parallel search ran other trials"
        trial_seconds = sum(t.duration_seconds for t in result.trials)
        rows.append((label, seconds, trial_seconds, result))
        print(f"  {label}: {seconds:.1f} s ({result.engine})", flush=True)

    base = rows[0][1]
    print()
    print(
        "| how | wall s | trials per minute | speed-up | sum of trial times s | failed | best hold-out RMSE | recipe's |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, seconds, trial_seconds, result in rows:
        failed = len(result.trials) - len(result.finished)
        print(
            f"| {label} | {seconds:.1f} | {60 * len(result.trials) / seconds:.2f} | {base / seconds:.2f}x | "
            f"{trial_seconds:.1f} | {failed} | {result.best.holdout_rmse:.4f} | {result.recipe.holdout_rmse:.4f} |"
        )
    best = rows[0][3].best
    print(f"\nbest trial {best.number}: " + ", ".join(f"{k}={v:.4g}" for k, v in best.params.items()))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=PROJECT_DIR)
    load = " ".join(f"{value:.2f}" for value in os.getloadavg())
    print(f"python {platform.python_version()}, commit {commit.stdout.strip()}, load average at the end {load}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
