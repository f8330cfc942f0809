"""The fast featurizer gives exactly DictVectorizer's matrices, and a vectorizer that agrees with them."""

from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
import pytest
import scipy.sparse
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sklearn.feature_extraction import DictVectorizer
from sklearn.utils.validation import check_is_fitted

from taxi_duration.data import tripfiles
from taxi_duration.data.periods import Month
from taxi_duration.data.synthetic import generate_trips_table
from taxi_duration.modeling.features import (
    build_matrices,
    feature_records,
    fit_trip_matrix,
    fit_vectorizer,
    prepare_trips,
    trip_matrix,
)
from taxi_duration.runfiles import load_preprocessor, save_preprocessor

START = pd.Timestamp("2023-03-10 08:00:00")
PROPERTY_SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def reference(
    train: pd.DataFrame, validation: pd.DataFrame
) -> tuple[scipy.sparse.spmatrix, scipy.sparse.spmatrix, DictVectorizer]:
    """The recipe being replaced: to_dict records through sklearn's DictVectorizer."""
    vectorizer = DictVectorizer()
    X_train = vectorizer.fit_transform(feature_records(train))
    X_val = vectorizer.transform(feature_records(validation))
    return X_train, X_val, vectorizer


def assert_same_matrix(fast: scipy.sparse.spmatrix, expected: scipy.sparse.spmatrix) -> None:
    """Same class, shape, dtype, stored entries (explicit zeros and NaNs included) and values."""
    assert type(fast) is type(expected)
    assert fast.format == expected.format == "csr"
    assert fast.shape == expected.shape
    assert fast.dtype == expected.dtype == np.float64
    assert fast.nnz == expected.nnz
    assert fast.indices.dtype == expected.indices.dtype
    assert fast.indptr.dtype == expected.indptr.dtype
    fast, expected = fast.copy(), expected.copy()
    fast.sort_indices()
    expected.sort_indices()
    np.testing.assert_array_equal(fast.indptr, expected.indptr)
    np.testing.assert_array_equal(fast.indices, expected.indices)
    # assert_array_equal counts NaN == NaN, so NaN distances must sit in the same places.
    np.testing.assert_array_equal(fast.data, expected.data)
    # `!=` is NaN-blind in the other direction (NaN != NaN), so compare with NaNs zeroed.
    fast.data[np.isnan(fast.data)] = 0.0
    expected.data[np.isnan(expected.data)] = 0.0
    assert (fast != expected).nnz == 0


def assert_like_dictvectorizer(train: pd.DataFrame, validation: pd.DataFrame) -> None:
    X_train, X_val, vectorizer = reference(train, validation)
    matrices = build_matrices(train, validation)
    assert matrices.feature_names == list(vectorizer.get_feature_names_out())
    assert matrices.vectorizer.feature_names_ == vectorizer.feature_names_
    assert matrices.vectorizer.vocabulary_ == vectorizer.vocabulary_
    assert_same_matrix(matrices.X_train, X_train)
    assert_same_matrix(matrices.X_val, X_val)
    # The vectorizer that gets saved transforms records into the very same matrix.
    assert_same_matrix(matrices.vectorizer.transform(feature_records(validation)), matrices.X_val)
    assert_same_matrix(matrices.vectorizer.transform(feature_records(train)), matrices.X_train)


# --- raw trips through prepare_trips ---------------------------------------------------

# Ids whose "PU_DO" text sorts unlike their numbers ("10_1" < "1_10" < "2_3"); None is a null id.
ZONE_IDS = st.sampled_from([1, 2, 3, 10, 100, 132, 236, 265, None])
DISTANCES = st.one_of(
    st.sampled_from([0.0, -0.0, np.nan, 1.0, 0.01]),
    st.floats(min_value=-5, max_value=500, allow_nan=False),
)
# Some outside the 1-60 minute window, so prepare_trips drops them.
MINUTES = st.one_of(st.floats(min_value=1.0, max_value=60.0), st.sampled_from([0.5, 75.0]))
TRIP = st.tuples(ZONE_IDS, ZONE_IDS, DISTANCES, MINUTES)


def raw_trips(rows: list[tuple]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "lpep_pickup_datetime": [START] * len(rows),
            "lpep_dropoff_datetime": [START + pd.Timedelta(minutes=row[3]) for row in rows],
            "PULocationID": pd.array([row[0] for row in rows], dtype="Int64"),
            "DOLocationID": pd.array([row[1] for row in rows], dtype="Int64"),
            "trip_distance": [row[2] for row in rows],
        }
    )


@PROPERTY_SETTINGS
@given(train_rows=st.lists(TRIP, min_size=1, max_size=40), validation_rows=st.lists(TRIP, min_size=1, max_size=40))
def test_prepared_trips_give_dictvectorizers_matrices(train_rows, validation_rows):
    train = prepare_trips(raw_trips(train_rows), "green")
    validation = prepare_trips(raw_trips(validation_rows), "green")
    if train.empty or validation.empty:
        return  # build_matrices refuses these (tested in test_features); nothing to compare
    assert_like_dictvectorizer(train, validation)


