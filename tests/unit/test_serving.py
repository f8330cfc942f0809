"""The servable model: raw trip fields in, the booster's minutes out, through MLflow and back."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xgboost as xgb
from mlflow.exceptions import MlflowException

from taxi_duration import serving
from taxi_duration.data.periods import Month
from taxi_duration.data.synthetic import generate_trips_table
from taxi_duration.modeling import drift, features
from taxi_duration.modeling.model import predict, train_booster
from taxi_duration.settings import ENVIRONMENT_DEFAULTS
from taxi_duration.tracking import mlflow_runs


@pytest.fixture(autouse=True)
def one_xgboost_thread():
    with xgb.config_context(nthread=1):
        yield


def trips(month: Month, rows: int, seed: int) -> pd.DataFrame:
    return features.prepare_trips(generate_trips_table("green", month, rows, seed=seed).to_pandas(), "green")


class Trained:
    """A small model as 02_features and 03_train leave it: vectorizer, booster, validation trips."""

    def __init__(self):
        self.train = trips(Month(2023, 2), 600, seed=11)
        self.validation = trips(Month(2023, 3), 300, seed=11)
        self.matrices = features.build_matrices(self.train, self.validation)
        self.booster = train_booster(
            self.matrices.X_train, self.matrices.y_train, self.matrices.X_val, self.matrices.y_val, num_boost_round=8
        )
        self.pipeline = serving.servable_model(self.matrices.vectorizer, self.booster)

    def raw(self, frame: pd.DataFrame | None = None) -> pd.DataFrame:
        """Only the fields a request carries (no PU_DO, no duration)."""
        return (self.validation if frame is None else frame)[serving.RAW_COLUMNS].reset_index(drop=True)

    def booster_minutes(self, raw: pd.DataFrame) -> np.ndarray:
        """What the notebook's booster predicts for these trips, featurized by the recipe's code."""
        matrix = features.trip_matrix(features.with_zone_pairs(raw.copy()), self.matrices.vectorizer)
        return predict(self.booster, matrix)


@pytest.fixture(scope="module")
def trained() -> Trained:
    with xgb.config_context(nthread=1):
        return Trained()


def test_raw_columns_are_the_zone_ids_and_distance():
    assert serving.RAW_COLUMNS == ["PULocationID", "DOLocationID", "trip_distance"]


def test_pipeline_predicts_what_the_booster_predicts_on_the_same_trips(trained):
    raw = trained.raw()

    served = trained.pipeline.predict(raw)

    expected = trained.booster_minutes(raw)
    assert served.shape == (len(raw),)
    np.testing.assert_allclose(served, expected, rtol=1e-6, atol=1e-6)
    # The matrix the booster was validated on gives the same, so the request needs no PU_DO.
    np.testing.assert_allclose(served, predict(trained.booster, trained.matrices.X_val), rtol=1e-6, atol=1e-6)
    assert list(trained.pipeline.named_steps) == [serving.FEATURIZER_STEP, serving.REGRESSOR_STEP]


def test_pipeline_uses_the_best_iteration_as_model_predict_does(trained):
    booster = trained.booster.copy()
    booster.set_attr(best_iteration="2")  # as early stopping leaves a booster that went past its best
    assert booster.num_boosted_rounds() > 3
    pipeline = serving.servable_model(trained.matrices.vectorizer, booster)
    matrix = trained.matrices.X_val

    served = pipeline.predict(trained.raw())

    np.testing.assert_allclose(served, predict(booster, matrix), rtol=1e-6, atol=1e-6)
    all_trees = booster.predict(xgb.DMatrix(matrix), iteration_range=(0, booster.num_boosted_rounds()))
    assert not np.allclose(served, all_trees, rtol=1e-4)


def test_records_give_the_same_predictions_as_a_frame(trained):
    raw = trained.raw()
    records = raw.astype({column: "int64" for column in serving.RAW_COLUMNS[:2]}).to_dict(orient="records")
    assert isinstance(records[0], dict)

    np.testing.assert_array_equal(trained.pipeline.predict(records), trained.pipeline.predict(raw))


def test_extra_columns_and_column_order_do_not_matter(trained):
    raw = trained.raw()
    shuffled = trained.validation.reset_index(drop=True)[
        ["duration", "trip_distance", "DOLocationID", "PU_DO", "PULocationID"]
    ]
    shuffled = shuffled.assign(PU_DO="1_1")  # a stale pair column is recomputed from the zone ids

    np.testing.assert_array_equal(trained.pipeline.predict(shuffled), trained.pipeline.predict(raw))


@pytest.mark.parametrize("missing", ["PULocationID", "DOLocationID", "trip_distance"])
def test_a_frame_missing_a_column_is_refused_naming_it(trained: Trained, missing: str) -> None:
    frame = trained.raw().drop(columns=[missing])
    with pytest.raises(MlflowException, match=f"lack the column\\(s\\) {missing};") as refused:
        trained.pipeline.predict(frame)
    assert refused.value.error_code == "INVALID_PARAMETER_VALUE"  # MLflow's scoring server: HTTP 400


def test_records_missing_a_column_are_refused_naming_it(trained: Trained) -> None:
    with pytest.raises(MlflowException, match=r"lack the column\(s\) DOLocationID, trip_distance;"):
        trained.pipeline.predict([{"PULocationID": 1}])


def unseen_valid_pairs(seen: set[str], count: int) -> list[tuple[int, int]]:
    """`count` pairs of TLC zones that no training trip had."""
    pairs = ((pickup, dropoff) for pickup in range(1, 266) for dropoff in range(1, 266))
    return [pair for pair in pairs if f"{pair[0]}_{pair[1]}" not in seen][:count]


def test_unseen_zone_pairs_still_get_a_prediction(trained: Trained) -> None:
    seen = trained.pipeline.named_steps[serving.FEATURIZER_STEP].seen_pairs()
    pairs = unseen_valid_pairs(seen, 3)
    request = pd.DataFrame(
        {
            "PULocationID": [pickup for pickup, _ in pairs],
            "DOLocationID": [dropoff for _, dropoff in pairs],
            "trip_distance": [3.0, 3.0, 7.5],
        }
    )

    minutes = trained.pipeline.predict(request)

    assert minutes.shape == (3,) and np.isfinite(minutes).all()
    # No pair feature for any of them: the same distance gets the same prediction, and it is the
    # booster's on a row holding the distance alone.
    assert minutes[0] == minutes[1]
    np.testing.assert_allclose(minutes, trained.booster_minutes(request), rtol=1e-6, atol=1e-6)


def valid_trip() -> dict[str, object]:
    return {"PULocationID": 74, "DOLocationID": 75, "trip_distance": 1.2}


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("PULocationID", 0, "PULocationID 0 is not a TLC zone"),
        ("DOLocationID", 266, "DOLocationID 266 is not a TLC zone"),
        ("PULocationID", -74, "PULocationID -74 is not a TLC zone"),
        ("PULocationID", 74.5, "PULocationID 74.5 is not a whole number"),
        ("DOLocationID", float("inf"), "DOLocationID inf is not a whole number"),
        ("PULocationID", None, "PULocationID is missing"),
        ("DOLocationID", "74", "DOLocationID '74' is not a number"),
        ("PULocationID", True, "PULocationID True is not a number"),
        ("trip_distance", -0.1, "trip_distance -0.1 is negative"),
        ("trip_distance", None, "trip_distance is missing"),
        ("trip_distance", float("nan"), "trip_distance is missing"),
        ("trip_distance", float("inf"), "trip_distance inf is not finite"),
        ("trip_distance", 100.01, "trip_distance 100.01 is over 100 miles"),
        ("trip_distance", 1e12, "trip_distance 1000000000000.0 is over 100 miles"),
        ("trip_distance", "far", "trip_distance 'far' is not a number"),
    ],
)
def test_a_batch_with_one_bad_trip_is_refused_whole_naming_row_field_and_rule(
    trained: Trained, field: str, value: object, words: str
) -> None:
    batch = [valid_trip(), valid_trip(), {**valid_trip(), field: value}]
    rule = f"{field} is " + (
        "a whole number among TLC's zones 1-265"
        if field != "trip_distance"
        else "a finite number of miles from 0 to 100"
    )

    with pytest.raises(MlflowException) as refused:
        trained.pipeline.predict(batch)

    assert refused.value.error_code == "INVALID_PARAMETER_VALUE"
    message = refused.value.message
    assert "refused the whole batch: 1 of its 3 trips" in message
    assert f"row 2: {words}" in message and f"The rules: {rule}." in message, message
    assert serving.refusal_reasons(pd.DataFrame(batch)).iloc[:2].isna().all()


@pytest.mark.parametrize(
    "trip",
    [
        {"PULocationID": 74.0, "DOLocationID": 75, "trip_distance": 1.2},  # 74.0 is zone 74
        {"PULocationID": 264, "DOLocationID": 265, "trip_distance": 1.2},  # TLC's "Unknown" and "Outside of NYC"
        {"PULocationID": 1, "DOLocationID": 1, "trip_distance": 0.0},
        {"PULocationID": 74, "DOLocationID": 75, "trip_distance": 100.0},
    ],
)
def test_trips_at_the_rules_edges_are_scored(trained: Trained, trip: dict[str, object]) -> None:
    assert serving.refusal_reasons(pd.DataFrame([trip])).isna().all()
    assert np.isfinite(trained.pipeline.predict([trip])).all()


def test_zone_74_0_scores_as_zone_74(trained: Trained) -> None:
    as_float = pd.DataFrame({"PULocationID": [74.0], "DOLocationID": [75.0], "trip_distance": [1.2]})
    np.testing.assert_array_equal(trained.pipeline.predict(as_float), trained.pipeline.predict([valid_trip()]))


def test_nullable_and_narrow_integer_zones_are_scored_as_the_files_hold_them(trained: Trained) -> None:
    raw = trained.raw()
    assert str(raw["PULocationID"].dtype) == "Int64"
    narrow = raw.astype({"PULocationID": "int32", "DOLocationID": "int32"})
    np.testing.assert_array_equal(trained.pipeline.predict(narrow), trained.pipeline.predict(raw))


def test_the_refusal_lists_ten_rows_and_counts_the_rest(trained: Trained) -> None:
    batch = [{**valid_trip(), "trip_distance": -1.0 - row} for row in range(12)] + [valid_trip()]
    with pytest.raises(MlflowException) as refused:
        trained.pipeline.predict(batch)
    message = refused.value.message
    assert "12 of its 13 trips" in message and "row 9: trip_distance -10.0 is negative" in message
    assert "row 10:" not in message and "; and 2 more." in message


def test_the_first_broken_rule_of_a_trip_is_its_reason() -> None:
    trips = pd.DataFrame(
        {
            "PULocationID": [999, 74, 74, 74],
            "DOLocationID": [None, 5.5, 75, 75],
            "trip_distance": [-1.0, -1.0, np.nan, 2.0],
        },
        index=[5, 5, 2, 9],
    )  # any index, even repeated
    assert serving.refusal_reasons(trips).index.tolist() == [5, 5, 2, 9]
    assert serving.refusal_reasons(trips).tolist() == [
        "PULocationID.not_a_zone",
        "DOLocationID.not_whole",
        "trip_distance.missing",
        None,
    ]
    assert serving.reason_text("trip_distance.too_long") == "trip_distance over 100 miles"


@pytest.mark.parametrize("empty", [[], pd.DataFrame(), pd.DataFrame({column: [] for column in serving.RAW_COLUMNS})])
def test_an_empty_batch_gets_an_empty_answer(trained: Trained, empty: object) -> None:
    minutes = trained.pipeline.predict(empty)
    assert minutes.shape == (0,)


def test_predict_every_trip_scores_the_refused_ones_too(trained: Trained) -> None:
    raw = trained.raw().astype({"trip_distance": "float64"})
    raw.loc[0, "trip_distance"] = 5000.0  # as TLC's files have a few
    raw.loc[1, "PULocationID"] = pd.NA

    with pytest.raises(
        MlflowException,
        match=re.escape("row 0: trip_distance 5000.0 is over 100 miles; row 1: PULocationID is missing"),
    ):
        trained.pipeline.predict(raw)
    minutes = serving.predict_every_trip(trained.pipeline, raw)

    np.testing.assert_allclose(minutes, trained.booster_minutes(raw), rtol=1e-6, atol=1e-6)


def test_seen_pairs_are_the_training_pairs(trained):
    featurizer = trained.pipeline.named_steps[serving.FEATURIZER_STEP]
    assert featurizer.seen_pairs() == set(trained.train["PU_DO"])
    assert not set(trained.validation["PU_DO"]) <= featurizer.seen_pairs()  # the synthetic months differ


def test_featurizer_without_vectorizer_says_how_to_build_it(trained):
    with pytest.raises(ValueError, match="servable_model"):
        serving.TripFeaturizer().transform(trained.raw())


def test_featurizer_fit_changes_nothing(trained):
    featurizer = serving.TripFeaturizer(trained.matrices.vectorizer)
    vocabulary = dict(trained.matrices.vectorizer.vocabulary_)
    assert featurizer.fit(trained.raw(trips(Month(2023, 7), 200, seed=5))) is featurizer
    assert featurizer.vectorizer.vocabulary_ == vocabulary


def test_input_example_has_plain_int_zones_and_no_missing_values(trained):
    raw = trained.raw()
    assert str(raw["PULocationID"].dtype) == "Int64"  # nullable, as the trip files are read
    with_gap = raw.copy()
    with_gap.loc[1, "PULocationID"] = pd.NA
    with_gap.loc[3, "trip_distance"] = np.nan

    example = serving.input_example(with_gap)

    assert list(example.columns) == serving.RAW_COLUMNS
    assert example["PULocationID"].dtype == np.int64 and example["DOLocationID"].dtype == np.int64
    assert example["trip_distance"].dtype == np.float64
    assert not example.isna().any().any()
    assert list(example.index) == list(range(len(example)))
    # The first five trips without a gap: the two with one are skipped, not left out of the count.
    expected = (
        raw.iloc[[0, 2, 4, 5, 6]].reset_index(drop=True).astype({"PULocationID": "int64", "DOLocationID": "int64"})
    )
    pd.testing.assert_frame_equal(example, expected)


def test_input_example_skips_trips_the_model_refuses(trained: Trained) -> None:
    raw = trained.raw().astype({"trip_distance": "float64"})
    raw.loc[0, "trip_distance"] = 5000.0
    raw.loc[2, "trip_distance"] = -1.0

    example = serving.input_example(raw, rows=3)

    assert serving.refusal_reasons(example).isna().all()
    np.testing.assert_array_equal(example["trip_distance"], raw["trip_distance"].iloc[[1, 3, 4]])


def test_no_input_example_without_a_trip_the_model_scores(trained: Trained) -> None:
    raw = trained.raw().head(3).astype({"trip_distance": "float64"}).assign(trip_distance=-1.0)
    with pytest.raises(ValueError, match="none of the 3 trips passes the model's checks"):
        serving.input_example(raw)


def test_input_example_rows(trained):
    assert len(serving.input_example(trained.raw(), rows=2)) == 2
    assert len(serving.input_example(trained.raw())) == 5


@pytest.fixture
def uri(tmp_path, monkeypatch, empty_tracking_store) -> str:
    for key, value in ENVIRONMENT_DEFAULTS.items():
        monkeypatch.setenv(key, value)
    # log_servable_model sets MLflow's process-wide URI and experiment, which write these.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", "")
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID")
    shutil.copyfile(empty_tracking_store, tmp_path / "mlflow.db")
    yield f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow_runs.import_mlflow().set_tracking_uri(None)


def test_logged_servable_model_loads_back_with_its_profile_and_signature(trained, uri, tmp_path):
    mlflow_runs.import_mlflow()  # first, without its import-time warning; the imports below bind the names
    import mlflow.artifacts
    import mlflow.pyfunc
    import mlflow.sklearn
    from mlflow.models import Model

    profile = drift.trip_profile("2023-02", trained.matrices.training_column("trip_distance"), trained.matrices.y_train)
    run_id = mlflow_runs.start_run(uri, "serving-tests", "servable", params={}, tags={})
    raw = trained.raw()

    model_uri = mlflow_runs.log_servable_model(uri, run_id, trained.pipeline, serving.input_example(raw), profile)

    assert model_uri.startswith("models:/m-")
    logged = mlflow_runs.mlflow_client(uri).get_logged_model(model_uri.removeprefix("models:/"))
    assert logged.source_run_id == run_id and logged.name == mlflow_runs.SERVABLE_MODEL_NAME
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=logged.artifact_location, dst_path=str(tmp_path / "downloaded"), tracking_uri=uri
    )
    loaded = mlflow.sklearn.load_model(local)
    np.testing.assert_array_equal(loaded.predict(raw), trained.pipeline.predict(raw))
    np.testing.assert_allclose(loaded.predict(raw), trained.booster_minutes(raw), rtol=1e-6, atol=1e-6)

    description = Model.load(local)
    assert description.metadata[mlflow_runs.TRAINING_PROFILE_KEY] == profile
    assert description.signature.inputs.input_names() == serving.RAW_COLUMNS
    # The types MLflow enforces, as the model checks them: a double distance; zone ids the model
    # types itself (a `long` would let MLflow's server truncate 74.5 to zone 74). None required,
    # so an empty batch reaches the model.
    assert description.signature.inputs.to_dict() == [
        {"type": "any", "name": "PULocationID", "required": False},
        {"type": "any", "name": "DOLocationID", "required": False},
        {"type": "double", "name": "trip_distance", "required": False},
    ]
    assert description.flavors["sklearn"]["serialization_format"] == "skops"
    # The package travels with the model as its code, the zone table with it.
    assert (Path(local) / "code" / "taxi_duration" / "serving.py").is_file()
    assert (Path(local) / "code" / "taxi_duration" / "data" / "taxi_zone_lookup.csv").is_file()
    # pyfunc, as `mlflow models serve` and `predict` load it, applies the model's checks.
    served = mlflow.pyfunc.load_model(local)
    np.testing.assert_array_equal(served.predict(raw), trained.pipeline.predict(raw))
    with pytest.raises(MlflowException, match=re.escape("row 1: PULocationID 74.5 is not a whole number")):
        served.predict(
            pd.DataFrame({"PULocationID": [74.0, 74.5], "DOLocationID": [75, 75], "trip_distance": [1.2, 1.2]})
        )
    assert served.predict(pd.DataFrame()).shape == (0,)
    # And by its URI, as a user would (through MLflow's process-wide tracking URI).
    mlflow.set_tracking_uri(uri)
    np.testing.assert_array_equal(mlflow.sklearn.load_model(model_uri).predict(raw), trained.pipeline.predict(raw))
    assert not (tmp_path / "mlruns").exists()
