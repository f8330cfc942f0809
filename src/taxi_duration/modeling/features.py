"""The reference recipe's features: trip duration, the 1-60 minute window, PU_DO, DictVectorizer.

Matches the well-known course model exactly: duration = dropoff - pickup in minutes,
keep 1 <= duration <= 60, `PU_DO` = pickup and dropoff zone ids joined by "_" (strings,
so categorical), and `trip_distance` as the one numeric feature.

The matrices are built column-wise (pandas factorize + numpy + a CSR matrix assembled from
its arrays) instead of through `to_dict(orient="records")` and `DictVectorizer`, which cost
seconds and gigabytes per million trips. The result is exactly DictVectorizer's: the same
sorted feature names, float64 values, explicit zeros, NaN distances kept as stored NaNs,
unseen validation pairs dropped. The fitted DictVectorizer is still what gets saved, so
serving code keeps calling `vectorizer.transform(feature_records(trips))`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import numpy as np
import pandas as pd
import scipy.sparse

# scikit-learn is imported where a vectorizer is made: exploring a month needs only the duration.
if TYPE_CHECKING:
    from sklearn.feature_extraction import DictVectorizer

from taxi_duration.data.tripfiles import (
    DISTANCE_COLUMN,
    DROPOFF_COLUMN,
    LOCATION_COLUMNS,
    PICKUP_COLUMN,
    normalize_trips,
)

MIN_DURATION_MINUTES = 1.0
MAX_DURATION_MINUTES = 60.0
CATEGORICAL_FEATURES = ["PU_DO"]
NUMERICAL_FEATURES = [DISTANCE_COLUMN]
TARGET = "duration"
# What one trip record must hold to be scored: the servable model's input (taxi_duration.serving).
RAW_FEATURES = [*LOCATION_COLUMNS, DISTANCE_COLUMN]


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
    return with_zone_pairs(trips)


def with_zone_pairs(trips: pd.DataFrame) -> pd.DataFrame:
    """`trips` with `PU_DO` set from its zone ids: the one place that spells the pair feature.

    The training stages and the servable model (taxi_duration.serving) both call this, so a
    request's zone ids become exactly the categories the vectorizer was fitted on.
    """
    trips["PU_DO"] = _zone_text(trips["PULocationID"]) + "_" + _zone_text(trips["DOLocationID"])
    return trips


def _zone_text(zone_ids: pd.Series) -> pd.Series:
    # A null id must stay categorical: left as NaN, DictVectorizer would make it a numeric column.
    return zone_ids.astype("string").fillna("unknown").astype(object)


def feature_records(trips: pd.DataFrame) -> list[dict[str, object]]:
    """One dict per trip, the input DictVectorizer expects (and serving code sends)."""
    # The column names are the str constants above; pandas types every record's keys Hashable.
    return cast("list[dict[str, object]]", trips[CATEGORICAL_FEATURES + NUMERICAL_FEATURES].to_dict(orient="records"))


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

    def training_column(self, feature: str) -> np.ndarray:
        """Dense values of one feature for the training rows."""
        return self.X_train[:, self.vectorizer.vocabulary_[feature]].toarray().ravel()

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
    """Fit the DictVectorizer on prepared training trips and transform both months.

    Gives exactly what `DictVectorizer().fit_transform(feature_records(train))` and
    `.transform(feature_records(validation))` give, without building the records.
    """
    if train.empty:
        raise ValueError("no training trips left after the 1-60 minute filter; cannot fit the preprocessor")
    if validation.empty:
        raise ValueError("no validation trips left after the 1-60 minute filter; cannot evaluate")
    X_train, vectorizer = fit_trip_matrix(train)
    X_val = trip_matrix(validation, vectorizer)
    return FeatureMatrices(
        X_train=X_train,
        y_train=train[TARGET].to_numpy(dtype="float64"),
        X_val=X_val,
        y_val=validation[TARGET].to_numpy(dtype="float64"),
        vectorizer=vectorizer,
    )


# DictVectorizer names a string value's column "<key>=<value>" (its default separator).
_SEPARATOR = "="
_CATEGORY_PREFIX = f"{CATEGORICAL_FEATURES[0]}{_SEPARATOR}"
_DISTANCE = NUMERICAL_FEATURES[0]


def fitted_pairs(vectorizer: DictVectorizer) -> set[str]:
    """The PU_DO pairs ("132_236") a vectorizer was fitted on."""
    return {name.removeprefix(_CATEGORY_PREFIX) for name in vectorizer.vocabulary_ if name.startswith(_CATEGORY_PREFIX)}


def fit_vectorizer(trips: pd.DataFrame) -> DictVectorizer:
    """The DictVectorizer that `fit` on `feature_records(trips)` would give, fitted without the records."""
    _, names = _factorized_pairs(trips)
    return _fitted_vectorizer(names)


def fit_trip_matrix(trips: pd.DataFrame) -> tuple[scipy.sparse.csr_matrix, DictVectorizer]:
    """Same as `DictVectorizer().fit_transform(feature_records(trips))`: the matrix and the vectorizer."""
    codes, names = _factorized_pairs(trips)
    vectorizer = _fitted_vectorizer(names)
    return _assemble(codes, names, trips, vectorizer), vectorizer


def trip_matrix(trips: pd.DataFrame, vectorizer: DictVectorizer) -> scipy.sparse.csr_matrix:
    """Same as `vectorizer.transform(feature_records(trips))`, for a vectorizer fitted on such records.

    PU_DO pairs the vectorizer has not seen get no entry (DictVectorizer ignores them).
    Raises ValueError when the vectorizer's features are not PU_DO pairs plus trip_distance.
    """
    codes, names = _factorized_pairs(trips)
    return _assemble(codes, names, trips, vectorizer)


def _factorized_pairs(trips: pd.DataFrame) -> tuple[np.ndarray, list[str]]:
    """Each trip's index into `names`, the distinct PU_DO feature names ("PU_DO=132_236")."""
    column = CATEGORICAL_FEATURES[0]
    missing = [name for name in CATEGORICAL_FEATURES + NUMERICAL_FEATURES if name not in trips.columns]
    if missing:
        raise ValueError(f"trips lack the feature column(s) {', '.join(missing)}; pass trips from prepare_trips")
    codes, uniques = pd.factorize(trips[column], use_na_sentinel=True)
    not_text = [value for value in uniques if not isinstance(value, str)]
    if (codes < 0).any() or not_text:
        # DictVectorizer would turn such a value into a numeric PU_DO column, or fail on it.
        example = "a null" if (codes < 0).any() else repr(not_text[0])
        raise ValueError(f"{column} holds {example} value; it must hold 'PU_DO' strings as prepare_trips makes them")
    return codes, [_CATEGORY_PREFIX + value for value in uniques]