# --- PU_DO text of any kind ------------------------------------------------------------

PAIRS = st.one_of(
    st.sampled_from(["10_1", "1_10", "2_3", "1_1", "unknown_7", "7_unknown", "Z_1", "a=b", "_", ""]),
    st.text(max_size=6),
)


def feature_frame(pairs: list[str], distances: list[float]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "PU_DO": pd.Series(pairs, dtype=object),
            "trip_distance": np.asarray(distances, dtype="float64"),
            "duration": np.full(len(pairs), 12.0),
        }
    )


@st.composite
def frames(draw, min_size: int = 1):
    pairs = draw(st.lists(PAIRS, min_size=min_size, max_size=30))
    distances = draw(st.lists(DISTANCES, min_size=len(pairs), max_size=len(pairs)))
    return feature_frame(pairs, distances)


@PROPERTY_SETTINGS
@given(train=frames(), validation=frames())
def test_any_pu_do_text_gives_dictvectorizers_matrices(train, validation):
    assert_like_dictvectorizer(train, validation)


@PROPERTY_SETTINGS
@given(
    train=frames(), unseen=st.lists(st.text(alphabet="0123456789_", min_size=1, max_size=7), min_size=1, max_size=10)
)
def test_validation_pairs_unseen_in_training_are_dropped_like_dictvectorizer(train, unseen):
    unseen = [pair for pair in unseen if pair not in set(train["PU_DO"])] or ["never_seen"]
    validation = feature_frame(unseen + list(train["PU_DO"][:3]), [1.5] * (len(unseen) + min(3, len(train))))
    assert_like_dictvectorizer(train, validation)
    X_val = build_matrices(train, validation).X_val
    # An unseen pair leaves its trip with the distance alone.
    assert X_val.getnnz(axis=1)[: len(unseen)].tolist() == [1] * len(unseen)


# --- named cases -------------------------------------------------------------------------


def test_sort_order_is_text_order_not_appearance_order():
    train = feature_frame(["2_3", "1_10", "10_1", "2_3"], [1.0, 2.0, 3.0, 4.0])
    matrices = build_matrices(train, train)
    assert matrices.feature_names == ["PU_DO=10_1", "PU_DO=1_10", "PU_DO=2_3", "trip_distance"]
    np.testing.assert_array_equal(
        matrices.X_train.toarray(), [[0, 0, 1, 1.0], [0, 1, 0, 2.0], [1, 0, 0, 3.0], [0, 0, 1, 4.0]]
    )
    assert_like_dictvectorizer(train, train)


def test_single_row():
    train = feature_frame(["132_236"], [2.5])
    assert_like_dictvectorizer(train, train)
    assert build_matrices(train, train).summary()["train_nnz"] == 2


def test_zero_distances_are_stored_entries_like_dictvectorizer():
    train = feature_frame(["1_2", "1_2", "3_4"], [0.0, 0.0, 1.0])
    matrices = build_matrices(train, train)
    assert matrices.X_train.nnz == 6  # 3 pairs + 3 distances, two of them stored zeros
    assert_like_dictvectorizer(train, train)


def test_nan_distance_is_stored_as_nan_like_dictvectorizer():
    train = feature_frame(["1_2", "3_4"], [np.nan, 1.0])
    matrices = build_matrices(train, train)
    assert np.isnan(matrices.X_train[0, matrices.vectorizer.vocabulary_["trip_distance"]])
    assert_like_dictvectorizer(train, train)


def test_null_zone_id_becomes_an_unknown_pair_column():
    raw = raw_trips([(None, 5, 1.0, 10.0), (5, None, 2.0, 10.0), (5, 5, 3.0, 10.0)])
    train = prepare_trips(raw, "green")
    matrices = build_matrices(train, train)
    assert matrices.feature_names == ["PU_DO=5_5", "PU_DO=5_unknown", "PU_DO=unknown_5", "trip_distance"]
    assert_like_dictvectorizer(train, train)


def test_a_null_or_non_text_pair_is_refused_naming_the_column():
    with pytest.raises(ValueError, match="PU_DO holds a null"):
        fit_trip_matrix(feature_frame(["1_2", None], [1.0, 2.0]))
    with pytest.raises(ValueError, match="PU_DO holds 7"):
        fit_trip_matrix(pd.DataFrame({"PU_DO": pd.Series(["1_2", 7], dtype=object), "trip_distance": [1.0, 2.0]}))
    with pytest.raises(ValueError, match="trip_distance"):
        fit_trip_matrix(pd.DataFrame({"PU_DO": ["1_2"]}))


def test_a_vectorizer_with_other_features_is_refused():
    other = DictVectorizer().fit([{"PU_DO": "1_2", "trip_distance": 1.0, "fare": 3.0}])
    with pytest.raises(ValueError, match="'fare'"):
        trip_matrix(feature_frame(["1_2"], [1.0]), other)


