"""The promotion gate against a real SQLite MLflow store, with real boosters and vectorizers.

Each test trains tiny XGBoost models on synthetic trips, logs them as the training notebook
does (the servable Pipeline via log_servable_model; the bare booster via log_xgboost_model
where a test needs it) and gates the servable model on raw validation trips. The champion's
expected RMSE is always computed here independently, from the in-memory booster and the
DictVectorizer it was trained with (scikit-learn's own `transform` on feature records), never
through the registry or serving code under test.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xgboost as xgb

from taxi_duration import serving
from taxi_duration.data.periods import Month, parse_month
from taxi_duration.data.synthetic import generate_trips_table
from taxi_duration.modeling import drift
from taxi_duration.modeling.features import (
    RAW_FEATURES,
    FeatureMatrices,
    build_matrices,
    feature_records,
    prepare_trips,
)
from taxi_duration.modeling.model import predict, rmse, train_booster
from taxi_duration.settings import ENVIRONMENT_DEFAULTS
from taxi_duration.tracking import mlflow_runs, registry

MODEL = registry.DEFAULT_REGISTERED_MODEL
EXPERIMENT = "registry-tests"


@pytest.fixture(autouse=True)
def one_xgboost_thread():
    # The matrices are tiny; one thread avoids OpenMP spin-waits when the machine is busy.
    with xgb.config_context(nthread=1):
        yield


@pytest.fixture
def uri(tmp_path, monkeypatch, empty_tracking_store) -> str:
    """A fresh SQLite store for the test (its artifacts go beside it, in tmp_path).

    A copy of the session's migrated empty store: building the schema anew costs seconds.
    """
    for key, value in ENVIRONMENT_DEFAULTS.items():
        monkeypatch.setenv(key, value)
    # Recorded so teardown restores them: mlflow.set_tracking_uri and mlflow.set_experiment
    # (called by the log_* helpers and by `gate` below) write MLFLOW_TRACKING_URI and
    # MLFLOW_EXPERIMENT_ID into os.environ.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", decoy_uri(tmp_path))
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", "")
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID")
    shutil.copyfile(empty_tracking_store, tmp_path / "mlflow.db")
    yield f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow_runs.import_mlflow().set_tracking_uri(None)


def decoy_uri(folder: Path) -> str:
    return f"sqlite:///{folder / 'decoy.db'}"


def trips(month: Month, rows: int, seed: int) -> pd.DataFrame:
    return prepare_trips(generate_trips_table("green", month, rows, seed=seed).to_pandas(), "green")


@dataclass
class LoggedRun:
    """A trained, logged run as the training notebook leaves it (still RUNNING)."""

    run_id: str
    model_uri: str  # the servable model, or the booster when logged without one
    booster_uri: str | None
    booster: xgb.Booster
    matrices: FeatureMatrices
    validation: pd.DataFrame  # prepared trips: raw fields plus duration and PU_DO
    validation_month: str
    rmse: float

    @property
    def train_month(self) -> str:
        """The month before the validation month, as in every pipeline run."""
        return parse_month(self.validation_month).previous().label()


def train_and_log(
    uri: str,
    name: str,
    train: pd.DataFrame,
    validation: pd.DataFrame,
    validation_month: str,
    rounds: int,
    *,
    log_booster: bool = False,
    servable: bool = True,
) -> LoggedRun:
    matrices = build_matrices(train, validation)
    booster = train_booster(matrices.X_train, matrices.y_train, matrices.X_val, matrices.y_val, num_boost_round=rounds)
    predictions = predict(booster, matrices.X_val)
    train_month = parse_month(validation_month).previous().label()
    run_id = mlflow_runs.start_run(  # tagged as the flow tags its runs
        uri,
        EXPERIMENT,
        name,
        params={"num_boost_round": rounds},
        tags={"taxi.train_month": train_month, "taxi.validation_month": validation_month},
    )
    booster_uri = None
    if log_booster or not servable:
        booster_uri = mlflow_runs.log_xgboost_model(uri, run_id, booster, matrices.X_val[:5], predictions[:5])
    model_uri = booster_uri
    if servable:
        profile = drift.trip_profile("train", matrices.training_column("trip_distance"), matrices.y_train)
        pipeline = serving.servable_model(matrices.vectorizer, booster)
        model_uri = mlflow_runs.log_servable_model(uri, run_id, pipeline, serving.input_example(validation), profile)
    return LoggedRun(
        run_id,
        model_uri,
        booster_uri,
        booster,
        matrices,
        validation,
        validation_month,
        rmse(matrices.y_val, predictions),
    )


def raw_records(run: LoggedRun) -> list[dict]:
    """The run's validation trips as a request sends them: only the raw fields, one dict each."""
    return run.validation[RAW_FEATURES].to_dict(orient="records")


