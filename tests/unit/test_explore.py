"""The month profile 01_explore shows: nulls, the 1-60 window breakdown, busiest zones."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from taxi_duration.data.tripfiles import TripDataError
from taxi_duration.modeling.explore import busiest_zones, duration_filter_breakdown, null_counts, profile_month

START = pd.Timestamp("2024-03-05 12:00")


def raw_trips(minutes, pu, do, color="green"):
    prefix = "lpep" if color == "green" else "tpep"
    return pd.DataFrame(
        {
            f"{prefix}_pickup_datetime": [START] * len(minutes),
            f"{prefix}_dropoff_datetime": [START + pd.Timedelta(minutes=m) for m in minutes],
            "PULocationID": pu,
            "DOLocationID": do,
            "trip_distance": [1.0] * len(minutes),
        }
    )


def test_null_counts_sorted_most_first():
    frame = pd.DataFrame({"a": [1, None, None], "b": [1, 2, 3], "c": [None, 2, 3]})
    counts = null_counts(frame)
    assert counts.to_dict() == {"a": 2, "c": 1, "b": 0}
    assert list(counts.index) == ["a", "c", "b"]


def test_duration_breakdown_counts_each_side_of_the_window():
    duration = pd.Series([0.5, 1.0, 10.0, 60.0, 61.0, 200.0, -2.0, np.nan])
    breakdown = duration_filter_breakdown(duration)
    assert breakdown["rows"] == 8
    assert breakdown["kept"] == 3
    assert breakdown["too_short"] == 2
    assert breakdown["too_long"] == 2
    assert breakdown["unknown_duration"] == 1
    assert breakdown["dropped_share"] == pytest.approx(5 / 8)
    assert breakdown["too_short_share"] == pytest.approx(2 / 8)
    assert breakdown["too_long_share"] == pytest.approx(2 / 8)


def test_duration_breakdown_of_no_trips_has_zero_shares():
    breakdown = duration_filter_breakdown(pd.Series([], dtype="float64"))
    assert breakdown["rows"] == 0 and breakdown["kept"] == 0
    assert breakdown["dropped_share"] == 0.0
    assert breakdown["too_short_share"] == 0.0 and breakdown["too_long_share"] == 0.0


def test_busiest_zones_top_n_with_share_of_all_trips():
    frame = pd.DataFrame({"PULocationID": [7, 7, 7, 3, 3, 9]})
    top = busiest_zones(frame, "PULocationID", top=2)
    assert top["zone"].tolist() == ["7", "3"]
    assert top["name"].tolist() == ["7 Astoria (Queens)", "3 Allerton/Pelham Gardens (Bronx)"]  # TLC's lookup
    assert top["trips"].tolist() == [3, 2]
    assert top["share"].tolist() == pytest.approx([0.5, 2 / 6])


def test_busiest_zones_with_fewer_zones_than_top():
    frame = pd.DataFrame({"DOLocationID": [1, 1, 2]})
    assert len(busiest_zones(frame, "DOLocationID", top=10)) == 2


@pytest.mark.parametrize("color", ["green", "yellow"])
def test_profile_month_headline_figures(color):
    frame = raw_trips([0.5, 10.0, 20.0, 30.0, 90.0], pu=[1, 1, 2, 3, 3], do=[5, 5, 5, 6, 6], color=color)
    profile = profile_month(frame, color)
    assert profile["rows"] == 5
    assert profile["columns"] == 5
    assert profile["duration_median_minutes"] == pytest.approx(20.0)
    assert profile["rows_kept_by_filter"] == 3
    assert profile["share_dropped_by_filter"] == pytest.approx(2 / 5)
    assert profile["distinct_pickup_zones"] == 3
    assert profile["distinct_dropoff_zones"] == 2
    assert 30.0 < profile["duration_p99_minutes"] <= 90.0


def test_profile_of_an_empty_month_has_nan_durations():
    profile = profile_month(raw_trips([], pu=[], do=[]), "green")
    assert profile["rows"] == 0
    assert math.isnan(profile["duration_median_minutes"])
    assert math.isnan(profile["duration_p99_minutes"])


def test_profile_month_names_a_missing_column():
    frame = raw_trips([10.0], pu=[1], do=[2]).drop(columns=["DOLocationID"])
    with pytest.raises(TripDataError, match="DOLocationID"):
        profile_month(frame, "green")
