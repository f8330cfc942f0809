"""Typed manifests: each kind round-trips, older files (no `kind`) read by their keys, any other stage reads as the base."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from taxi_duration import manifests, runfiles
from taxi_duration.data.periods import Month

# Manifests as the notebooks wrote them before `kind` and `run_record` existed (a real run's
# files, the busiest zones and distance buckets cut to two rows).
OLD_EXPLORE = {
    "busiest_zones": {
        "dropoff": [{"share": 0.05295375048581422, "trips": 3815, "zone": "74"}],
        "pickup": [
            {"share": 0.1906751429681861, "trips": 13737, "zone": "74"},
            {"share": 0.13926211759480317, "trips": 10033, "zone": "75"},
        ],
    },
    "columns": 20,
    "distinct_dropoff_zones": 245,
    "distinct_pickup_zones": 215,
    "duration_median_minutes": 11.6,
    "duration_p99_minutes": 64.56666666666666,
    "duration_quantiles": {"p01": 0.08333333333333333, "p50": 11.6, "p99": 64.56666666666666},
    "filter": {
        "dropped_share": 0.03681083782133141,
        "kept": 69392,
        "rows": 72044,
        "too_long": 884,
        "too_long_share": 0.012270279273777137,
        "too_short": 1768,
        "too_short_share": 0.024540558547554273,
        "unknown_duration": 0,
    },
    "nulls": {"RatecodeID": 4537, "ehail_fee": 72044},
    "rows": 72044,
    "rows_kept_by_filter": 69392,
    "share_dropped_by_filter": 0.03681083782133141,
    "stage": "01_explore",
    "trip_file": "/data/tlc/green_tripdata_2023-03.parquet",
}
OLD_FEATURES = {
    "color": "green",
    "files": {
        "X_train": "features/X_train.npz",
        "X_val": "features/X_val.npz",
        "preprocessor": "preprocessor.b",
        "validation_records": "features/validation_records.parquet",
        "y_train": "features/y_train.npy",
        "y_val": "features/y_val.npy",
    },
    "month": 3,
    "n_features": 6053,
    "pu_do_vocabulary": 6052,
    "stage": "02_features",
    "train_file": "/data/tlc/green_tripdata_2023-03.parquet",
    "train_month": "2023-03",
    "train_nnz": 138784,
    "train_rows": 69392,
    "unseen_pu_do_share": 0.052144365582178186,
    "val_nnz": 122674,
    "val_rows": 62979,
    "validation_file": "/data/tlc/green_tripdata_2023-04.parquet",
    "validation_month": "2023-04",
    "year": 2023,
}
OLD_TRAINING = {
    "booster_uri": "models:/m-fb82608ea2554976a5efe2fb14ee8b0c",
    "error_by_distance": [
        {"mean_error": 0.33054479265990044, "miles": "[0.0, 1.0)", "rmse": 6.160904259855871, "trips": 11271},
        {"mean_error": -0.053514510570825784, "miles": "[20.0, inf)", "rmse": 13.780856728360604, "trips": 123},
    ],
    "metrics": {
        "baseline_rmse": 9.646975633595641,
        "best_iteration": 29,
        "n_features": 6053,
        "rmse": 5.470922595809529,
        "train_nnz": 138784,
        "train_rows": 69392,
        "val_nnz": 122674,
        "val_rows": 62979,
    },
    "mlflow_run_id": "ad77d290c86e47dcaa320f493ebeb666",
    "model_uri": "models:/m-86b14ea40a4b4f0fb0aecc97bbeaea95",
    "previous_best": None,
    "promotion": {
        "taxi.promotion.challenger_rmse": "5.470922595809529",
        "taxi.promotion.champion_rmse": "none",
        "taxi.promotion.champion_version": "none",
        "taxi.promotion.comparison": "none",
        "taxi.promotion.decision": "promoted",
        "taxi.promotion.reason": "first registered model becomes champion",
        "taxi.promotion.registered_version": "1",
    },
    "stage": "03_train",
}
OLD_SCORING = {
    "color": "green",
    "files": {"predictions": "predictions/green_2023-05.parquet", "refused": "refused/green_2023-05.parquet"},
    "has_actuals": True,
    "metrics": {
        "distance_psi": 0.005581368115854234,
        "month_trips": 66313.0,
        "refused.trip_distance.too_long": 44,
        "refused_trips": 44,
        "rmse": 5.709917176416008,
        "scored_trips": 66269,
    },
    "model": {
        "name": "nyc-taxi-duration",
        "requested_uri": "models:/nyc-taxi-duration/1",
        "train_month": "2023-03",
        "uri": "models:/nyc-taxi-duration/1",
        "validation_month": "2023-04",
        "validation_rmse": 5.470922595809529,
        "version": "1",
    },
    "month": 5,
    "scored_file": "/data/tlc/green_tripdata_2023-05.parquet",
    "scored_month": "2023-05",
    "stage": "04_score",
    "year": 2023,
}
OLD = {
    "01_explore": (OLD_EXPLORE, manifests.ExploreManifest),
    "02_features": (OLD_FEATURES, manifests.FeaturesManifest),
    "03_train": (OLD_TRAINING, manifests.TrainingManifest),
    "04_score": (OLD_SCORING, manifests.ScoringManifest),
}

RUN_RECORD = manifests.RunRecord(
    params={"max_depth": 30, "learning_rate": 0.0958},
    metrics={"rmse": 5.47, "best_iteration": 29},
    tags={"taxi.model_uri": "models:/m-1"},
    artifacts={"preprocessor": ["preprocessor.b"]},
    tags_when_reused={"taxi.promotion.decision": "reused", "taxi.promotion.reason": "training reused from run abc"},
)


def _write_old(run_dir: Path, stage: str, content: dict[str, Any]) -> None:
    """A manifest file exactly as today's notebooks leave it (runfiles' dict writer)."""
    runfiles.write_manifest(run_dir, stage, {key: value for key, value in content.items() if key != "stage"})


@pytest.mark.parametrize("stage", list(OLD))
def test_an_older_manifest_reads_as_its_kind_by_its_keys_and_writes_the_same_keys_back(
    tmp_path: Path, stage: str
) -> None:
    content, kind = OLD[stage]
    _write_old(tmp_path, stage, content)
    record = manifests.read(tmp_path, stage)
    assert type(record) is kind
    assert record.stage == stage and record.run_record is None and record.extra == {}
    written = record.to_json()
    assert written.pop("kind") == kind.KIND
    assert json.loads(json.dumps(written)) == content  # today's keys and values, nothing lost or added


@pytest.mark.parametrize("stage", list(OLD))
def test_the_kind_comes_from_the_keys_not_from_the_stage_name(tmp_path: Path, stage: str) -> None:
    content, kind = OLD[stage]
    _write_old(tmp_path, "renamed_stage", content)
    assert type(manifests.read(tmp_path, "renamed_stage")) is kind


def test_older_manifests_are_typed(tmp_path: Path) -> None:
    for stage, (content, _) in OLD.items():
        _write_old(tmp_path, stage, content)
    explore = manifests.read(tmp_path, "01_explore")
    assert isinstance(explore, manifests.ExploreManifest)
    assert explore.metrics["rows"] == 72044 and explore.duration_filter["kept"] == 69392
    assert explore.busiest_zones["pickup"][1] == manifests.ZoneCount("75", 10033, 0.13926211759480317)
    features = manifests.read(tmp_path, "02_features")
    assert isinstance(features, manifests.FeaturesManifest)
    assert (features.train_month, features.validation_month) == (Month(2023, 3), Month(2023, 4))
    assert features.files["preprocessor"] == "preprocessor.b"
    assert features.metrics == {
        "n_features": 6053,
        "pu_do_vocabulary": 6052,
        "train_nnz": 138784,
        "train_rows": 69392,
        "unseen_pu_do_share": 0.052144365582178186,
        "val_nnz": 122674,
        "val_rows": 62979,
    }
    training = manifests.read(tmp_path, "03_train")
    assert isinstance(training, manifests.TrainingManifest)
    assert training.metrics["rmse"] == 5.470922595809529 and training.files == {}
    assert training.error_by_distance[-1] == manifests.DistanceError(
        "[20.0, inf)", 123, 13.780856728360604, -0.053514510570825784
    )
    assert training.promotion is not None and training.promotion["taxi.promotion.decision"] == "promoted"
    scoring = manifests.read(tmp_path, "04_score")
    assert isinstance(scoring, manifests.ScoringManifest)
    assert scoring.scored_month == Month(2023, 5) and scoring.has_actuals is True
    assert scoring.model.version == "1" and scoring.model.validation_rmse == 5.470922595809529


def _records() -> list[manifests.StageManifest]:
    return [
        manifests.ExploreManifest(
            stage="01_explore",
            trip_file="/data/a.parquet",
            metrics={"rows": 10, "duration_median_minutes": 11.5},
            duration_filter={"kept": 9, "dropped_share": 0.1},
            nulls={"trip_type": 2},
            duration_quantiles={"p50": 11.5},
            busiest_zones={"pickup": (manifests.ZoneCount("74", 5, 0.5),), "dropoff": ()},
        ),
        manifests.FeaturesManifest(
            stage="02_features",
            color="yellow",
            train_month=Month(2023, 12),
            validation_month=Month(2024, 1),
            train_file="/data/a.parquet",
            validation_file="/data/b.parquet",
            files={"preprocessor": "preprocessor.b"},
            metrics={"train_rows": 9, "unseen_pu_do_share": 0.25},
        ),
        manifests.TrainingManifest(
            stage="03_train",
            mlflow_run_id="abc",
            model_uri="models:/m-1",
            booster_uri="models:/m-2",
            metrics={"rmse": 5.47, "best_iteration": 29},
            previous_best={"run_id": "def", "rmse": 5.5, "run_name": "x"},
            error_by_distance=(manifests.DistanceError("[0.0, 1.0)", 3, 1.5, -0.25),),
            promotion={"taxi.promotion.decision": "kept"},
            run_record=RUN_RECORD,
        ),
        manifests.ScoringManifest(
            stage="04_score",
            color="green",
            scored_month=Month(2023, 5),
            scored_file="/data/c.parquet",
            has_actuals=False,
            model=manifests.ScoredModel("models:/m/3", "models:/m@champion", "m", "3", None, None, None),
            metrics={"scored_trips": 7},
            files={"predictions": "predictions/p.parquet"},
            extra={"note": "kept as written"},
        ),
        manifests.StageManifest(
            stage="05_error_analysis",
            files={"table": "errors/worst.parquet"},
            metrics={"worst_rmse": 13.5},
            run_record=manifests.RunRecord(metrics={"worst_rmse": 13.5}),
            extra={"comment": "a stage the package knows nothing about", "zones": [1, 2]},
        ),
    ]


@pytest.mark.parametrize("record", _records(), ids=lambda record: type(record).__name__)
def test_every_kind_round_trips_through_its_file(tmp_path: Path, record: manifests.StageManifest) -> None:
    path = manifests.write(tmp_path, record)
    assert path == runfiles.manifest_path(tmp_path, record.stage)
    on_disk = json.loads(path.read_text())
    assert on_disk["kind"] == record.KIND and on_disk["stage"] == record.stage
    assert manifests.read(tmp_path, record.stage) == record
    assert runfiles.read_manifest(tmp_path, record.stage) == on_disk  # the dict reader still reads it


def test_months_and_the_run_record_are_written_as_agreed(tmp_path: Path) -> None:
    features, training = _records()[1:3]
    manifests.write(tmp_path, features)
    manifests.write(tmp_path, training)
    written = runfiles.read_manifest(tmp_path, "02_features")
    assert (written["year"], written["month"], written["train_month"], written["validation_month"]) == (
        2023,
        12,
        "2023-12",
        "2024-01",
    )
    assert written["train_rows"] == 9 and "metrics" not in written  # the figures stay at the top level
    assert runfiles.read_manifest(tmp_path, "03_train")["run_record"] == {
        "params": {"max_depth": 30, "learning_rate": 0.0958},
        "metrics": {"rmse": 5.47, "best_iteration": 29},
        "tags": {"taxi.model_uri": "models:/m-1"},
        "artifacts": {"preprocessor": ["preprocessor.b"]},
        "tags_when_reused": {
            "taxi.promotion.decision": "reused",
            "taxi.promotion.reason": "training reused from run abc",
        },
    }


def test_a_new_stages_dict_manifest_reads_as_the_base_record(tmp_path: Path) -> None:
    runfiles.write_manifest(
        tmp_path, "05_quality", {"files": {"report": "quality.csv"}, "metrics": {"bad_rows": 3}, "checked": ["a", "b"]}
    )
    record = manifests.read(tmp_path, "05_quality")
    assert type(record) is manifests.StageManifest
    assert record == manifests.StageManifest(
        stage="05_quality", files={"report": "quality.csv"}, metrics={"bad_rows": 3}, extra={"checked": ["a", "b"]}
    )
    # An older manifest missing a key its kind needs is no longer that kind: it still reads.
    partial = {key: value for key, value in OLD_TRAINING.items() if key not in ("model_uri", "stage")}
    runfiles.write_manifest(tmp_path, "03_train", partial)
    assert type(manifests.read(tmp_path, "03_train")) is manifests.StageManifest


def test_of_kind_picks_a_runs_manifest_by_kind() -> None:
    records = [None, *_records()]
    training = manifests.of_kind(records, manifests.TrainingManifest)
    assert training is not None and training.model_uri == "models:/m-1"
    assert manifests.of_kind(records[:2], manifests.TrainingManifest) is None


def test_a_bad_manifest_names_the_file_and_the_key(tmp_path: Path) -> None:
    runfiles.write_manifest(tmp_path, "03_train", {**OLD_TRAINING, "kind": "training", "metrics": {"rmse": "low"}})
    with pytest.raises(
        manifests.ManifestError, match=r"03_train\.manifest\.json: .*'metrics\.rmse' should be a number"
    ):
        manifests.read(tmp_path, "03_train")
    runfiles.write_manifest(tmp_path, "02_features", {**OLD_FEATURES, "kind": "features", "train_month": "March"})
    with pytest.raises(manifests.ManifestError, match=r"'train_month' should be a month written YYYY-MM"):
        manifests.read(tmp_path, "02_features")
    runfiles.write_manifest(tmp_path, "x", {"kind": "tuning"})
    with pytest.raises(manifests.ManifestError, match=r"unknown manifest kind 'tuning'"):
        manifests.read(tmp_path, "x")
    runfiles.write_manifest(tmp_path, "y", {"run_record": {"metrics": {}, "tagz": {}}})
    with pytest.raises(manifests.ManifestError, match=r"run_record: unknown keys \['tagz'\]"):
        manifests.read(tmp_path, "y")
    with pytest.raises(runfiles.MissingRunFileError, match="stage z has not completed"):
        manifests.read(tmp_path, "z")