def gate(uri: str, run: LoggedRun, as_frame: bool = False, with_train_month: bool = True) -> registry.PromotionDecision:
    # MLflow's process-wide URI points at another store, as in a process that never called
    # the log_* helpers: a gate that used it (mlflow.register_model, load_model("models:/..."))
    # would find no registered model, or a stranger's, and these tests would fail.
    mlflow_runs.import_mlflow().set_tracking_uri(decoy_uri(Path(uri.removeprefix("sqlite:///")).parent))
    records = run.validation if as_frame else raw_records(run)
    return registry.register_and_gate(
        uri,
        run.run_id,
        run.model_uri,
        records,
        run.matrices.y_val,
        run.rmse,
        run.validation_month,
        train_month=run.train_month if with_train_month else None,
    )


def rescored_independently(champion: LoggedRun, challenger: LoggedRun) -> float:
    """The champion on the challenger's trips, through the champion's own vectorizer and trees."""
    X = champion.matrices.vectorizer.transform(feature_records(challenger.validation))
    # The trees up to early stopping's best iteration, as the servable model's XGBRegressor uses.
    trees = (0, champion.booster.best_iteration + 1)
    return rmse(challenger.matrices.y_val, champion.booster.predict(xgb.DMatrix(X), iteration_range=trees))


def champion_version(uri: str) -> str:
    # str(): the SQL store hands versions back as int, the REST store as str.
    return str(mlflow_runs.mlflow_client(uri).get_model_version_by_alias(MODEL, registry.CHAMPION_ALIAS).version)


def version_numbers(uri: str) -> list[str]:
    return sorted(str(v.version) for v in mlflow_runs.mlflow_client(uri).search_model_versions(f"name = '{MODEL}'"))


def run_of(uri: str, run_id: str):
    return mlflow_runs.mlflow_client(uri).get_run(run_id)


# Champion: small February sample validated on March. Challenger: larger March sample validated
# on April. Different months and sizes give the two vectorizers different vocabularies.
def champion_data() -> tuple[pd.DataFrame, pd.DataFrame, str]:
    return trips(Month(2023, 2), 400, seed=1), trips(Month(2023, 3), 300, seed=1), "2023-03"


def challenger_data() -> tuple[pd.DataFrame, pd.DataFrame, str]:
    return trips(Month(2023, 3), 1500, seed=2), trips(Month(2023, 4), 500, seed=2), "2023-04"


def test_first_model_becomes_champion(uri, tmp_path):
    # As the notebook does: booster and servable model both logged on the run; the servable is gated.
    first = train_and_log(uri, "first", *champion_data(), rounds=5, log_booster=True)
    assert first.booster_uri != first.model_uri

    decision = gate(uri, first)

    assert (decision.version, decision.promoted) == ("1", True)
    assert decision.champion_version is None and decision.champion_rmse is None
    assert decision.reason == "first registered model becomes champion"
    assert champion_version(uri) == "1"
    version = mlflow_runs.mlflow_client(uri).get_model_version(MODEL, "1")
    assert version.run_id == first.run_id
    # The servable model's files, not the booster's (the SQL store keeps no model_id on versions).
    client = mlflow_runs.mlflow_client(uri)
    assert version.source == client.get_logged_model(first.model_uri.removeprefix("models:/")).artifact_location
    assert version.source != client.get_logged_model(first.booster_uri.removeprefix("models:/")).artifact_location
    assert version.tags[registry.VERSION_TAG_RUN_ID] == first.run_id
    assert version.tags[registry.VERSION_TAG_VALIDATION_MONTH] == "2023-03"
    assert version.tags[registry.VERSION_TAG_TRAIN_MONTH] == "2023-02"
    assert version.tags["taxi.promotion.comparison"] == registry.NOT_COMPARED
    assert version.tags[registry.VERSION_TAG_MODEL_URI] == first.model_uri
    assert float(version.tags[registry.VERSION_TAG_VALIDATION_RMSE]) == first.rmse
    assert registry.version_run_id(uri, MODEL, "1") == first.run_id
    run = run_of(uri, first.run_id)
    assert run.info.status == "RUNNING"  # the flow, not the gate, ends the run
    assert run.data.tags["taxi.promotion.decision"] == "promoted"
    assert "first" in run.data.tags["taxi.promotion.reason"]
    assert run.data.tags["taxi.promotion.registered_version"] == "1"
    assert run.data.tags["taxi.promotion.champion_version"] == registry.NO_CHAMPION
    assert run.data.tags["taxi.promotion.champion_rmse"] == registry.NO_CHAMPION
    assert float(run.data.tags["taxi.promotion.challenger_rmse"]) == first.rmse
    assert decision.report_line() == f"Model registry: {MODEL} v1 promoted to champion; {decision.reason}"

    # What got registered is the servable Pipeline, with the training profile in its metadata.
    pipeline, metadata = registry.load_servable(uri, MODEL, "1")
    np.testing.assert_allclose(
        pipeline.predict(pd.DataFrame(raw_records(first))), predict(first.booster, first.matrices.X_val), rtol=1e-6
    )
    assert metadata[mlflow_runs.TRAINING_PROFILE_KEY]["trips"] == first.matrices.X_train.shape[0]
    assert not (tmp_path / "decoy.db").exists()


