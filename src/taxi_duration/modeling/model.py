"""XGBoost training and evaluation with the reference hyper-parameters."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

# XGBoost is imported where a model is trained or used: the flow only needs the parameters.
if TYPE_CHECKING:
    import scipy.sparse
    import xgboost as xgb

# The course model's tuned parameters; kept exact so results are comparable.
XGB_PARAMS: dict[str, Any] = {
    "learning_rate": 0.09585355369315604,
    "max_depth": 30,
    "min_child_weight": 1.060597050922164,
    "objective": "reg:squarederror",
    "reg_alpha": 0.018060244040060163,
    "reg_lambda": 0.011658731377413597,
    "seed": 42,
}
NUM_BOOST_ROUND = 30
EARLY_STOPPING_ROUNDS = 50

# max_depth 30 grows trees of thousands of nodes, and XGBoost's hist method keeps one gradient
# histogram per node (16 bytes per bin, about one bin per PU_DO column), up to 65,536 nodes by
# default: 7 GB at a million yellow-taxi trips. Bounding the cache costs recomputation only: a
# node whose parent's histogram was evicted has its own built from its rows instead of by
# subtraction (the same sums; predictions and RMSE came out identical in our checks, see
# bench/scale.py and tests/unit/test_featurizer.py).
HIST_CACHE_BYTES = 1 << 30
_HISTOGRAM_BIN_BYTES = 16  # one GradientPairPrecise: two doubles
_MAX_BINS_PER_FEATURE = 256  # XGBoost's max_bin
XGBOOST_DEFAULT_CACHED_NODES = 1 << 16


def training_params(tuned: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Everything that defines a training run, as logged to MLflow: the recipe's, a search's best values over them."""
    recipe = {**XGB_PARAMS, "num_boost_round": NUM_BOOST_ROUND, "early_stopping_rounds": EARLY_STOPPING_ROUNDS}
    unknown = sorted(set(tuned or {}) - set(recipe))
    if unknown:
        raise ValueError(f"tuned parameter(s) {', '.join(unknown)} are no training parameter of the recipe")
    return {**recipe, **(tuned or {})}


def hist_cache_nodes(n_features: int, budget_bytes: int = HIST_CACHE_BYTES) -> int:
    """XGBoost's `max_cached_hist_node` that keeps the histogram cache within `budget_bytes`.

    Allows one bin per feature plus 256 for trip_distance (a one-hot column has one or two),
    so the real cache is at most that; never more nodes than XGBoost's default, never fewer
    than 256.
    """
    if n_features < 1:
        raise ValueError(f"n_features must be at least 1, got {n_features}")
    bins = n_features + _MAX_BINS_PER_FEATURE
    return int(min(XGBOOST_DEFAULT_CACHED_NODES, max(256, budget_bytes // (bins * _HISTOGRAM_BIN_BYTES))))


def train_booster(
    X_train: scipy.sparse.spmatrix,
    y_train: np.ndarray,
    X_val: scipy.sparse.spmatrix,
    y_val: np.ndarray,
    num_boost_round: int = NUM_BOOST_ROUND,
    early_stopping_rounds: int = EARLY_STOPPING_ROUNDS,
    params: dict[str, Any] | None = None,
) -> xgb.Booster:
    """Train with early stopping on the validation month; `params` override XGB_PARAMS (a tuned trial's, nthread)."""
    import xgboost as xgb

    train = xgb.DMatrix(X_train, label=y_train)
    validation = xgb.DMatrix(X_val, label=y_val)
    return xgb.train(
        # Not one of the logged training params: it bounds memory, it does not shape the model.
        params={**XGB_PARAMS, **(params or {}), "max_cached_hist_node": hist_cache_nodes(X_train.shape[1])},
        dtrain=train,
        num_boost_round=num_boost_round,
        evals=[(validation, "validation")],
        early_stopping_rounds=early_stopping_rounds,
        verbose_eval=False,
    )


def predict(booster: xgb.Booster, X: scipy.sparse.spmatrix) -> np.ndarray:
    import xgboost as xgb

    # The trees up to the best iteration, as the scikit-learn wrapper the servable model holds
    # (taxi_duration.serving) predicts; a booster trained without early stopping uses them all.
    try:
        iteration_range = (0, booster.best_iteration + 1)
    except AttributeError:
        iteration_range = (0, 0)
    return booster.predict(xgb.DMatrix(X), iteration_range=iteration_range)


def rmse(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Root mean squared error in minutes."""
    y_true = np.asarray(y_true, dtype="float64")
    y_pred = np.asarray(y_pred, dtype="float64")
    if y_true.shape != y_pred.shape:
        raise ValueError(f"shapes differ: {y_true.shape} targets vs {y_pred.shape} predictions")
    if y_true.size == 0:
        raise ValueError("cannot compute RMSE of zero trips")
    return float(np.sqrt(np.mean((y_true - y_pred) ** 2)))


DISTANCE_BUCKETS_MILES = (0, 1, 2, 3, 5, 8, 12, 20, float("inf"))


def error_by_distance(distance: np.ndarray, actual: np.ndarray, predicted: np.ndarray) -> pd.DataFrame:
    """RMSE and mean error per trip-distance bucket: where the model is weak."""
    frame = pd.DataFrame({"distance": distance, "error": np.asarray(predicted) - np.asarray(actual)})
    frame["bucket"] = pd.cut(frame["distance"], DISTANCE_BUCKETS_MILES, right=False)
    grouped = frame.groupby("bucket", observed=True)["error"]
    return pd.DataFrame(
        {
            "trips": grouped.size(),
            "rmse": grouped.apply(lambda errors: float(np.sqrt(np.mean(errors**2)))),
            "mean_error": grouped.mean(),
        }
    ).rename_axis("miles")


def error_by_distance_records(by_distance: pd.DataFrame) -> list[dict[str, object]]:
    """`error_by_distance` rows as JSON-ready records ('miles' the bucket's label), for the manifest."""
    columns = zip(by_distance.index, by_distance["trips"], by_distance["rmse"], by_distance["mean_error"], strict=True)
    return [
        {"miles": str(bucket), "trips": int(trips), "rmse": float(rmse), "mean_error": float(mean_error)}
        for bucket, trips, rmse, mean_error in columns
    ]


def feature_importances(booster: xgb.Booster, feature_names: list[str], top: int = 15) -> pd.DataFrame:
    """The `top` features by total gain, with their names from the preprocessor."""
    gains = booster.get_score(importance_type="total_gain")
    rows = [
        (feature_names[int(key.removeprefix("f"))] if key.startswith("f") else key, gain) for key, gain in gains.items()
    ]
    frame = pd.DataFrame(rows, columns=["feature", "total_gain"]).sort_values("total_gain", ascending=False)
    frame["share"] = frame["total_gain"] / frame["total_gain"].sum() if len(frame) else []
    return frame.head(top).reset_index(drop=True)
