"""XGBoost training and evaluation with the reference hyper-parameters."""

from __future__ import annotations

from typing import Any

import numpy as np
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


def training_params() -> dict[str, Any]:
    """Everything that defines a training run, as logged to MLflow."""
    return {**XGB_PARAMS, "num_boost_round": NUM_BOOST_ROUND, "early_stopping_rounds": EARLY_STOPPING_ROUNDS}


def train_booster(
    X_train: scipy.sparse.spmatrix,
    y_train: np.ndarray,
    X_val: scipy.sparse.spmatrix,
    y_val: np.ndarray,
    num_boost_round: int = NUM_BOOST_ROUND,
    early_stopping_rounds: int = EARLY_STOPPING_ROUNDS,
) -> xgb.Booster:
    """Train with early stopping on the validation month."""
    train = xgb.DMatrix(X_train, label=y_train)
    validation = xgb.DMatrix(X_val, label=y_val)
    return xgb.train(
        params=XGB_PARAMS,
        dtrain=train,
        num_boost_round=num_boost_round,
        evals=[(validation, "validation")],
        early_stopping_rounds=early_stopping_rounds,
        verbose_eval=False,
    )


def predict(booster: xgb.Booster, X: scipy.sparse.spmatrix) -> np.ndarray:
    return booster.predict(xgb.DMatrix(X))


def rmse(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Root mean squared error in minutes."""
    y_true = np.asarray(y_true, dtype="float64")
    y_pred = np.asarray(y_pred, dtype="float64")
    if y_true.shape != y_pred.shape:
        raise ValueError(f"shapes differ: {y_true.shape} targets vs {y_pred.shape} predictions")
    if y_true.size == 0:
        raise ValueError("cannot compute RMSE of zero trips")
    return float(np.sqrt(np.mean((y_true - y_pred) ** 2)))