def test_worse_challenger_leaves_the_champion_and_is_compared_on_its_own_month(uri, tmp_path):
    champion = train_and_log(uri, "champion", *champion_data(), rounds=30)
    gate(uri, champion)
    worse = train_and_log(uri, "worse", *challenger_data(), rounds=1)

    decision = gate(uri, worse)

    expected = rescored_independently(champion, worse)
    assert decision.champion_rmse == pytest.approx(expected, rel=1e-6)
    assert registry.rescore_version(uri, MODEL, "1", raw_records(worse), worse.matrices.y_val) == decision.champion_rmse
    # Re-scored on April, not the RMSE the champion logged for March.
    assert decision.champion_rmse != pytest.approx(champion.rmse, rel=1e-3)
    assert decision.challenger_rmse > decision.champion_rmse
    assert (decision.version, decision.promoted, decision.champion_version) == ("2", False, "1")
    assert champion_version(uri) == "1"
    assert decision.reason.startswith("champion v1 (") and "on 2023-04) stays" in decision.reason
    tags = run_of(uri, worse.run_id).data.tags
    assert tags["taxi.promotion.decision"] == "kept"
    assert tags["taxi.promotion.comparison"] == registry.COMPARED
    assert float(tags["taxi.promotion.champion_rmse"]) == decision.champion_rmse
    assert tags["taxi.promotion.champion_version"] == "1"
    assert tags["taxi.promotion.registered_version"] == "2"
    version_tags = mlflow_runs.mlflow_client(uri).get_model_version(MODEL, "2").tags
    assert version_tags["taxi.promotion.decision"] == "kept"
    assert version_tags["taxi.promotion.reason"] == decision.reason
    assert version_tags["taxi.validation_month"] == "2023-04"
    assert f"{MODEL} v2 registered, not champion" in decision.report_line()
    # Nothing went through MLflow's process-wide URI (`gate` points it at this file).
    assert not (tmp_path / "decoy.db").exists()


def test_better_challenger_becomes_champion(uri, tmp_path):
    champion = train_and_log(uri, "champion", *champion_data(), rounds=1)
    gate(uri, champion)
    better = train_and_log(uri, "better", *challenger_data(), rounds=30)

    decision = gate(uri, better, as_frame=True)  # the prepared frame, extra columns (PU_DO, duration) and all

    assert decision.champion_rmse == pytest.approx(rescored_independently(champion, better), rel=1e-6)
    assert decision.challenger_rmse < decision.champion_rmse
    assert (decision.version, decision.promoted, decision.champion_version) == ("2", True, "1")
    assert champion_version(uri) == "2"
    assert "beats champion v1 re-scored on 2023-04" in decision.reason
    assert run_of(uri, better.run_id).data.tags["taxi.promotion.decision"] == "promoted"
    assert mlflow_runs.mlflow_client(uri).get_model_version(MODEL, "2").tags["taxi.promotion.decision"] == "promoted"


