"""The servable model: raw trip fields in, predicted minutes out.

A scikit-learn `Pipeline` of two steps, logged with MLflow's sklearn flavor and registered
as `nyc-taxi-duration` (the `champion` alias points at one of its versions):

1. `TripFeaturizer`: checks the request (`check_trips`), adds `PU_DO` with the recipe's own
   code (features.with_zone_pairs) and builds the matrix with the DictVectorizer fitted in
   the features notebook (features.trip_matrix);
2. the trained booster inside XGBoost's scikit-learn wrapper, `XGBRegressor`.

The checks are part of the model, so `mlflow models serve`, `mlflow models predict`,
`pyfunc.load_model(...).predict` and `mlflow.sklearn.load_model(...).predict` all apply them: a
zone id is a whole number among TLC's zones (taxi_duration.data.zones), a distance a finite number
of miles from 0 to MAX_TRIP_MILES. A batch with a trip that breaks a rule is refused whole with
an MlflowException (INVALID_PARAMETER_VALUE: HTTP 400 from MLflow's scoring server) naming the
row, the field and the rule; an empty batch gets an empty answer. The scoring notebook sets such trips
aside first (`refusal_reasons`) and counts them.

So `mlflow.sklearn.load_model("models:/nyc-taxi-duration@champion").predict(frame)`, or
`mlflow models serve` on that URI, answers a request made of trip fields; nobody unpickles a
preprocessor or repeats the feature code. The model carries this package as its code
(`code_paths`), so an environment built from its requirements loads it without the project.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.pipeline import Pipeline

from taxi_duration.data import zones
from taxi_duration.data.tripfiles import DISTANCE_COLUMN, LOCATION_COLUMNS
from taxi_duration.modeling import features

if TYPE_CHECKING:
    import scipy.sparse
    import xgboost as xgb
    from mlflow.models import ModelSignature
    from sklearn.feature_extraction import DictVectorizer

RAW_COLUMNS = features.RAW_FEATURES
FEATURIZER_STEP = "features"
REGRESSOR_STEP = "regressor"
# The types besides scikit-learn's in the saved Pipeline, which skops must be told to load.
SKOPS_TRUSTED_TYPES = ("taxi_duration.serving.TripFeaturizer", "xgboost.core.Booster", "xgboost.sklearn.XGBRegressor")

# No taxi trip is longer: TLC's files carry odometer errors of thousands of miles, and in the
# real months nothing lies between 40 and 1,000 miles among trips of 1-60 minutes.
MAX_TRIP_MILES = 100.0
# Why a trip is refused, by rule: "<field>.<key>" names it (the scoring notebook's counts, MLflow metrics).
REASONS = {
    "missing": "missing",
    "not_a_number": "not a number",
    "not_whole": "not a whole number",
    "not_a_zone": "not a TLC zone",
    "not_finite": "not finite",
    "negative": "negative",
    "too_long": f"over {MAX_TRIP_MILES:g} miles",
}
# The rows an error message lists; the count says how many more there are.
LISTED_ROWS = 10


class TripFeaturizer(TransformerMixin, BaseEstimator):
    """Raw trips (a frame or records with RAW_COLUMNS) to the recipe's sparse design matrix.

    Holds a vectorizer already fitted on the training month: `fit` changes nothing, since the
    pipeline is assembled from what the features and training notebooks produced, never refitted here.
    """

    def __init__(self, vectorizer: DictVectorizer | None = None):
        self.vectorizer = vectorizer

    def fit(self, X: Any, y: Any = None) -> TripFeaturizer:
        return self

    def transform(self, X: Any) -> scipy.sparse.csr_matrix:
        """The matrix of trips that all pass `check_trips`; otherwise the whole batch is refused."""
        return self.matrix(check_trips(_frame(X)))

    def matrix(self, X: Any) -> scipy.sparse.csr_matrix:
        """The matrix of any trips, unchecked (see `predict_every_trip`)."""
        if self.vectorizer is None:
            raise ValueError("TripFeaturizer has no vectorizer: build it with servable_model(vectorizer, booster)")
        return features.trip_matrix(features.with_zone_pairs(raw_trips(X)), self.vectorizer)

    def seen_pairs(self) -> set[str]:
        """The PU_DO pairs the vectorizer was fitted on (its training month's)."""
        return features.fitted_pairs(self.vectorizer)


def _frame(trips: Any) -> pd.DataFrame:
    return trips if isinstance(trips, pd.DataFrame) else pd.DataFrame(list(trips))


def raw_trips(trips: Any) -> pd.DataFrame:
    """The request's RAW_COLUMNS, cast as the trip files hold them; ValueError naming a missing column."""
    frame = _frame(trips)
    if len(frame) == 0 and len(frame.columns) == 0:  # `[]`: no records, so no columns either
        frame = pd.DataFrame({column: [] for column in RAW_COLUMNS})
    missing = [column for column in RAW_COLUMNS if column not in frame.columns]
    if missing:
        raise ValueError(
            f"trip records lack the column(s) {', '.join(missing)}; the model takes {', '.join(RAW_COLUMNS)}"
        )
    return pd.DataFrame(
        {
            **{column: frame[column].astype("Int64") for column in LOCATION_COLUMNS},
            DISTANCE_COLUMN: frame[DISTANCE_COLUMN].astype("float64"),
        },
        index=frame.index,
    )


def servable_model(vectorizer: DictVectorizer, booster: xgb.Booster) -> Pipeline:
    """The Pipeline that predicts minutes from raw trips with this vectorizer and booster."""
    import xgboost as xgb

    regressor = xgb.XGBRegressor()
    # The booster's own bytes: the same trees, and the best iteration early stopping chose,
    # which the wrapper predicts with as model.predict does.
    regressor.load_model(bytearray(booster.save_raw("json")))
    return Pipeline([(FEATURIZER_STEP, TripFeaturizer(vectorizer)), (REGRESSOR_STEP, regressor)])


def input_example(trips: pd.DataFrame, rows: int = 5) -> pd.DataFrame:
    """A few trips' RAW_COLUMNS with plain dtypes, as a request would send them: the first that pass the checks."""
    raw = raw_trips(trips)
    example = raw[refusal_reasons(raw).isna()].head(rows).reset_index(drop=True)
    if example.empty:
        raise ValueError(f"none of the {len(raw)} trips passes the model's checks: no input example to log")
    return example.astype({column: "int64" for column in LOCATION_COLUMNS})


def refusal_reasons(trips: pd.DataFrame) -> pd.Series:
    """Per trip (same index), the first rule it breaks as "<field>.<key>" (a REASONS key), or None.

    A zone id is a whole number among TLC's zones (74 and 74.0 are zone 74; 74.5, a text or a
    boolean is not); a distance is a finite number of miles from 0 to MAX_TRIP_MILES.
    """
    reasons = np.full(len(trips), None, dtype=object)
    for column in RAW_COLUMNS:
        keys = (_zone_reasons if column in LOCATION_COLUMNS else _distance_reasons)(trips[column]).to_numpy()
        first = pd.isna(reasons) & ~pd.isna(keys)
        reasons[first] = [f"{column}.{key}" for key in keys[first]]
    return pd.Series(reasons, index=trips.index, dtype=object)


def reason_text(reason: str) -> str:
    """'trip_distance over 100 miles' for 'trip_distance.too_long'."""
    column, key = reason.split(".", 1)
    return f"{column} {REASONS[key]}"


def rule_text(column: str) -> str:
    """The rule a field's values follow, as error messages and reports state it: 'a whole number among ...'."""
    if column in LOCATION_COLUMNS:
        return f"a whole number among TLC's zones {zones.id_range()}"
    return f"a finite number of miles from 0 to {MAX_TRIP_MILES:g}"


def check_trips(trips: pd.DataFrame) -> pd.DataFrame:
    """`trips` if every one can be scored; else the model's refusal of the whole batch, naming rows, fields and rules.

    An empty batch passes (its answer is empty), with or without columns.
    """
    if len(trips) == 0:
        return trips
    missing = [column for column in RAW_COLUMNS if column not in trips.columns]
    if missing:
        raise _refusal(
            f"trip records lack the column(s) {', '.join(missing)}; the model takes {', '.join(RAW_COLUMNS)}"
        )
    reasons = refusal_reasons(trips).reset_index(drop=True)
    refused = reasons[reasons.notna()]
    if refused.empty:
        return trips
    rows = []
    for row, reason in refused.head(LISTED_ROWS).items():
        column, key = reason.split(".", 1)
        value = "" if key == "missing" else f" {_shown(trips[column].iloc[row])}"
        rows.append(f"row {row}: {column}{value} is {REASONS[key]}")
    more = f"; and {len(refused) - LISTED_ROWS} more" if len(refused) > LISTED_ROWS else ""
    rules = dict.fromkeys(
        f"{column} is {rule_text(column)}" for column in (reason.split(".", 1)[0] for reason in refused)
    )
    raise _refusal(
        f"refused the whole batch: {len(refused):,} of its {len(trips):,} trips break the model's input rules "
        f"(rows count from 0). {'; '.join(rows)}{more}. The rules: {'; '.join(rules)}."
    )


def predict_every_trip(pipeline: Pipeline, trips: Any) -> np.ndarray:
    """Minutes for every trip, those the served model refuses included.

    For comparing models on a month's validation trips as training measured them (the training notebook's
    check, the promotion gate, the comparison of two runs): the booster's RMSE covers them all.
    """
    matrix = pipeline.named_steps[FEATURIZER_STEP].matrix(trips)
    return pipeline.named_steps[REGRESSOR_STEP].predict(matrix)


def model_signature(predictions: np.ndarray) -> ModelSignature:
    """The servable model's signature: the raw columns in, minutes out.

    trip_distance is a double. The zone ids are `Any`: MLflow's scoring server casts a JSON
    number to a `long` column by truncation, so 74.5 would reach the model as zone 74; the
    model's own rule (a whole number among TLC's zones) types them. No column is `required`, so
    an empty batch (`{"dataframe_records": []}`, which has no columns) reaches the model and gets
    an empty answer; a non-empty batch lacking a column is refused by the model, naming it.
    """
    from mlflow.models import ModelSignature, infer_signature
    from mlflow.types import ColSpec, Schema
    from mlflow.types.schema import AnyType

    inputs = Schema(
        [
            *(ColSpec(AnyType(), column, required=False) for column in LOCATION_COLUMNS),
            ColSpec("double", DISTANCE_COLUMN, required=False),
        ]
    )
    # The predictions' own schema: infer_signature(x) describes x as its "inputs".
    return ModelSignature(inputs=inputs, outputs=infer_signature(predictions).inputs)


def _zone_reasons(values: pd.Series) -> pd.Series:
    numbers, missing, not_a_number = _numbers(values)
    whole = np.isfinite(numbers) & (numbers % 1 == 0)
    return _first(
        values.index,
        [
            (missing, "missing"),
            (not_a_number, "not_a_number"),
            (~whole, "not_whole"),
            (~numbers.isin(zones.zone_ids()), "not_a_zone"),
        ],
    )


def _distance_reasons(values: pd.Series) -> pd.Series:
    numbers, missing, not_a_number = _numbers(values)
    return _first(
        values.index,
        [
            (missing, "missing"),
            (not_a_number, "not_a_number"),
            (~np.isfinite(numbers), "not_finite"),
            (numbers < 0, "negative"),
            (numbers > MAX_TRIP_MILES, "too_long"),
        ],
    )


def _numbers(values: pd.Series) -> tuple[pd.Series, pd.Series, pd.Series]:
    """The values as float64 (NaN where not a number), and which are missing, which not numbers."""
    missing = values.isna()
    if pd.api.types.is_bool_dtype(values):
        not_a_number = ~missing
    elif pd.api.types.is_numeric_dtype(values):
        not_a_number = pd.Series(False, index=values.index)
    else:  # object: a JSON batch mixing numbers with texts or booleans
        not_a_number = ~missing & ~values.map(_is_number).astype(bool)
    numbers = pd.to_numeric(values.where(~missing & ~not_a_number), errors="coerce").astype("float64")
    return numbers, missing, not_a_number


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _first(index: pd.Index, rules: list[tuple[pd.Series, str]]) -> pd.Series:
    """Per row, the key of the first rule whose condition holds, else None."""
    keys = np.full(len(index), None, dtype=object)
    for condition, key in reversed(rules):  # the first rule's key is written last
        keys[np.asarray(condition, dtype=bool)] = key
    return pd.Series(keys, index=index, dtype=object)


def _shown(value: object) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _refusal(message: str) -> Exception:
    """The model's refusal: MLflow's scoring server answers an INVALID_PARAMETER_VALUE with HTTP 400 and the message."""
    from mlflow.exceptions import MlflowException

    return MlflowException.invalid_parameter_value(message)
