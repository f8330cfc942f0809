"""Run files: manifests, matrices and the preprocessor, always written atomically."""

from __future__ import annotations

import json
import stat

import numpy as np
import pandas as pd
import pytest
import scipy.sparse

from taxi_duration.modeling.features import build_matrices, prepare_trips
from taxi_duration.runfiles import (
    PREPROCESSOR_FILENAME,
    MissingRunFileError,
    atomic_path,
    load_matrices,
    load_preprocessor,
    manifest_path,
    read_manifest,
    save_matrices,
    save_preprocessor,
    write_manifest,
)


def files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


# --- atomic_path --------------------------------------------------------------------


def test_atomic_path_moves_the_file_into_place_on_success(tmp_path):
    destination = tmp_path / "sub" / "result.txt"
    with atomic_path(destination) as temporary:
        assert temporary != destination
        assert temporary.parent == destination.parent
        assert not destination.exists()  # a reader never sees a half-written file
        temporary.write_text("done")
    assert destination.read_text() == "done"
    assert files(tmp_path) == ["sub/result.txt"]


def test_atomic_path_leaves_no_file_when_the_block_raises(tmp_path):
    destination = tmp_path / "result.txt"
    with pytest.raises(RuntimeError, match="boom"), atomic_path(destination) as temporary:
        temporary.write_text("half")
        raise RuntimeError("boom")
    assert not destination.exists()
    assert files(tmp_path) == []


def test_atomic_path_keeps_the_previous_file_when_the_block_raises(tmp_path):
    destination = tmp_path / "result.txt"
    destination.write_text("previous")
    with pytest.raises(RuntimeError), atomic_path(destination) as temporary:
        temporary.write_text("new but broken")
        raise RuntimeError("boom")
    assert destination.read_text() == "previous"
    assert files(tmp_path) == ["result.txt"]


def test_atomic_path_makes_the_file_readable_by_others(tmp_path):
    destination = tmp_path / "result.txt"
    with atomic_path(destination) as temporary:
        temporary.write_text("x")
    assert stat.S_IMODE(destination.stat().st_mode) == 0o644


# --- manifests ---------------------------------------------------------------------


def test_manifest_round_trip(tmp_path):
    content = {"rows": 3, "rmse": 5.25, "files": {"train": "a.parquet"}, "ok": True}
    path = write_manifest(tmp_path, "02_features", content)
    assert path == manifest_path(tmp_path, "02_features") == tmp_path / "02_features.manifest.json"
    assert read_manifest(tmp_path, "02_features") == {"stage": "02_features", **content}


def test_manifest_is_json_and_stringifies_paths(tmp_path):
    write_manifest(tmp_path, "01_explore", {"trip_file": tmp_path / "x.parquet"})
    on_disk = json.loads((tmp_path / "01_explore.manifest.json").read_text())
    assert on_disk == {"stage": "01_explore", "trip_file": str(tmp_path / "x.parquet")}


def test_manifest_overwrite_replaces_content(tmp_path):
    write_manifest(tmp_path, "03_train", {"rmse": 9.0})
    write_manifest(tmp_path, "03_train", {"rmse": 6.0})
    assert read_manifest(tmp_path, "03_train")["rmse"] == 6.0
    assert files(tmp_path) == ["03_train.manifest.json"]


def test_missing_manifest_raises_naming_the_path_and_stage(tmp_path):
    with pytest.raises(MissingRunFileError) as info:
        read_manifest(tmp_path, "02_features")
    message = str(info.value)
    assert str(tmp_path / "02_features.manifest.json") in message
    assert "02_features" in message
    assert isinstance(info.value, FileNotFoundError)


# --- matrices and preprocessor ----------------------------------------------------------


def small_matrices():
    start = pd.Timestamp("2024-01-01 09:00")

    def frame(minutes, pu, do, distance):
        return prepare_trips(
            pd.DataFrame(
                {
                    "lpep_pickup_datetime": [start] * len(minutes),
                    "lpep_dropoff_datetime": [start + pd.Timedelta(minutes=m) for m in minutes],
                    "PULocationID": pu,
                    "DOLocationID": do,
                    "trip_distance": distance,
                }
            ),
            "green",
        )

    return build_matrices(
        frame([5.0, 12.0, 30.0], [1, 132, 7], [2, 236, 9], [0.8, 3.1, 9.9]),
        frame([20.0, 8.0], [132, 55], [236, 66], [2.0, 0.5]),
    )


def test_save_and_load_matrices_round_trip(tmp_path):
    matrices = small_matrices()
    paths = save_matrices(tmp_path, matrices)

    assert set(paths) == {"X_train", "y_train", "X_val", "y_val", "preprocessor"}
    assert paths["preprocessor"] == PREPROCESSOR_FILENAME, "relative: a cached run folder can be linked elsewhere"
    assert files(tmp_path) == sorted(
        ["features/X_train.npz", "features/X_val.npz", "features/y_train.npy", "features/y_val.npy", "preprocessor.b"]
    )

    loaded = load_matrices(tmp_path)
    for name in ("X_train", "X_val"):
        original, restored = getattr(matrices, name), getattr(loaded, name)
        assert scipy.sparse.issparse(restored) and restored.format == "csr"
        assert restored.shape == original.shape
        assert (restored != original).nnz == 0
    np.testing.assert_array_equal(loaded.y_train, matrices.y_train)
    np.testing.assert_array_equal(loaded.y_val, matrices.y_val)
    assert loaded.feature_names == matrices.feature_names
    assert loaded.summary() == matrices.summary()
    # The reloaded preprocessor transforms new records exactly like the original.
    records = [{"PU_DO": "132_236", "trip_distance": 4.0}, {"PU_DO": "999_1", "trip_distance": 1.0}]
    np.testing.assert_array_equal(
        loaded.vectorizer.transform(records).toarray(), matrices.vectorizer.transform(records).toarray()
    )


def test_preprocessor_round_trip(tmp_path):
    vectorizer = small_matrices().vectorizer
    path = tmp_path / "preprocessor.b"
    save_preprocessor(path, vectorizer)
    assert list(load_preprocessor(path).get_feature_names_out()) == list(vectorizer.get_feature_names_out())


def test_load_matrices_before_features_ran_names_the_missing_files(tmp_path):
    with pytest.raises(MissingRunFileError, match="the stage that saves them has not run here") as info:
        load_matrices(tmp_path)
    message = str(info.value)
    for name in ("X_train.npz", "y_train.npy", "X_val.npz", "y_val.npy", PREPROCESSOR_FILENAME):
        assert name in message


def test_load_matrices_with_one_file_missing_names_only_that_file(tmp_path):
    save_matrices(tmp_path, small_matrices())
    (tmp_path / "features" / "y_val.npy").unlink()
    with pytest.raises(MissingRunFileError) as info:
        load_matrices(tmp_path)
    message = str(info.value)
    assert str(tmp_path / "features" / "y_val.npy") in message
    assert "X_train.npz" not in message
