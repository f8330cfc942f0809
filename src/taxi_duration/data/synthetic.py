"""Generate TLC-shaped trip files for tests, demos and benchmarks.

The files have TLC's column names, order and types for either colour, realistic-looking
values (skewed zone popularity, distance-driven durations, a few percent of trips outside
the 1-60 minute window, some nulls) and any number of rows. `legacy_dtypes=True` writes
the types of TLC's older files (int64 zone ids, double counts) so tests cover both.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from taxi_duration.data.periods import COLORS, Month
from taxi_duration.data.tripfiles import trip_filename

N_ZONES = 265


def _columns(color: str) -> list[str]:
    prefix = "lpep" if color == "green" else "tpep"
    if color == "green":
        return [
            "VendorID",
            f"{prefix}_pickup_datetime",
            f"{prefix}_dropoff_datetime",
            "store_and_fwd_flag",
            "RatecodeID",
            "PULocationID",
            "DOLocationID",
            "passenger_count",
            "trip_distance",
            "fare_amount",
            "extra",
            "mta_tax",
            "tip_amount",
            "tolls_amount",
            "ehail_fee",
            "improvement_surcharge",
            "total_amount",
            "payment_type",
            "trip_type",
            "congestion_surcharge",
        ]
    return [
        "VendorID",
        f"{prefix}_pickup_datetime",
        f"{prefix}_dropoff_datetime",
        "passenger_count",
        "trip_distance",
        "RatecodeID",
        "store_and_fwd_flag",
        "PULocationID",
        "DOLocationID",
        "payment_type",
        "fare_amount",
        "extra",
        "mta_tax",
        "tip_amount",
        "tolls_amount",
        "improvement_surcharge",
        "total_amount",
        "congestion_surcharge",
        "airport_fee",
    ]


def generate_trips_table(color: str, month: Month, rows: int, seed: int = 0, legacy_dtypes: bool = False) -> pa.Table:
    """A table of `rows` synthetic trips with pickups inside `month`."""
    if color not in COLORS:
        raise ValueError(f"color must be one of {COLORS}, got {color!r}")
    if rows < 0:
        raise ValueError(f"rows must be >= 0, got {rows}")
    rng = np.random.default_rng([seed, month.year, month.month, COLORS.index(color)])
    prefix = "lpep" if color == "green" else "tpep"

    start = np.datetime64(f"{month.label()}-01T00:00:00", "us")
    end = np.datetime64(f"{month.next().label()}-01T00:00:00", "us")
    span_us = int((end - start) / np.timedelta64(1, "us"))
    pickup = start + rng.integers(0, span_us, rows).astype("timedelta64[us]")

    # Zipf-like popularity so a few zones dominate, as in the real data.
    weights = 1.0 / np.arange(1, N_ZONES + 1) ** 1.1
    weights /= weights.sum()
    zone_order = rng.permutation(N_ZONES) + 1
    pu = zone_order[rng.choice(N_ZONES, rows, p=weights)]
    do = zone_order[rng.choice(N_ZONES, rows, p=weights)]

    distance = np.round(rng.gamma(1.6, 1.8, rows), 2)
    distance[rng.random(rows) < 0.01] = 0.0
    pace = 2.0 + (pu % 7) * 0.35 + (do % 5) * 0.3  # minutes per mile depends on the zone pair
    minutes = 2.0 + distance * pace + rng.normal(0, 2.5, rows)
    outliers = rng.random(rows)
    minutes[outliers < 0.02] = rng.uniform(-1, 1, (outliers < 0.02).sum())  # too short / clock errors
    minutes[outliers > 0.985] = rng.uniform(61, 600, (outliers > 0.985).sum())  # too long
    dropoff = pickup + (minutes * 60e6).astype("int64").astype("timedelta64[us]")

    fare = np.round(3.0 + 2.5 * distance + 0.5 * np.clip(minutes, 0, None), 2)
    tip = np.round(fare * rng.choice([0, 0.15, 0.2], rows), 2)
    missing_meta = rng.random(rows) < 0.03  # TLC leaves these null for some trips

    id_type = pa.int64() if legacy_dtypes else pa.int32()
    count_type = pa.float64() if legacy_dtypes else pa.int64()

    def counts(values: np.ndarray) -> pa.Array:
        return pa.array(values, type=count_type, mask=missing_meta)

    data = {
        "VendorID": pa.array(rng.choice([1, 2], rows), type=id_type),
        f"{prefix}_pickup_datetime": pa.array(pickup, type=pa.timestamp("us")),
        f"{prefix}_dropoff_datetime": pa.array(dropoff, type=pa.timestamp("us")),
        "store_and_fwd_flag": pa.array(
            np.where(rng.random(rows) < 0.01, "Y", "N"),
            mask=missing_meta,
            type=pa.string() if legacy_dtypes else pa.large_string(),
        ),
        "RatecodeID": counts(rng.choice([1, 1, 1, 1, 5], rows)),
        "PULocationID": pa.array(pu, type=id_type),
        "DOLocationID": pa.array(do, type=id_type),
        "passenger_count": counts(rng.choice([1, 1, 1, 2, 3, 5], rows)),
        "trip_distance": pa.array(distance, type=pa.float64()),
        "fare_amount": pa.array(fare),
        "extra": pa.array(rng.choice([0.0, 0.5, 1.0, 2.5], rows)),
        "mta_tax": pa.array(np.full(rows, 0.5)),
        "tip_amount": pa.array(tip),
        "tolls_amount": pa.array(np.where(rng.random(rows) < 0.03, 6.55, 0.0)),
        "ehail_fee": pa.nulls(rows, type=pa.null() if legacy_dtypes else pa.float64()),
        "improvement_surcharge": pa.array(np.full(rows, 1.0)),
        "total_amount": pa.array(np.round(fare + tip + 1.5, 2)),
        "payment_type": counts(rng.choice([1, 1, 2, 3], rows)),
        "trip_type": counts(rng.choice([1, 1, 1, 2], rows)),
        "congestion_surcharge": pa.array(np.where(rng.random(rows) < 0.2, 2.75, 0.0)),
        "airport_fee": pa.array(np.where(rng.random(rows) < 0.05, 1.75, 0.0)),
    }
    return pa.table({name: data[name] for name in _columns(color)})


def write_trip_file(
    folder: Path, color: str, month: Month, rows: int, seed: int = 0, legacy_dtypes: bool = False
) -> Path:
    """Write `{color}_tripdata_{YYYY-MM}.parquet` into `folder` atomically; return its path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / trip_filename(color, month)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.part")
    pq.write_table(generate_trips_table(color, month, rows, seed, legacy_dtypes), temporary)
    os.replace(temporary, path)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write synthetic TLC-shaped trip files.")
    parser.add_argument("folder", type=Path)
    parser.add_argument("--color", choices=COLORS, default="green")
    parser.add_argument("--from", dest="first", required=True, help="first month, YYYY-MM")
    parser.add_argument("--to", dest="last", help="last month, YYYY-MM (default: --from)")
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    month = Month(*map(int, args.first.split("-")))
    last = Month(*map(int, (args.last or args.first).split("-")))
    while month <= last:
        print(write_trip_file(args.folder, args.color, month, args.rows, args.seed))
        month = month.next()


if __name__ == "__main__":
    main()