def test_fitted_vectorizer_passes_sklearns_fitted_check_and_fit_vectorizer_agrees():
    train = feature_frame(["2_3", "1_10", "2_3"], [1.0, 2.0, 3.0])
    _, fast = fit_trip_matrix(train)
    check_is_fitted(fast)
    check_is_fitted(fast, ["feature_names_", "vocabulary_"])
    expected = DictVectorizer().fit(feature_records(train))
    assert fast.get_params() == expected.get_params()
    assert fit_vectorizer(train).vocabulary_ == expected.vocabulary_ == fast.vocabulary_
    assert list(fast.get_feature_names_out()) == list(expected.get_feature_names_out())


def test_saved_vectorizer_transforms_records_like_the_fast_matrix(tmp_path):
    train = feature_frame(["2_3", "1_10", "10_1", "2_3"], [1.0, 0.0, np.nan, 4.0])
    validation = feature_frame(["1_10", "99_99", "2_3"], [0.0, 5.0, np.nan])
    matrices = build_matrices(train, validation)
    path = tmp_path / "preprocessor.b"
    save_preprocessor(path, matrices.vectorizer)
    loaded = load_preprocessor(path)
    assert_same_matrix(loaded.transform(feature_records(validation)), matrices.X_val)
    # The serving path: records (dicts), one at a time too.
    single = loaded.transform(feature_records(validation)[0])
    assert_same_matrix(single, trip_matrix(validation.iloc[:1], matrices.vectorizer))
    # The loaded vectorizer drives the fast path as well.
    assert_same_matrix(trip_matrix(validation, loaded), matrices.X_val)
    assert pickle.loads(pickle.dumps(matrices.vectorizer)).vocabulary_ == matrices.vectorizer.vocabulary_


def test_real_green_2023_03_to_04_matches_dictvectorizer(real_tlc_dir):
    columns = list(tripfiles.required_columns("green"))
    train_path, validation_path = (
        real_tlc_dir / tripfiles.trip_filename("green", month) for month in (Month(2023, 3), Month(2023, 4))
    )
    train = prepare_trips(tripfiles.read_trips(train_path, "green", columns), "green")
    validation = prepare_trips(tripfiles.read_trips(validation_path, "green", columns), "green")
    assert_like_dictvectorizer(train, validation)
    # The reference model's published figures (tests/flow/test_pipeline.py asserts them end to end).
    summary = build_matrices(train, validation).summary()
    assert (summary["train_nnz"], summary["val_nnz"], summary["n_features"]) == (138_784, 122_674, 6_053)


# --- at scale: the training's histogram cache (src/taxi_duration/modeling/model.py) --------------------


def test_hist_cache_nodes_keeps_the_cache_within_its_budget():
    from taxi_duration.modeling.model import HIST_CACHE_BYTES, hist_cache_nodes

    assert hist_cache_nodes(6_053) == HIST_CACHE_BYTES // ((6_053 + 256) * 16)
    assert hist_cache_nodes(60_000) * (60_000 + 256) * 16 <= HIST_CACHE_BYTES
    assert hist_cache_nodes(3) == 65_536  # small problems keep XGBoost's default
    assert hist_cache_nodes(10_000_000) == 256
    with pytest.raises(ValueError, match="n_features"):
        hist_cache_nodes(0)


def test_a_bounded_histogram_cache_trains_the_very_same_model():
    import xgboost as xgb

    from taxi_duration.modeling.model import XGB_PARAMS, train_booster

    frame = generate_trips_table("yellow", Month(2023, 3), 8_000, seed=3).to_pandas()
    trips = prepare_trips(frame, "yellow")
    matrices = build_matrices(trips.iloc[:6_000], trips.iloc[6_000:])
    dtrain = xgb.DMatrix(matrices.X_train, label=matrices.y_train)
    unbounded = xgb.train(XGB_PARAMS, dtrain, num_boost_round=3)
    bounded = xgb.train({**XGB_PARAMS, "max_cached_hist_node": 256}, dtrain, num_boost_round=3)
    # Deep enough trees that 256 cached histograms must evict some, or this proves nothing.
    assert min(len(tree.splitlines()) for tree in unbounded.get_dump()) > 2 * 256
    assert bounded.save_raw() == unbounded.save_raw()
    # train_booster (which sets the bound) gives the model the reference parameters give.
    trained = train_booster(
        matrices.X_train, matrices.y_train, matrices.X_val, matrices.y_val, num_boost_round=3, early_stopping_rounds=50
    )
    reference = xgb.train(
        XGB_PARAMS,
        dtrain,
        num_boost_round=3,
        evals=[(xgb.DMatrix(matrices.X_val, label=matrices.y_val), "validation")],
        early_stopping_rounds=50,
        verbose_eval=False,
    )
    assert trained.save_raw() == reference.save_raw()
