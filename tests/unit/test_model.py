"""RMSE and XGBoost training with the reference parameters."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse
import xgboost as xgb

from taxi_duration.modeling.model import NUM_BOOST_ROUND, XGB_PARAMS, predict, rmse, train_booster, training_params


@pytest.fixture(autouse=True)
def one_xgboost_thread():
    # The matrices are tiny; one thread avoids OpenMP spin-waits when the machine is busy.
    with xgb.config_context(nthread=1):
        yield


def test_rmse_on_known_numbers():
    # errors 3 and 4 -> sqrt((9 + 16) / 2)
    assert rmse(np.array([1.0, 2.0]), np.array([4.0, 6.0])) == pytest.approx(np.sqrt(12.5))


def test_rmse_of_perfect_predictions_is_zero():
    assert rmse([5.0, 7.5, 9.0], [5.0, 7.5, 9.0]) == 0.0


def test_rmse_accepts_lists_and_ints_and_returns_python_float():
    value = rmse([0, 0, 0, 0], [2, 2, 2, 2])
    assert value == 2.0
    assert type(value) is float


def test_rmse_shape_mismatch_raises_naming_both_shapes():
    with pytest.raises(ValueError, match=r"\(3,\) targets vs \(2,\) predictions"):
        rmse([1.0, 2.0, 3.0], [1.0, 2.0])


def test_rmse_does_not_broadcast_column_against_row():
    with pytest.raises(ValueError, match="shapes differ"):
        rmse(np.ones((3, 1)), np.ones(3))


def test_rmse_of_no_trips_raises():
    with pytest.raises(ValueError, match="zero trips"):
        rmse([], [])


def test_training_params_are_the_reference_ones():
    params = training_params()
    assert params["max_depth"] == 30
    assert params["learning_rate"] == pytest.approx(0.09585355369315604)
    assert params["objective"] == "reg:squarederror"
    assert params["num_boost_round"] == NUM_BOOST_ROUND == 30
    assert params["early_stopping_rounds"] == 50
    assert {key: params[key] for key in XGB_PARAMS} == XGB_PARAMS


def synthetic_problem(rows: int, seed: int):
    """Sparse one-hot zone pair plus distance; duration depends on both."""
    rng = np.random.default_rng(seed)
    zone = rng.integers(0, 8, rows)
    distance = rng.gamma(2.0, 1.5, rows)
    X = scipy.sparse.csr_matrix(
        (
            np.concatenate([np.ones(rows), distance]),
            (np.concatenate([np.arange(rows), np.arange(rows)]), np.concatenate([zone, np.full(rows, 8)])),
        ),
        shape=(rows, 9),
    )
    y = 3.0 + distance * (2.0 + zone * 0.5) + rng.normal(0, 0.5, rows)
    return X, y


def test_train_booster_beats_predicting_the_mean():
    X_train, y_train = synthetic_problem(400, seed=1)
    X_val, y_val = synthetic_problem(200, seed=2)

    booster = train_booster(X_train, y_train, X_val, y_val)

    assert isinstance(booster, xgb.Booster)
    predictions = predict(booster, X_val)
    assert predictions.shape == y_val.shape
    baseline = rmse(y_val, np.full_like(y_val, y_train.mean()))
    model = rmse(y_val, predictions)
    assert model < 0.5 * baseline, (model, baseline)


def test_train_booster_respects_num_boost_round():
    X_train, y_train = synthetic_problem(100, seed=3)
    X_val, y_val = synthetic_problem(50, seed=4)
    booster = train_booster(X_train, y_train, X_val, y_val, num_boost_round=3)
    assert booster.num_boosted_rounds() == 3


def test_train_booster_is_deterministic():
    X_train, y_train = synthetic_problem(150, seed=5)
    X_val, y_val = synthetic_problem(50, seed=6)
    first = predict(train_booster(X_train, y_train, X_val, y_val, num_boost_round=5), X_val)
    second = predict(train_booster(X_train, y_train, X_val, y_val, num_boost_round=5), X_val)
    np.testing.assert_array_equal(first, second)