@pytest.mark.parametrize("champion_vocabulary", ["narrower", "wider"])
def test_champion_is_scored_in_its_own_feature_space(uri, tmp_path, champion_vocabulary):
    small = trips(Month(2023, 1), 150, seed=3), trips(Month(2023, 2), 150, seed=3), "2023-02"
    large = trips(Month(2023, 5), 1500, seed=4), trips(Month(2023, 6), 400, seed=4), "2023-06"
    champion_data_, challenger_data_ = (small, large) if champion_vocabulary == "narrower" else (large, small)
    champion = train_and_log(uri, "champion", *champion_data_, rounds=10)
    gate(uri, champion)
    challenger = train_and_log(uri, "challenger", *challenger_data_, rounds=10)
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

    assert decision.champion_rmse == pytest.approx(rescored_independently(champion, challenger), rel=1e-6)
    assert decision.promoted == (challenger.rmse < decision.champion_rmse)


@pytest.mark.parametrize("champion_month_from", ["version tag", "run tag"])
def test_champion_trained_on_the_validation_month_stays_without_an_in_sample_comparison(
    uri, tmp_path, champion_month_from
):
    # A backfill of the month before the champion's: champion trained on March, challenger validated on March.
    champion = train_and_log(uri, "champion", *challenger_data(), rounds=1)
    # Versions registered before the version tag existed: the month comes from the champion's run.
    gate(uri, champion, with_train_month=champion_month_from == "version tag")
    client = mlflow_runs.mlflow_client(uri)
    assert (registry.VERSION_TAG_TRAIN_MONTH in client.get_model_version(MODEL, "1").tags) == (
        champion_month_from == "version tag"
    )
    earlier = train_and_log(uri, "earlier", *champion_data(), rounds=30)
    assert earlier.validation_month == "2023-03" and champion.train_month == "2023-03"

    decision = gate(uri, earlier)

    assert (decision.version, decision.promoted, decision.champion_version) == ("2", False, "1")
    assert decision.champion_rmse is None, "the champion's in-sample score is not computed as a comparison"
    assert decision.comparison == registry.NO_FAIR_COMPARISON
    assert decision.reason == (
        f"champion v1 stays: no fair comparison, as it was trained on 2023-03, the validation month "
        f"(challenger {earlier.rmse:.3f} is not compared with an in-sample score)"
    )
    assert champion_version(uri) == "1"
    tags = run_of(uri, earlier.run_id).data.tags
    assert tags["taxi.promotion.decision"] == "kept"
    assert tags["taxi.promotion.comparison"] == "unfair"
    assert tags["taxi.promotion.reason"] == decision.reason
    assert tags["taxi.promotion.champion_rmse"] == registry.NO_CHAMPION
    version_tags = client.get_model_version(MODEL, "2").tags
    assert version_tags["taxi.promotion.comparison"] == "unfair"
    assert version_tags["taxi.promotion.reason"] == decision.reason
    assert version_tags[registry.VERSION_TAG_TRAIN_MONTH] == "2023-02"
    assert "registered, not champion; champion v1 stays: no fair comparison" in decision.report_line()

    # A month neither was trained on is compared as usual: the champion is re-scored on April.
    later = train_and_log(uri, "later", *challenger_data(), rounds=30)
    later_decision = gate(uri, later)
    assert later_decision.comparison == registry.COMPARED
    assert later_decision.champion_rmse == pytest.approx(rescored_independently(champion, later), rel=1e-6)
    assert not (tmp_path / "decoy.db").exists()


def register_bare_booster(uri: str, run: LoggedRun) -> str:
    """Register `run`'s booster as champion, as a version of the project before the servable model did."""
    client = mlflow_runs.mlflow_client(uri)
    logged_model = client.get_logged_model(run.booster_uri.removeprefix("models:/"))
    version = registry._create_version(client, MODEL, logged_model, run.run_id, run.validation_month, run.rmse)
    client.set_registered_model_alias(MODEL, registry.CHAMPION_ALIAS, version)
    return version


