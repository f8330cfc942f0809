"""Benchmark: the column-wise featurizer against to_dict + DictVectorizer, at yellow-taxi scale.

    .venv/bin/python bench/featurizer.py                        # 3.4 million trips a month, 5 repetitions
    .venv/bin/python bench/featurizer.py --rows 100000 --repeat 3   # quick

Two synthetic yellow months (TLC-shaped, from taxi_duration.data.synthetic) are prepared with
prepare_trips, then each step runs both ways on the same frames:

* matrices: `DictVectorizer().fit_transform(records(train))` + `.transform(records(validation))`
  (the reference recipe) against `build_matrices`' path (`fit_trip_matrix` + `trip_matrix`);
* duration: `Series.apply(lambda td: td.total_seconds() / 60)` against `.dt.total_seconds() / 60`.

Times are medians over --repeat runs, the two ways alternating (A B, B A, ...) so drift in
the machine's load hits both alike. Peak memory is measured in one further run of each with
tracemalloc (numpy and pandas report their buffers to it): the most memory allocated at any
moment during the call, above what was allocated before it. The results are checked equal
(the same matrix, entry for entry) before anything is timed.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse
from sklearn.feature_extraction import DictVectorizer

from taxi_duration.data.periods import Month
from taxi_duration.data.synthetic import generate_trips_table
from taxi_duration.data.tripfiles import DROPOFF_COLUMN, PICKUP_COLUMN, normalize_trips
from taxi_duration.modeling.features import (
    feature_records,
    fit_trip_matrix,
    prepare_trips,
    trip_duration_minutes,
    trip_matrix,
)

YELLOW_MONTHLY_TRIPS = 3_400_000
COLOR = "yellow"
TRAIN_MONTH = Month(2023, 3)


@dataclass(frozen=True)
class Comparison:
    step: str
    reference_seconds: list[float]
    fast_seconds: list[float]
    reference_peak_bytes: int
    fast_peak_bytes: int

    def row(self) -> str:
        reference, fast = statistics.median(self.reference_seconds), statistics.median(self.fast_seconds)
        return (
            f"| {self.step} | {reference:.3f} | {fast:.3f} | {reference / fast:.1f}x "
            f"| {_mib(self.reference_peak_bytes)} | {_mib(self.fast_peak_bytes)} |"
        )


def _mib(size: int) -> str:
    return f"{size / 2**20:,.0f}"


def reference_matrices(train: pd.DataFrame, validation: pd.DataFrame) -> tuple[Any, Any]:
    """The recipe the fast path replaces: records, then DictVectorizer."""
    vectorizer = DictVectorizer()
    return vectorizer.fit_transform(feature_records(train)), vectorizer.transform(feature_records(validation))


def fast_matrices(train: pd.DataFrame, validation: pd.DataFrame) -> tuple[Any, Any]:
    """What build_matrices does."""
    X_train, vectorizer = fit_trip_matrix(train)
    return X_train, trip_matrix(validation, vectorizer)


def reference_duration(raw: pd.DataFrame) -> pd.Series:
    return (raw[DROPOFF_COLUMN[COLOR]] - raw[PICKUP_COLUMN[COLOR]]).apply(lambda td: td.total_seconds() / 60)


def fast_duration(raw: pd.DataFrame) -> pd.Series:
    return trip_duration_minutes(raw, COLOR)


def seconds(call: Callable[[], object]) -> float:
    gc.collect()
    started = time.perf_counter()
    result = call()
    elapsed = time.perf_counter() - started
    del result
    return elapsed


def peak_bytes(call: Callable[[], object]) -> int:
    """Most bytes allocated at once during `call`, above the allocations before it."""
    gc.collect()
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        result = call()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    del result
    return peak - before


def compare(step: str, reference: Callable[[], object], fast: Callable[[], object], repeat: int) -> Comparison:
    reference_times: list[float] = []
    fast_times: list[float] = []
    for index in range(repeat):
        order = [(reference, reference_times), (fast, fast_times)]
        for call, times in order if index % 2 == 0 else reversed(order):
            times.append(seconds(call))
        print(
            f"  {step} #{index + 1}: reference {reference_times[-1]:.2f} s, fast {fast_times[-1]:.2f} s",
            file=sys.stderr,
        )
    return Comparison(step, reference_times, fast_times, peak_bytes(reference), peak_bytes(fast))


def assert_same_matrix(fast: scipy.sparse.csr_matrix, reference: scipy.sparse.csr_matrix) -> None:
    """Entry for entry, explicit zeros and NaNs included; a benchmark of a wrong answer is worthless."""
    assert type(fast) is type(reference) and fast.shape == reference.shape and fast.dtype == reference.dtype
    assert fast.nnz == reference.nnz, (fast.nnz, reference.nnz)
    for name in ("indptr", "indices", "data"):
        np.testing.assert_array_equal(getattr(fast, name), getattr(reference, name), err_msg=name)


def synthetic_month(month: Month, rows: int, seed: int) -> pd.DataFrame:
    return normalize_trips(generate_trips_table(COLOR, month, rows, seed).to_pandas(), COLOR)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--rows", type=int, default=YELLOW_MONTHLY_TRIPS, help="trips per month (default: a yellow month)"
    )
    parser.add_argument("--repeat", type=int, default=5, help="timed runs of each way (median reported)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, help="also write the markdown table to this file")
    args = parser.parse_args(argv)
    if args.rows < 1 or args.repeat < 1:
        parser.error("--rows and --repeat must be at least 1")

    print(f"generating two synthetic {COLOR} months of {args.rows:,} trips...", file=sys.stderr)
    raw = synthetic_month(TRAIN_MONTH, args.rows, args.seed)
    train = prepare_trips(raw, COLOR)
    validation = prepare_trips(synthetic_month(TRAIN_MONTH.next(), args.rows, args.seed), COLOR)

    reference_train, reference_val = reference_matrices(train, validation)
    fast_train, fast_val = fast_matrices(train, validation)
    assert_same_matrix(fast_train, reference_train)
    assert_same_matrix(fast_val, reference_val)
    np.testing.assert_array_equal(fast_duration(raw).to_numpy(), reference_duration(raw).to_numpy())
    summary = (
        f"{fast_train.shape[0]:,} train x {fast_train.shape[1]:,} features (nnz {fast_train.nnz:,}), "
        f"{fast_val.shape[0]:,} validation (nnz {fast_val.nnz:,})"
    )
    del reference_train, reference_val, fast_train, fast_val

    comparisons = [
        compare(
            "matrices: to_dict + DictVectorizer vs fit_trip_matrix + trip_matrix",
            lambda: reference_matrices(train, validation),
            lambda: fast_matrices(train, validation),
            args.repeat,
        ),
        compare(
            "duration: apply(total_seconds) vs .dt.total_seconds()",
            lambda: reference_duration(raw),
            lambda: fast_duration(raw),
            args.repeat,
        ),
    ]
    lines = [
        f"Featurizer benchmark: two synthetic {COLOR} months of {args.rows:,} trips each ({len(train):,} and "
        f"{len(validation):,} in the 1-60 minute window); {summary}. Median of {args.repeat} runs; "
        f"peak = most memory allocated at once during the call (tracemalloc). Results checked identical.",
        "",
        "| step | reference (s) | fast (s) | speedup | reference peak (MiB) | fast peak (MiB) |",
        "|---|---:|---:|---:|---:|---:|",
        *(comparison.row() for comparison in comparisons),
    ]
    table = "\n".join(lines)
    print(table)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(table + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
