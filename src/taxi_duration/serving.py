"""The servable model: raw trip fields in, predicted minutes out.

A scikit-learn `Pipeline` of two steps, logged with MLflow's sklearn flavor and registered
as `nyc-taxi-duration` (the `champion` alias points at one of its versions):

1. `TripFeaturizer`: checks the request's columns (`PULocationID`, `DOLocationID`,
   `trip_distance`), adds `PU_DO` with the recipe's own code (features.with_zone_pairs) and
   builds the matrix with the DictVectorizer fitted in 02_features (features.trip_matrix);
2. the trained booster inside XGBoost's scikit-learn wrapper, `XGBRegressor`.

So `mlflow.sklearn.load_model("models:/nyc-taxi-duration@champion").predict(frame)`, or
`mlflow models serve` on that URI, answers a request made of trip fields; nobody unpickles a
preprocessor or repeats the feature code. The model carries this package as its code
(`code_paths`), so an environment built from its requirements loads it without the project.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pandas as pd
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.pipeline import Pipeline

from taxi_duration import features
from taxi_duration.data import DISTANCE_COLUMN, LOCATION_COLUMNS

if TYPE_CHECKING:
    import scipy.sparse
    import xgboost as xgb
    from sklearn.feature_extraction import DictVectorizer

RAW_COLUMNS = features.RAW_FEATURES
FEATURIZER_STEP = "features"
REGRESSOR_STEP = "regressor"
# The types besides scikit-learn's in the saved Pipeline, which skops must be told to load.
SKOPS_TRUSTED_TYPES = ("taxi_duration.serving.TripFeaturizer", "xgboost.core.Booster", "xgboost.sklearn.XGBRegressor")


class TripFeaturizer(TransformerMixin, BaseEstimator):
    """Raw trips (a frame or records with RAW_COLUMNS) to the recipe's sparse design matrix.

    Holds a vectorizer already fitted on the training month: `fit` changes nothing, since the
    pipeline is assembled from what 02_features and 03_train produced, never refitted here.
    """

    def __init__(self, vectorizer: DictVectorizer | None = None):
        self.vectorizer = vectorizer

    def fit(self, X: Any, y: Any = None) -> TripFeaturizer:
        return self

    def transform(self, X: Any) -> scipy.sparse.csr_matrix:
        if self.vectorizer is None:
            raise ValueError("TripFeaturizer has no vectorizer: build it with servable_model(vectorizer, booster)")
        return features.trip_matrix(features.with_zone_pairs(raw_trips(X)), self.vectorizer)

    def seen_pairs(self) -> set[str]:
        """The PU_DO pairs the vectorizer was fitted on (its training month's)."""
        return features.fitted_pairs(self.vectorizer)


def raw_trips(trips: Any) -> pd.DataFrame:
    """The request's RAW_COLUMNS, cast as the trip files hold them; ValueError naming a missing column."""
    frame = trips if isinstance(trips, pd.DataFrame) else pd.DataFrame(list(trips))
    missing = [column for column in RAW_COLUMNS if column not in frame.columns]
    if missing:
        raise ValueError(
            f"trip records lack the column(s) {', '.join(missing)}; the model takes {', '.join(RAW_COLUMNS)}"
        )
    return pd.DataFrame({
        **{column: frame[column].astype("Int64") for column in LOCATION_COLUMNS},
        DISTANCE_COLUMN: frame[DISTANCE_COLUMN].astype("float64"),
    }, index=frame.index)


def servable_model(vectorizer: DictVectorizer, booster: xgb.Booster) -> Pipeline:
    """The Pipeline that predicts minutes from raw trips with this vectorizer and booster."""
    import xgboost as xgb

    regressor = xgb.XGBRegressor()
    # The booster's own bytes: the same trees, and the best iteration early stopping chose,
    # which the wrapper predicts with as model.predict does.
    regressor.load_model(bytearray(booster.save_raw("json")))
    return Pipeline([(FEATURIZER_STEP, TripFeaturizer(vectorizer)), (REGRESSOR_STEP, regressor)])


def input_example(trips: pd.DataFrame, rows: int = 5) -> pd.DataFrame:
    """A few trips' RAW_COLUMNS with plain dtypes, as a request would send them (for the signature)."""
    example = raw_trips(trips).dropna().head(rows).reset_index(drop=True)
    return example.astype({column: "int64" for column in LOCATION_COLUMNS})
