"""Synthetic TLC-shaped trip files: TLC's columns, the requested size, realistic durations."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from taxi_duration.data.periods import Month
from taxi_duration.data.synthetic import generate_trips_table, main, write_trip_file
from taxi_duration.data.tripfiles import validate_trip_file

GREEN_COLUMNS = [
    "VendorID",
    "lpep_pickup_datetime",
    "lpep_dropoff_datetime",
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
YELLOW_COLUMNS = [
    "VendorID",
    "tpep_pickup_datetime",
    "tpep_dropoff_datetime",
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
PREFIX = {"green": "lpep", "yellow": "tpep"}


def test_green_has_tlc_columns_in_order():
    table = generate_trips_table("green", Month(2024, 1), 5)
    assert len(GREEN_COLUMNS) == 20
    assert table.column_names == GREEN_COLUMNS


def test_yellow_has_tlc_columns_in_order():
    table = generate_trips_table("yellow", Month(2024, 1), 5)
    assert table.column_names == YELLOW_COLUMNS
    assert "airport_fee" in table.column_names and "ehail_fee" not in table.column_names


@pytest.mark.parametrize("rows", [0, 1, 777])
def test_exact_row_count(rows):
    assert generate_trips_table("green", Month(2024, 1), rows).num_rows == rows


def test_negative_rows_and_unknown_colour_are_rejected():
    with pytest.raises(ValueError, match="rows must be >= 0"):
        generate_trips_table("green", Month(2024, 1), -1)
    with pytest.raises(ValueError, match="purple"):
        generate_trips_table("purple", Month(2024, 1), 5)


@pytest.mark.parametrize(("color", "month"), [("green", Month(2024, 2)), ("yellow", Month(2023, 12))])
def test_pickups_fall_within_the_month(color, month):
    table = generate_trips_table(color, month, 3000, seed=4)
    pickup = table.column(f"{PREFIX[color]}_pickup_datetime").to_numpy()
    start = np.datetime64(f"{month.label()}-01T00:00:00", "us")
    end = np.datetime64(f"{month.next().label()}-01T00:00:00", "us")
    assert pickup.min() >= start
    assert pickup.max() < end
    # spread over the month, not bunched on the first day
    assert pickup.max() - pickup.min() > np.timedelta64(20, "D")


def test_same_seed_gives_the_same_table_and_another_seed_does_not():
    month = Month(2024, 5)
    first = generate_trips_table("green", month, 300, seed=9)
    again = generate_trips_table("green", month, 300, seed=9)
    other = generate_trips_table("green", month, 300, seed=10)
    assert first.equals(again)
    assert not first.equals(other)


def test_legacy_flag_changes_types_not_values():
    month = Month(2024, 5)
    legacy = generate_trips_table("green", month, 200, seed=2, legacy_dtypes=True)
    current = generate_trips_table("green", month, 200, seed=2, legacy_dtypes=False)
    assert legacy.schema.field("PULocationID").type == pa.int64()
    assert current.schema.field("PULocationID").type == pa.int32()
    assert legacy.schema.field("passenger_count").type == pa.float64()
    assert current.schema.field("passenger_count").type == pa.int64()
    assert legacy.schema.field("ehail_fee").type == pa.null()
    assert current.schema.field("ehail_fee").type == pa.float64()
    assert legacy.column("PULocationID").to_pylist() == current.column("PULocationID").to_pylist()
    assert legacy.column("passenger_count").to_pylist() == [
        None if v is None else float(v) for v in current.column("passenger_count").to_pylist()
    ]


@pytest.mark.parametrize("color", ["green", "yellow"])
def test_some_trips_fall_outside_the_1_to_60_minute_window(color):
    table = generate_trips_table(color, Month(2024, 3), 3000, seed=0)
    prefix = PREFIX[color]
    seconds = pc.divide(
        pc.cast(
            pc.subtract(table.column(f"{prefix}_dropoff_datetime"), table.column(f"{prefix}_pickup_datetime")),
            pa.int64(),
        ),
        1e6,
    ).to_numpy()
    minutes = seconds / 60
    too_short = (minutes < 1).mean()
    too_long = (minutes > 60).mean()
    assert 0 < too_short < 0.2
    assert 0 < too_long < 0.2
    assert ((minutes >= 1) & (minutes <= 60)).mean() > 0.8


def test_zone_ids_are_tlc_zone_numbers():
    table = generate_trips_table("green", Month(2024, 3), 2000)
    for column in ("PULocationID", "DOLocationID"):
        values = table.column(column).to_numpy()
        assert values.min() >= 1 and values.max() <= 265


def test_write_trip_file_writes_a_valid_tlc_named_file(tmp_path):
    path = write_trip_file(tmp_path / "tlc", "yellow", Month(2024, 12), 42, seed=3)
    assert path == tmp_path / "tlc" / "yellow_tripdata_2024-12.parquet"
    assert validate_trip_file(path, "yellow") == 42
    assert pq.read_table(path).equals(generate_trips_table("yellow", Month(2024, 12), 42, seed=3))
    assert sorted(p.name for p in (tmp_path / "tlc").iterdir()) == [path.name]


def test_cli_writes_a_range_of_months_across_the_year_end(tmp_path, capsys):
    main([str(tmp_path), "--color", "green", "--from", "2023-11", "--to", "2024-01", "--rows", "5"])
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        "green_tripdata_2023-11.parquet",
        "green_tripdata_2023-12.parquet",
        "green_tripdata_2024-01.parquet",
    ]
    assert capsys.readouterr().out.count(".parquet") == 3
