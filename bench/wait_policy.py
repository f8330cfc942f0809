"""Benchmark: trainings that share the cores, with OpenMP's idle threads spinning (its default) or asleep.

    .venv/bin/python bench/wait_policy.py                    # 2 trainings at once, 3 repetitions
    .venv/bin/python bench/wait_policy.py --side-by-side 1   # one training alone

Why settings.ENVIRONMENT_DEFAULTS sets OMP_WAIT_POLICY=PASSIVE: a backfill's months train side
by side, and the test suite runs pipelines on both of a 2-core machine's cores. Each run here
starts --side-by-side processes at once; each trains model.train_booster on the matrices of
two synthetic green months (build_matrices on taxi_duration.data.synthetic trips, --rows a month),
with the libraries' own thread count, under one wait policy. Times are each training's own,
medians over --repeat rounds, the policies alternating (A B, B A, ...) so drift in the
machine's load hits both alike. The boosters are checked equal across policies: the policy
decides when threads wait, not what they compute.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

UNSET = "unset (OpenMP spins a while)"
POLICIES = (UNSET, "PASSIVE")

TRAINING = """
import json, sys, time
from pathlib import Path
from taxi_duration.data import tripfiles
from taxi_duration.modeling import features, model
train, validation = (features.prepare_trips(data.read_trips(Path(sys.argv[1]) / f"green_tripdata_2023-0{m}.parquet", "green"), "green")
                     for m in (2, 3))
matrices = features.build_matrices(train, validation)
started = time.perf_counter()
booster = model.train_booster(matrices.X_train, matrices.y_train, matrices.X_val, matrices.y_val)
seconds = time.perf_counter() - started
print(json.dumps({"seconds": seconds, "trees": booster.num_boosted_rounds(),
                  "rmse": model.rmse(matrices.y_val, model.predict(booster, matrices.X_val))}))
"""


def write_months(folder: Path, rows: int) -> None:
    from taxi_duration.data.periods import Month
    from taxi_duration.data.synthetic import write_trip_file

    for month in (Month(2023, 2), Month(2023, 3)):
        write_trip_file(folder, "green", month, rows, seed=7)


def trainings_at_once(folder: Path, policy: str, count: int) -> list[dict]:
    environment = {key: value for key, value in os.environ.items() if key != "OMP_WAIT_POLICY"}
    if policy != UNSET:
        environment["OMP_WAIT_POLICY"] = policy
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", TRAINING, str(folder)],
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(count)
    ]
    results = []
    for process in processes:
        stdout, stderr = process.communicate()
        if process.returncode != 0:
            raise SystemExit(f"a training under OMP_WAIT_POLICY={policy} failed:\n{stderr[-2000:]}")
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rows", type=int, default=3000, help="synthetic trips a month (default 3000, the test suite's size)"
    )
    parser.add_argument("--side-by-side", type=int, default=2, help="trainings started at once (default 2)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds per policy (default 3)")
    args = parser.parse_args(argv)
    if min(args.rows, args.side_by_side, args.repeat) < 1:
        parser.error("--rows, --side-by-side and --repeat must be at least 1")

    times: dict[str, list[float]] = {policy: [] for policy in POLICIES}
    models: dict[str, set[tuple[int, float]]] = {policy: set() for policy in POLICIES}
    with tempfile.TemporaryDirectory(prefix="taxi-wait-policy-") as folder:
        write_months(Path(folder), args.rows)
        for round_number in range(args.repeat):
            order = POLICIES if round_number % 2 == 0 else POLICIES[::-1]
            for policy in order:
                for result in trainings_at_once(Path(folder), policy, args.side_by_side):
                    times[policy].append(result["seconds"])
                    models[policy].add((result["trees"], round(result["rmse"], 9)))
    if models[UNSET] != models["PASSIVE"]:
        raise SystemExit(f"the policies trained different models: {models}")

    median = {policy: statistics.median(seconds) for policy, seconds in times.items()}
    print(
        f"{args.side_by_side} training(s) at once on {os.cpu_count()} cores, {args.rows:,} synthetic trips a month, "
        f"{args.repeat} round(s) each; the same model under both policies ({sorted(models['PASSIVE'])})"
    )
    print("| OMP_WAIT_POLICY | median s | min | max |")
    print("|---|---|---|---|")
    for policy in POLICIES:
        print(f"| {policy} | {median[policy]:.1f} | {min(times[policy]):.1f} | {max(times[policy]):.1f} |")
    print(f"PASSIVE: {median['PASSIVE'] / median[UNSET]:.2f}x the time with OMP_WAIT_POLICY unset")
    return 0


if __name__ == "__main__":
    sys.exit(main())