def _fitted_vectorizer(names: list[str]) -> DictVectorizer:
    """A DictVectorizer in the state `fit` leaves it: every feature name sorted, numbered in that order."""
    from sklearn.feature_extraction import DictVectorizer

    vectorizer = DictVectorizer()
    # DictVectorizer sorts the names as Python strings (code point order), so this does too.
    feature_names = sorted([*names, _DISTANCE])
    vectorizer.feature_names_ = feature_names
    vectorizer.vocabulary_ = {name: index for index, name in enumerate(feature_names)}
    return vectorizer


def _assemble(
    codes: np.ndarray, names: list[str], trips: pd.DataFrame, vectorizer: DictVectorizer
) -> scipy.sparse.csr_matrix:
    """The CSR matrix DictVectorizer builds: per trip its pair's column (1.0) then the distance.

    Zero distances are stored, as DictVectorizer stores them (the pipeline reports nnz), and
    NaN distances are stored as NaN. Row entries are in column order because every
    "PU_DO=..." name sorts before "trip_distance" ("P" < "t"), which _distance_column checks.
    """
    vocabulary = vectorizer.vocabulary_
    distance_column = _distance_column(vectorizer)
    # -1 marks a pair the vectorizer never saw: DictVectorizer leaves that trip's pair out.
    column_of_name = np.array([vocabulary.get(name, -1) for name in names], dtype=np.int64)
    pair_columns = column_of_name[codes]
    known = pair_columns >= 0
    rows = len(codes)
    indptr = np.zeros(rows + 1, dtype=np.int64)
    np.cumsum(known.astype(np.int64) + 1, out=indptr[1:])
    nnz = int(indptr[-1])
    indices = np.empty(nnz, dtype=np.int64)
    data = np.empty(nnz, dtype=np.float64)
    pair_slots = indptr[:-1][known]
    indices[pair_slots] = pair_columns[known]
    data[pair_slots] = 1.0
    distance_slots = indptr[1:] - 1
    indices[distance_slots] = distance_column
    data[distance_slots] = trips[_DISTANCE].to_numpy(dtype=np.float64)
    # Built as a csr_array, then viewed as a csr_matrix (no copy), as DictVectorizer does: this
    # keeps the int64 index arrays, which csr_matrix's own constructor would shrink to int32.
    array = scipy.sparse.csr_array((data, indices, indptr), shape=(rows, len(vocabulary)), copy=False)
    array.has_sorted_indices = True  # true by construction; spares scipy a pass to find out
    return scipy.sparse.csr_matrix(array)


def _distance_column(vectorizer: DictVectorizer) -> int:
    """trip_distance's column, after checking the vocabulary is PU_DO pairs plus trip_distance, sorted."""
    vocabulary = getattr(vectorizer, "vocabulary_", None)
    if vocabulary is None:
        raise ValueError("the vectorizer is not fitted: it has no vocabulary_")
    unexpected = [name for name in vocabulary if name != _DISTANCE and not name.startswith(_CATEGORY_PREFIX)]
    column = vocabulary.get(_DISTANCE)
    if unexpected or column != len(vocabulary) - 1:
        what = f"the feature {unexpected[0]!r}" if unexpected else f"{_DISTANCE!r} not as its last column"
        raise ValueError(
            f"the vectorizer has {what}; the fast path handles only PU_DO pairs plus {_DISTANCE} as fitted on feature_records"
        )
    return column
