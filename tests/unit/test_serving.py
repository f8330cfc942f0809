"""The servable model: raw trip fields in, the booster's minutes out, through MLflow and back."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xgboost as xgb

from taxi_duration import drift, features, serving, tracking
from taxi_duration.model import predict, train_booster
from taxi_duration.periods import Month
from taxi_duration.settings import ENVIRONMENT_DEFAULTS
from taxi_duration.synthetic import generate_trips_table


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
    shuffled = trained.validation.reset_index(drop=True)[["duration", "trip_distance", "DOLocationID", "PU_DO",
                                                          "PULocationID"]]
    shuffled = shuffled.assign(PU_DO="1_1")  # a stale pair column is recomputed from the zone ids

    np.testing.assert_array_equal(trained.pipeline.predict(shuffled), trained.pipeline.predict(raw))


@pytest.mark.parametrize("missing", ["PULocationID", "DOLocationID", "trip_distance"])
def test_a_frame_missing_a_column_is_refused_naming_it(trained, missing):
    frame = trained.raw().drop(columns=[missing])
    with pytest.raises(ValueError, match=f"lack the column\\(s\\) {missing};"):
        trained.pipeline.predict(frame)


def test_records_missing_a_column_are_refused_naming_it(trained):
    with pytest.raises(ValueError, match=r"lack the column\(s\) DOLocationID, trip_distance;"):
        trained.pipeline.predict([{"PULocationID": 1}])


def test_unseen_zone_pairs_still_get_a_prediction(trained):
    seen = trained.pipeline.named_steps[serving.FEATURIZER_STEP].seen_pairs()
    request = pd.DataFrame({
        "PULocationID": [9001, 9002, 9003, None],  # zones no trip had, and a missing one
        "DOLocationID": [9101, 9102, 9103, 5],
        "trip_distance": [3.0, 3.0, 7.5, 3.0],
    })
    assert not {"9001_9101", "9002_9102", "9003_9103", "unknown_5"} & seen

    minutes = trained.pipeline.predict(request)

    assert minutes.shape == (4,) and np.isfinite(minutes).all()
    # No pair feature for any of them: the same distance gets the same prediction, and it is the
    # booster's on a row holding the distance alone.
    assert minutes[0] == minutes[1] == minutes[3]
    np.testing.assert_allclose(minutes, trained.booster_minutes(request), rtol=1e-6, atol=1e-6)


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
    expected = raw.iloc[[0, 2, 4, 5, 6]].reset_index(drop=True).astype({"PULocationID": "int64", "DOLocationID": "int64"})
    pd.testing.assert_frame_equal(example, expected)


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
    tracking.import_mlflow().set_tracking_uri(None)


def test_logged_servable_model_loads_back_with_its_profile_and_signature(trained, uri, tmp_path):
    tracking.import_mlflow()  # first, without its import-time warning; the imports below bind the names
    import mlflow.artifacts
    import mlflow.sklearn
    from mlflow.models import Model

    profile = drift.trip_profile("2023-02", trained.matrices.training_column("trip_distance"), trained.matrices.y_train)
    run_id = tracking.start_run(uri, "serving-tests", "servable", params={}, tags={})
    raw = trained.raw()

    model_uri = tracking.log_servable_model(uri, run_id, trained.pipeline, serving.input_example(raw), profile)

    assert model_uri.startswith("models:/m-")
    logged = tracking._client(uri).get_logged_model(model_uri.removeprefix("models:/"))
    assert logged.source_run_id == run_id and logged.name == tracking.SERVABLE_MODEL_NAME
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=logged.artifact_location, dst_path=str(tmp_path / "downloaded"), tracking_uri=uri
    )
    loaded = mlflow.sklearn.load_model(local)
    np.testing.assert_array_equal(loaded.predict(raw), trained.pipeline.predict(raw))
    np.testing.assert_allclose(loaded.predict(raw), trained.booster_minutes(raw), rtol=1e-6, atol=1e-6)

    description = Model.load(local)
    assert description.metadata[tracking.TRAINING_PROFILE_KEY] == profile
    assert description.signature.inputs.input_names() == serving.RAW_COLUMNS
    assert description.flavors["sklearn"]["serialization_format"] == "skops"
    # The package travels with the model as its code.
    assert (Path(local) / "code" / "taxi_duration" / "serving.py").is_file()
    # And by its URI, as a user would (through MLflow's process-wide tracking URI).
    mlflow.set_tracking_uri(uri)
    np.testing.assert_array_equal(mlflow.sklearn.load_model(model_uri).predict(raw), trained.pipeline.predict(raw))
    assert not (tmp_path / "mlruns").exists()