def test_bare_booster_champion_is_replaced_by_a_servable_challenger_and_the_gate_works_after(uri, tmp_path):
    old = train_and_log(uri, "old", *champion_data(), rounds=30, servable=False)
    assert register_bare_booster(uri, old) == "1"
    with pytest.raises(registry.NotServableModelError, match=r"version 1 is a .*xgboost model") as raised:
        registry.rescore_version(uri, MODEL, "1", raw_records(old), old.matrices.y_val)
    assert isinstance(raised.value, registry.RegistryError)
    not_servable = str(raised.value)
    assert "not the servable Pipeline" in not_servable

    # Worse than the old booster is on the same trips (1 round against 30): it replaces it all
    # the same, since the booster cannot be re-scored on raw trips.
    challenger = train_and_log(uri, "challenger", *challenger_data(), rounds=1)
    assert rescored_independently(old, challenger) < challenger.rmse
    decision = gate(uri, challenger)

    assert (decision.version, decision.promoted, decision.champion_version) == ("2", True, "1")
    assert decision.champion_rmse is None
    assert decision.reason == f"{not_servable}; version 2 becomes champion"
    assert champion_version(uri) == "2"
    tags = run_of(uri, challenger.run_id).data.tags
    assert tags["taxi.promotion.decision"] == "promoted"
    assert tags["taxi.promotion.reason"] == decision.reason
    assert tags["taxi.promotion.champion_version"] == "1"
    assert tags["taxi.promotion.champion_rmse"] == registry.NO_CHAMPION
    assert mlflow_runs.mlflow_client(uri).get_model_version(MODEL, "2").tags["taxi.promotion.reason"] == decision.reason

    # The servable champion is now re-scored as usual: a worse challenger keeps it.
    # Validated on May: v2 was trained on March, so the comparison is a fair one.
    worse = train_and_log(
        uri, "worse", trips(Month(2023, 4), 400, seed=5), trips(Month(2023, 5), 300, seed=5), "2023-05", rounds=1
    )
    # Gated with an RMSE far above anything v2 can score on these trips: it must be kept out.
    worse.rmse = decision.challenger_rmse + 100.0
    after = gate(uri, worse)

    assert (after.version, after.promoted, after.champion_version) == ("3", False, "2")
    assert after.champion_rmse == pytest.approx(rescored_independently(challenger, worse), rel=1e-6)
    assert "not the servable" not in after.reason and after.reason.startswith("champion v2 (")
    assert champion_version(uri) == "2"
    assert not (tmp_path / "decoy.db").exists()


def test_champion_that_cannot_be_loaded_changes_nothing(uri, tmp_path):
    champion = train_and_log(uri, "champion", *champion_data(), rounds=5)
    gate(uri, champion)  # the first model needs no re-scoring
    client = mlflow_runs.mlflow_client(uri)
    location = client.get_logged_model(champion.model_uri.removeprefix("models:/")).artifact_location
    shutil.rmtree(Path(location.removeprefix("file://")))  # its artifacts lost
    challenger = train_and_log(uri, "challenger", *challenger_data(), rounds=5)

    with pytest.raises(Exception) as raised:
        gate(uri, challenger)

    # Not taken for an old booster: that would replace a champion nobody could check.
    assert not isinstance(raised.value, registry.NotServableModelError)
    # Scored before writing: no version registered for the challenger, alias and run untouched.
    assert version_numbers(uri) == ["1"]
    assert champion_version(uri) == "1"
    assert not any(key.startswith("taxi.promotion.") for key in run_of(uri, challenger.run_id).data.tags)


def test_a_model_of_another_run_is_refused(uri, tmp_path):
    first = train_and_log(uri, "first", *champion_data(), rounds=2)
    other_run = mlflow_runs.start_run(uri, EXPERIMENT, "other", params={}, tags={})
    with pytest.raises(ValueError, match=f"logged by run {first.run_id}, not run {other_run}"):
        registry.register_and_gate(
            uri,
            other_run,
            first.model_uri,
            raw_records(first),
            first.matrices.y_val,
            first.rmse,
            "2023-03",
        )
    assert version_numbers(uri) == []
    assert not any(key.startswith("taxi.promotion.") for key in run_of(uri, other_run).data.tags)


# Input checks and the decision's wording: refused before any MLflow store is opened.

ONE_TRIP = [{"PULocationID": 1, "DOLocationID": 2, "trip_distance": 1.0}]


@pytest.fixture
def gate_inputs(tmp_path):
    store = tmp_path / "never-opened.db"

    def call(**overrides):
        arguments = {
            "tracking_uri": f"sqlite:///{store}",
            "run_id": "run",
            "model_uri": "models:/m-1",
            "validation_records": ONE_TRIP,
            "y_val": np.array([5.0]),
            "challenger_rmse": 5.0,
            "validation_month": "2023-04",
        }
        return registry.register_and_gate(**{**arguments, **overrides})

    yield call
    assert not store.exists(), "an input check opened the MLflow store before refusing"


