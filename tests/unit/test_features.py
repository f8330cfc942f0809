"""Features: duration, the 1-60 minute window, PU_DO and the DictVectorizer matrices."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.feature_extraction import DictVectorizer

from taxi_duration.data.periods import Month
from taxi_duration.data.synthetic import generate_trips_table
from taxi_duration.data.tripfiles import TripDataError
from taxi_duration.modeling.features import (
    FeatureMatrices,
    build_matrices,
    feature_records,
    in_duration_window,
    prepare_trips,
    trip_duration_minutes,
)

PREFIX = {"green": "lpep", "yellow": "tpep"}
START = pd.Timestamp("2024-01-10 08:00:00")


def trips(color="green", minutes=(10.0,), pu=(132,), do=(236,), distance=None):
    """A tiny raw trip frame: one row per duration, pickup at START."""
    n = len(minutes)
    pu = list(pu) * n if len(pu) == 1 else list(pu)
    do = list(do) * n if len(do) == 1 else list(do)
    return pd.DataFrame(
        {
            f"{PREFIX[color]}_pickup_datetime": [START] * n,
            f"{PREFIX[color]}_dropoff_datetime": [START + pd.Timedelta(minutes=m) for m in minutes],
            "PULocationID": pu,
            "DOLocationID": do,
            "trip_distance": list(distance) if distance is not None else [1.5] * n,
        }
    )


# --- duration and window -----------------------------------------------------------


@pytest.mark.parametrize("color", ["green", "yellow"])
def test_duration_is_dropoff_minus_pickup_in_minutes(color):
    frame = trips(color, minutes=(0.5, 10.0, 61.25))
    assert trip_duration_minutes(frame, color).tolist() == pytest.approx([0.5, 10.0, 61.25])


def test_duration_counts_seconds_not_just_whole_minutes():
    frame = trips()
    frame["lpep_dropoff_datetime"] = START + pd.Timedelta(seconds=90)
    assert trip_duration_minutes(frame, "green").iloc[0] == pytest.approx(1.5)


def test_window_keeps_1_and_60_minutes_inclusive():
    duration = pd.Series([0.999, 1.0, 30.0, 60.0, 60.001, -5.0, np.nan])
    assert in_duration_window(duration).tolist() == [False, True, True, True, False, False, False]


def test_prepare_trips_keeps_exact_boundaries_and_drops_just_outside():
    one_second = 1 / 60
    frame = trips(minutes=(1.0 - one_second, 1.0, 60.0, 60.0 + one_second, -3.0, 25.0), pu=(1, 2, 3, 4, 5, 6))
    prepared = prepare_trips(frame, "green")
    assert prepared["PULocationID"].tolist() == [2, 3, 6]
    assert prepared["duration"].tolist() == pytest.approx([1.0, 60.0, 25.0])


def test_prepare_trips_adds_pu_do_as_underscore_joined_string():
    prepared = prepare_trips(trips(pu=(132,), do=(236,)), "green")
    assert prepared["PU_DO"].tolist() == ["132_236"]
    assert isinstance(prepared["PU_DO"].iloc[0], str)


def test_pu_do_from_float_zone_ids_has_no_decimal_point():
    # Older files and pandas upcasts can hand over zone ids as 132.0.
    prepared = prepare_trips(trips(pu=(132.0,), do=(236.0,)), "green")
    assert prepared["PU_DO"].tolist() == ["132_236"]


@pytest.mark.parametrize("color", ["green", "yellow"])
def test_prepare_trips_uses_the_colours_own_columns(color):
    prepared = prepare_trips(trips(color, minutes=(12.0,)), color)
    assert prepared["duration"].tolist() == [12.0]
    assert f"{PREFIX[color]}_pickup_datetime" in prepared.columns


def test_prepare_trips_does_not_modify_its_input():
    frame = trips(minutes=(0.5, 10.0))
    before = frame.copy()
    prepare_trips(frame, "green")
    pd.testing.assert_frame_equal(frame, before)


def test_green_frame_is_not_accepted_as_yellow():
    with pytest.raises(TripDataError, match="tpep_pickup_datetime"):
        prepare_trips(trips("green"), "yellow")


@pytest.mark.parametrize(
    "column", ["lpep_pickup_datetime", "lpep_dropoff_datetime", "PULocationID", "DOLocationID", "trip_distance"]
)
def test_missing_required_column_raises_naming_it(column):
    frame = trips().drop(columns=[column])
    with pytest.raises(TripDataError) as info:
        prepare_trips(frame, "green")
    assert column in str(info.value)


def test_null_zone_id_still_gives_a_string_pu_do():
    frame = trips(minutes=(10.0, 10.0), pu=(None, 5), do=(7, 7))
    frame["PULocationID"] = frame["PULocationID"].astype("Int64")
    prepared = prepare_trips(frame, "green")
    assert all(isinstance(value, str) for value in prepared["PU_DO"])


# --- old and new TLC dtypes ---------------------------------------------------------


@pytest.mark.parametrize("color", ["green", "yellow"])
def test_old_and_new_tlc_dtypes_give_identical_prepared_frames(color):
    month = Month(2024, 2)
    legacy = generate_trips_table(color, month, 400, seed=11, legacy_dtypes=True)
    current = generate_trips_table(color, month, 400, seed=11, legacy_dtypes=False)
    # The raw tables really do differ in type, or this test would prove nothing.
    assert legacy.schema.field("PULocationID").type != current.schema.field("PULocationID").type
    assert legacy.schema.field("passenger_count").type != current.schema.field("passenger_count").type
    if color == "green":
        assert str(legacy.schema.field("ehail_fee").type) == "null"
        assert str(current.schema.field("ehail_fee").type) == "double"

    old = prepare_trips(legacy.to_pandas(), color)
    new = prepare_trips(current.to_pandas(), color)
    pd.testing.assert_frame_equal(old, new)
    assert len(new) > 300
    assert str(new["PULocationID"].dtype) == "Int64"
    assert str(new["passenger_count"].dtype) == "Float64"


# --- feature records and matrices --------------------------------------------------


def prepared(minutes, pu, do, distance, color="green"):
    return prepare_trips(trips(color, minutes=minutes, pu=pu, do=do, distance=distance), color)


def test_feature_records_are_pu_do_and_distance_only():
    frame = prepared((10.0,), (132,), (236,), (2.5,))
    assert feature_records(frame) == [{"PU_DO": "132_236", "trip_distance": 2.5}]


def test_build_matrices_matches_dictvectorizer_on_to_dict_records():
    train = prepared((5.0, 12.0, 30.0, 45.0), (1, 132, 1, 7), (2, 236, 2, 9), (0.8, 3.1, 1.2, 9.9))
    validation = prepared((20.0, 8.0), (132, 1), (236, 2), (2.0, 0.5))

    matrices = build_matrices(train, validation)

    reference = DictVectorizer()
    ref_train = reference.fit_transform(train[["PU_DO", "trip_distance"]].to_dict(orient="records"))
    ref_val = reference.transform(validation[["PU_DO", "trip_distance"]].to_dict(orient="records"))
    assert matrices.feature_names == list(reference.get_feature_names_out())
    assert matrices.feature_names == ["PU_DO=132_236", "PU_DO=1_2", "PU_DO=7_9", "trip_distance"]
    np.testing.assert_array_equal(matrices.X_train.toarray(), ref_train.toarray())
    np.testing.assert_array_equal(matrices.X_val.toarray(), ref_val.toarray())
    np.testing.assert_array_equal(
        matrices.X_train.toarray(),
        [[0, 1, 0, 0.8], [1, 0, 0, 3.1], [0, 1, 0, 1.2], [0, 0, 1, 9.9]],
    )
    np.testing.assert_array_equal(matrices.y_train, [5.0, 12.0, 30.0, 45.0])
    np.testing.assert_array_equal(matrices.y_val, [20.0, 8.0])
    assert matrices.y_train.dtype == np.float64


def test_build_matrices_returns_csr_and_a_summary():
    train = prepared((5.0, 12.0), (1, 132), (2, 236), (0.8, 3.1))
    validation = prepared((20.0,), (132,), (236,), (2.0,))
    matrices = build_matrices(train, validation)
    assert isinstance(matrices, FeatureMatrices)
    assert matrices.X_train.format == "csr" and matrices.X_val.format == "csr"
    assert matrices.summary() == {"train_rows": 2, "val_rows": 1, "n_features": 3, "train_nnz": 4, "val_nnz": 2}


def test_validation_category_unseen_in_training_is_ignored():
    train = prepared((5.0, 12.0), (1, 132), (2, 236), (0.8, 3.1))
    validation = prepared((20.0,), (99,), (98,), (4.0,))
    matrices = build_matrices(train, validation)
    assert "PU_DO=99_98" not in matrices.feature_names
    assert matrices.X_val.shape == (1, 3)
    np.testing.assert_array_equal(matrices.X_val.toarray(), [[0, 0, 4.0]])


def test_window_filtered_out_trips_do_not_reach_the_matrices():
    train = prepared((0.2, 12.0, 90.0), (1, 132, 7), (2, 236, 9), (0.8, 3.1, 5.0))
    validation = prepared((20.0,), (132,), (236,), (2.0,))
    matrices = build_matrices(train, validation)
    assert matrices.feature_names == ["PU_DO=132_236", "trip_distance"]
    np.testing.assert_array_equal(matrices.y_train, [12.0])


def test_empty_train_raises_value_error():
    empty = prepared((0.2,), (1,), (2,), (0.8,))
    assert empty.empty
    validation = prepared((20.0,), (132,), (236,), (2.0,))
    with pytest.raises(ValueError, match="no training trips"):
        build_matrices(empty, validation)


def test_empty_validation_raises_value_error():
    train = prepared((20.0,), (132,), (236,), (2.0,))
    empty = prepared((75.0,), (1,), (2,), (0.8,))
    with pytest.raises(ValueError, match="no validation trips"):
        build_matrices(train, empty)
