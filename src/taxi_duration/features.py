"""The reference recipe's features: trip duration, the 1-60 minute window, PU_DO, DictVectorizer.

Matches the well-known course model exactly: duration = dropoff - pickup in minutes,
keep 1 <= duration <= 60, `PU_DO` = pickup and dropoff zone ids joined by "_" (strings,
so categorical), and `trip_distance` as the one numeric feature.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse
from sklearn.feature_extraction import DictVectorizer

from taxi_duration.data import DISTANCE_COLUMN, DROPOFF_COLUMN, PICKUP_COLUMN, normalize_trips

MIN_DURATION_MINUTES = 1.0
MAX_DURATION_MINUTES = 60.0
CATEGORICAL_FEATURES = ["PU_DO"]
NUMERICAL_FEATURES = [DISTANCE_COLUMN]
TARGET = "duration"


def trip_duration_minutes(frame: pd.DataFrame, color: str) -> pd.Series:
    """Dropoff minus pickup in minutes (vectorized: no per-row Python)."""
    return (frame[DROPOFF_COLUMN[color]] - frame[PICKUP_COLUMN[color]]).dt.total_seconds() / 60.0


def in_duration_window(duration: pd.Series) -> pd.Series:
    """True for trips the model learns from: 1 <= duration <= 60 minutes."""
    return (duration >= MIN_DURATION_MINUTES) & (duration <= MAX_DURATION_MINUTES)


def prepare_trips(frame: pd.DataFrame, color: str) -> pd.DataFrame:
    """Trips in the duration window with `duration` and `PU_DO` added, columns cast.

    Raises TripDataError naming a missing required column.
    """
    trips = normalize_trips(frame, color)
    trips["duration"] = trip_duration_minutes(trips, color)
    trips = trips[in_duration_window(trips["duration"])].copy()
    trips["PU_DO"] = _zone_text(trips["PULocationID"]) + "_" + _zone_text(trips["DOLocationID"])
    return trips


def _zone_text(zone_ids: pd.Series) -> pd.Series:
    # A null id must stay categorical: left as NaN, DictVectorizer would make it a numeric column.
    return zone_ids.astype("string").fillna("unknown").astype(object)


def feature_records(trips: pd.DataFrame) -> list[dict[str, object]]:
    """One dict per trip, the input DictVectorizer expects (and serving code sends)."""
    return trips[CATEGORICAL_FEATURES + NUMERICAL_FEATURES].to_dict(orient="records")


@dataclass(frozen=True)
class FeatureMatrices:
    """Train and validation design matrices, targets and the fitted preprocessor."""

    X_train: scipy.sparse.csr_matrix
    y_train: np.ndarray
    X_val: scipy.sparse.csr_matrix
    y_val: np.ndarray
    vectorizer: DictVectorizer

    @property
    def feature_names(self) -> list[str]:
        return list(self.vectorizer.get_feature_names_out())

    def validation_column(self, feature: str) -> np.ndarray:
        """Dense values of one feature (e.g. trip_distance) for the validation rows."""
        return self.X_val[:, self.vectorizer.vocabulary_[feature]].toarray().ravel()

    def summary(self) -> dict[str, int]:
        """Figures users compare runs by: shapes and non-zero counts."""
        return {
            "train_rows": int(self.X_train.shape[0]),
            "val_rows": int(self.X_val.shape[0]),
            "n_features": int(self.X_train.shape[1]),
            "train_nnz": int(self.X_train.nnz),
            "val_nnz": int(self.X_val.nnz),
        }


def build_matrices(train: pd.DataFrame, validation: pd.DataFrame) -> FeatureMatrices:
    """Fit the DictVectorizer on prepared training trips and transform both months."""
    if train.empty:
        raise ValueError("no training trips left after the 1-60 minute filter; cannot fit the preprocessor")
    if validation.empty:
        raise ValueError("no validation trips left after the 1-60 minute filter; cannot evaluate")
    vectorizer = DictVectorizer()
    X_train = vectorizer.fit_transform(feature_records(train))
    X_val = vectorizer.transform(feature_records(validation))
    return FeatureMatrices(
        X_train=X_train.tocsr(),
        y_train=train[TARGET].to_numpy(dtype="float64"),
        X_val=X_val.tocsr(),
        y_val=validation[TARGET].to_numpy(dtype="float64"),
        vectorizer=vectorizer,
    )