@pytest.mark.parametrize(
    "model_uri", ["runs:/abc/model", "models:/nyc-taxi-duration/3", "models:/name@champion", "models:/"]
)
def test_only_logged_model_uris_are_accepted(gate_inputs, model_uri):
    with pytest.raises(ValueError, match="expected a logged model URI"):
        gate_inputs(model_uri=model_uri)


def test_targets_must_match_records(gate_inputs):
    with pytest.raises(ValueError, match=r"one target per validation record \(1\)"):
        gate_inputs(y_val=np.array([5.0, 6.0]))


def test_no_validation_records_are_refused(gate_inputs):
    with pytest.raises(ValueError, match="no validation records"):
        gate_inputs(validation_records=pd.DataFrame(columns=RAW_FEATURES), y_val=np.array([]))


@pytest.mark.parametrize("missing", RAW_FEATURES)
def test_records_without_a_raw_column_are_refused_naming_it(gate_inputs, missing):
    trip = {key: value for key, value in ONE_TRIP[0].items() if key != missing}
    with pytest.raises(ValueError, match=f"lack the column\\(s\\) \\['{missing}'\\]"):
        gate_inputs(validation_records=[trip])


def test_old_pu_do_records_are_refused_naming_the_zone_columns(gate_inputs):
    # What 02_features saved before the servable model: PU_DO and trip_distance only.
    with pytest.raises(ValueError) as raised:
        gate_inputs(validation_records=pd.DataFrame({"PU_DO": ["1_2"], "trip_distance": [1.0]}))
    assert "PULocationID" in str(raised.value) and "DOLocationID" in str(raised.value)
    assert "'trip_distance'" not in str(raised.value).split(";")[0]


def test_non_finite_challenger_rmse_is_refused(gate_inputs):
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


def test_not_servable_champion_is_replaced_whatever_the_rmse():
    decision = registry._decide(MODEL, "5", 99.0, None, "4", "2023-04", not_servable="v4 is a booster")
    assert decision.promoted and decision.reason == "v4 is a booster; version 5 becomes champion"
    assert decision.tags()["taxi.promotion.champion_version"] == "4"
    assert decision.tags()["taxi.promotion.champion_rmse"] == registry.NO_CHAMPION


def test_no_fair_comparison_when_the_champion_trained_on_the_validation_month():
    unfair = registry._decide(MODEL, "4", 5.464, None, "3", "2023-03", champion_train_month="2023-03")
    assert not unfair.promoted and unfair.comparison == registry.NO_FAIR_COMPARISON
    assert unfair.reason == (
        "champion v3 stays: no fair comparison, as it was trained on 2023-03, the validation month "
        "(challenger 5.464 is not compared with an in-sample score)"
    )
    assert unfair.tags()["taxi.promotion.decision"] == "kept"
    assert unfair.tags()["taxi.promotion.comparison"] == "unfair"
    # Trained on another month (earlier or later), or on one nobody recorded: compared as usual.
    for month in ("2023-02", "2023-04", None):
        fair = registry._decide(MODEL, "4", 5.0, 5.5, "3", "2023-03", champion_train_month=month)
        assert fair.promoted and fair.comparison == registry.COMPARED and "beats champion v3" in fair.reason
    # A champion that cannot score raw trips is replaced, whatever month it was trained on.
    replaced = registry._decide(
        MODEL, "4", 5.0, None, "3", "2023-03", not_servable="v3 is a booster", champion_train_month="2023-03"
    )
    assert replaced.promoted and replaced.comparison == registry.NOT_COMPARED


def test_tags_are_the_documented_keys():
    decision = registry._decide(MODEL, "4", 5.0, 5.5, "3", "2023-04")
    assert decision.tags() == {
        "taxi.promotion.decision": "promoted",
        "taxi.promotion.reason": decision.reason,
        "taxi.promotion.comparison": "rescored",
        "taxi.promotion.challenger_rmse": "5.0",
        "taxi.promotion.champion_rmse": "5.5",
        "taxi.promotion.champion_version": "3",
        "taxi.promotion.registered_version": "4",
    }
