"""The promotion gate against a real SQLite MLflow store, with real boosters and vectorizers.

Each test trains tiny XGBoost models on synthetic trips, logs them as the training notebook
does (preprocessor under "preprocessor/", model via log_xgboost_model) and gates them. The
champion's expected RMSE is always computed here independently, from the in-memory booster
and the DictVectorizer it was trained with, never through the registry code under test.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xgboost as xgb

from taxi_duration import registry, tracking
from taxi_duration.features import FeatureMatrices, build_matrices, feature_records, prepare_trips
from taxi_duration.model import predict, rmse, train_booster
from taxi_duration.periods import Month
from taxi_duration.runfiles import save_preprocessor
from taxi_duration.settings import ENVIRONMENT_DEFAULTS
from taxi_duration.synthetic import generate_trips_table

MODEL = registry.DEFAULT_REGISTERED_MODEL
EXPERIMENT = "registry-tests"


@pytest.fixture(autouse=True)
def one_xgboost_thread():
    # The matrices are tiny; one thread avoids OpenMP spin-waits when the machine is busy.
    with xgb.config_context(nthread=1):
        yield


@pytest.fixture
def uri(tmp_path, monkeypatch) -> str:
    """A fresh SQLite store for the test (its artifacts go beside it, in tmp_path)."""
    for key, value in ENVIRONMENT_DEFAULTS.items():
        monkeypatch.setenv(key, value)
    # Recorded so teardown restores it: mlflow.set_tracking_uri (called by log_xgboost_model
    # and by `gate` below) also writes MLFLOW_TRACKING_URI into os.environ.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", decoy_uri(tmp_path))
    yield f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.import_mlflow().set_tracking_uri(None)


def decoy_uri(folder: Path) -> str:
    return f"sqlite:///{folder / 'decoy.db'}"


def trips(month: Month, rows: int, seed: int) -> pd.DataFrame:
    return prepare_trips(generate_trips_table("green", month, rows, seed=seed).to_pandas(), "green")


@dataclass
class LoggedRun:
    """A trained, logged run as the training notebook leaves it (still RUNNING)."""

    run_id: str
    model_uri: str
    booster: xgb.Booster
    matrices: FeatureMatrices
    validation: pd.DataFrame
    validation_month: str
    rmse: float


def train_and_log(
    uri: str,
    folder: Path,
    name: str,
    train: pd.DataFrame,
    validation: pd.DataFrame,
    validation_month: str,
    rounds: int,
    log_preprocessor: bool = True,
) -> LoggedRun:
    matrices = build_matrices(train, validation)
    booster = train_booster(matrices.X_train, matrices.y_train, matrices.X_val, matrices.y_val, num_boost_round=rounds)
    predictions = predict(booster, matrices.X_val)
    run_id = tracking.start_run(
        uri, EXPERIMENT, name, params={"num_boost_round": rounds}, tags={"taxi.validation_month": validation_month}
    )
    if log_preprocessor:
        path = folder / name / "preprocessor.b"
        save_preprocessor(path, matrices.vectorizer)
        tracking.log_files(uri, run_id, [path], "preprocessor")
    model_uri = tracking.log_xgboost_model(uri, run_id, booster, matrices.X_val[:5], predictions[:5])
    return LoggedRun(
        run_id, model_uri, booster, matrices, validation, validation_month, rmse(matrices.y_val, predictions)
    )


def gate(uri: str, run: LoggedRun, as_frame: bool = False) -> registry.PromotionDecision:
    # MLflow's process-wide URI points at another store, as in a process that never called
    # log_xgboost_model: a gate that used it (mlflow.register_model, load_model("models:/..."))
    # would find no registered model, or a stranger's, and these tests would fail.
    tracking.import_mlflow().set_tracking_uri(decoy_uri(Path(uri.removeprefix("sqlite:///")).parent))
    records = run.validation if as_frame else feature_records(run.validation)
    return registry.register_and_gate(
        uri, run.run_id, run.model_uri, records, run.matrices.y_val, run.rmse, run.validation_month
    )


def rescored_independently(champion: LoggedRun, challenger: LoggedRun) -> float:
    """The champion on the challenger's trips, through the champion's own vectorizer."""
    X = champion.matrices.vectorizer.transform(feature_records(challenger.validation))
    return rmse(challenger.matrices.y_val, champion.booster.predict(xgb.DMatrix(X)))


def champion_version(uri: str) -> str:
    # str(): the SQL store hands versions back as int, the REST store as str.
    return str(tracking._client(uri).get_model_version_by_alias(MODEL, registry.CHAMPION_ALIAS).version)


def run_of(uri: str, run_id: str):
    return tracking._client(uri).get_run(run_id)


# Champion: small February sample validated on March. Challenger: larger March sample validated
# on April. Different months and sizes give the two vectorizers different vocabularies.
def champion_data() -> tuple[pd.DataFrame, pd.DataFrame, str]:
    return trips(Month(2023, 2), 400, seed=1), trips(Month(2023, 3), 300, seed=1), "2023-03"


def challenger_data() -> tuple[pd.DataFrame, pd.DataFrame, str]:
    return trips(Month(2023, 3), 1500, seed=2), trips(Month(2023, 4), 500, seed=2), "2023-04"


def test_first_model_becomes_champion(uri, tmp_path):
    first = train_and_log(uri, tmp_path, "first", *champion_data(), rounds=5)

    decision = gate(uri, first)

    assert (decision.version, decision.promoted) == ("1", True)
    assert decision.champion_version is None and decision.champion_rmse is None
    assert "first" in decision.reason
    assert champion_version(uri) == "1"
    version = tracking._client(uri).get_model_version(MODEL, "1")
    assert version.run_id == first.run_id
    assert version.tags[registry.VERSION_TAG_RUN_ID] == first.run_id
    assert version.tags[registry.VERSION_TAG_VALIDATION_MONTH] == "2023-03"
    assert version.tags[registry.VERSION_TAG_MODEL_URI] == first.model_uri
    run = run_of(uri, first.run_id)
    assert run.info.status == "RUNNING"  # the flow, not the gate, ends the run
    assert run.data.tags["taxi.promotion.decision"] == "promoted"
    assert "first" in run.data.tags["taxi.promotion.reason"]
    assert run.data.tags["taxi.promotion.registered_version"] == "1"
    assert run.data.tags["taxi.promotion.champion_version"] == registry.NO_CHAMPION
    assert float(run.data.tags["taxi.promotion.challenger_rmse"]) == first.rmse
    assert decision.report_line() == f"Model registry: {MODEL} v1 promoted to champion; {decision.reason}"


def test_worse_challenger_leaves_the_champion_and_is_compared_on_its_own_month(uri, tmp_path):
    champion = train_and_log(uri, tmp_path, "champion", *champion_data(), rounds=30)
    gate(uri, champion)
    worse = train_and_log(uri, tmp_path, "worse", *challenger_data(), rounds=1)

    decision = gate(uri, worse)

    expected = rescored_independently(champion, worse)
    assert decision.champion_rmse == pytest.approx(expected, rel=1e-9)
    # Re-scored on April, not the RMSE the champion logged for March.
    assert decision.champion_rmse != pytest.approx(champion.rmse, rel=1e-3)
    assert decision.challenger_rmse > decision.champion_rmse
    assert (decision.version, decision.promoted, decision.champion_version) == ("2", False, "1")
    assert champion_version(uri) == "1"
    assert decision.reason.startswith("champion v1 (") and "on 2023-04) stays" in decision.reason
    tags = run_of(uri, worse.run_id).data.tags
    assert tags["taxi.promotion.decision"] == "kept"
    assert float(tags["taxi.promotion.champion_rmse"]) == decision.champion_rmse
    assert tags["taxi.promotion.champion_version"] == "1"
    assert tags["taxi.promotion.registered_version"] == "2"
    version_tags = tracking._client(uri).get_model_version(MODEL, "2").tags
    assert version_tags["taxi.promotion.decision"] == "kept"
    assert version_tags["taxi.validation_month"] == "2023-04"
    assert f"{MODEL} v2 registered, not champion" in decision.report_line()
    # Nothing went through MLflow's process-wide URI (`gate` points it at this file).
    assert not (tmp_path / "decoy.db").exists()


def test_better_challenger_becomes_champion(uri, tmp_path):
    champion = train_and_log(uri, tmp_path, "champion", *champion_data(), rounds=1)
    gate(uri, champion)
    better = train_and_log(uri, tmp_path, "better", *challenger_data(), rounds=30)

    decision = gate(uri, better, as_frame=True)  # the prepared frame, extra columns and all

    assert decision.champion_rmse == pytest.approx(rescored_independently(champion, better), rel=1e-9)
    assert decision.challenger_rmse < decision.champion_rmse
    assert (decision.version, decision.promoted, decision.champion_version) == ("2", True, "1")
    assert champion_version(uri) == "2"
    assert "beats champion v1 re-scored on 2023-04" in decision.reason
    assert run_of(uri, better.run_id).data.tags["taxi.promotion.decision"] == "promoted"


@pytest.mark.parametrize("champion_vocabulary", ["narrower", "wider"])
def test_champion_is_scored_in_its_own_feature_space(uri, tmp_path, champion_vocabulary):
    small = trips(Month(2023, 1), 150, seed=3), trips(Month(2023, 2), 150, seed=3), "2023-02"
    large = trips(Month(2023, 5), 1500, seed=4), trips(Month(2023, 6), 400, seed=4), "2023-06"
    champion_data_, challenger_data_ = (small, large) if champion_vocabulary == "narrower" else (large, small)
    champion = train_and_log(uri, tmp_path, "champion", *champion_data_, rounds=10)
    gate(uri, champion)
    challenger = train_and_log(uri, tmp_path, "challenger", *challenger_data_, rounds=10)
    champion_width = len(champion.matrices.feature_names)
    challenger_width = len(challenger.matrices.feature_names)
    assert champion_width != challenger_width

    # What a gate that reused the challenger's matrix would do: fail on width, or silently
    # read the wrong columns (trip_distance sits at a different index in each vocabulary).
    if champion_width < challenger_width:
        with pytest.raises(xgb.core.XGBoostError, match="Number of columns does not match"):
            predict(champion.booster, challenger.matrices.X_val)
    else:
        naive = rmse(challenger.matrices.y_val, predict(champion.booster, challenger.matrices.X_val))
        assert naive != pytest.approx(rescored_independently(champion, challenger), rel=1e-3)

    decision = gate(uri, challenger)

    assert decision.champion_rmse == pytest.approx(rescored_independently(champion, challenger), rel=1e-9)
    assert decision.promoted == (challenger.rmse < decision.champion_rmse)


def test_missing_champion_preprocessor_is_named_and_changes_nothing(uri, tmp_path):
    champion = train_and_log(uri, tmp_path, "champion", *champion_data(), rounds=5, log_preprocessor=False)
    gate(uri, champion)  # the first model needs no re-scoring
    challenger = train_and_log(uri, tmp_path, "challenger", *challenger_data(), rounds=5)

    with pytest.raises(registry.MissingChampionArtifactError) as raised:
        gate(uri, challenger)

    message = str(raised.value)
    assert champion.run_id in message and "preprocessor/preprocessor.b" in message and "version 1" in message
    assert isinstance(raised.value, FileNotFoundError)
    # Scored before writing: no version registered for the challenger, alias and run untouched.
    assert [str(v.version) for v in tracking._client(uri).search_model_versions(f"name = '{MODEL}'")] == ["1"]
    assert champion_version(uri) == "1"
    assert not any(key.startswith("taxi.promotion.") for key in run_of(uri, challenger.run_id).data.tags)


def test_a_model_of_another_run_is_refused(uri, tmp_path):
    first = train_and_log(uri, tmp_path, "first", *champion_data(), rounds=2)
    other_run = tracking.start_run(uri, EXPERIMENT, "other", params={}, tags={})
    with pytest.raises(ValueError, match=f"logged by run {first.run_id}, not run {other_run}"):
        registry.register_and_gate(
            uri, other_run, first.model_uri, feature_records(first.validation), first.matrices.y_val, first.rmse,
            "2023-03",
        )


# Input checks and the decision's wording: refused before any MLflow store is opened.

ONE_TRIP = [{"PU_DO": "1_2", "trip_distance": 1.0}]


def gate_inputs(**overrides):
    arguments = {
        "tracking_uri": "sqlite:///never-opened.db", "run_id": "run", "model_uri": "models:/m-1",
        "validation_records": ONE_TRIP, "y_val": np.array([5.0]), "challenger_rmse": 5.0, "validation_month": "2023-04",
    }
    return registry.register_and_gate(**{**arguments, **overrides})


@pytest.mark.parametrize(
    "model_uri", ["runs:/abc/model", "models:/nyc-taxi-duration/3", "models:/name@champion", "models:/"]
)
def test_only_logged_model_uris_are_accepted(model_uri):
    with pytest.raises(ValueError, match="expected a logged model URI"):
        gate_inputs(model_uri=model_uri)


def test_targets_must_match_records():
    with pytest.raises(ValueError, match=r"one target per validation record \(1\)"):
        gate_inputs(y_val=np.array([5.0, 6.0]))


def test_frame_without_feature_columns_is_refused():
    with pytest.raises(ValueError, match="trip_distance"):
        gate_inputs(validation_records=pd.DataFrame({"PU_DO": ["1_2"]}))


def test_non_finite_challenger_rmse_is_refused():
    with pytest.raises(ValueError, match="finite"):
        gate_inputs(challenger_rmse=float("nan"))


def test_equal_rmse_keeps_the_champion_and_prints_enough_digits():
    tie = registry._decide(MODEL, "4", 5.4, 5.4, "3", "2023-04")
    assert not tie.promoted and "is not better" in tie.reason
    close = registry._decide(MODEL, "4", 5.41201, 5.41249, "3", "2023-04")
    assert close.promoted
    assert close.reason == "challenger RMSE 5.4120 beats champion v3 re-scored on 2023-04: 5.4125"


def test_missing_alias_on_existing_model_says_so():
    decision = registry._decide(MODEL, "5", 5.0, None, None, "2023-04")
    assert decision.promoted and decision.reason == f"no champion alias on {MODEL}: version 5 becomes champion"
    assert decision.tags()["taxi.promotion.champion_rmse"] == registry.NO_CHAMPION


def test_tags_are_the_documented_keys():
    decision = registry._decide(MODEL, "4", 5.0, 5.5, "3", "2023-04")
    assert decision.tags() == {
        "taxi.promotion.decision": "promoted",
        "taxi.promotion.reason": decision.reason,
        "taxi.promotion.challenger_rmse": "5.0",
        "taxi.promotion.champion_rmse": "5.5",
        "taxi.promotion.champion_version": "3",
        "taxi.promotion.registered_version": "4",
    }
