"""Where MLflow experiments keep their artifacts, per tracking URI (no MLflow call made)."""

from __future__ import annotations

from pathlib import Path

import pytest

from taxi_duration.tracking.mlflow_runs import artifact_location_for


@pytest.mark.parametrize("uri", ["http://127.0.0.1:5000", "https://mlflow.example.com/", "databricks://profile"])
def test_tracking_server_decides_for_itself(uri):
    assert artifact_location_for(uri) is None


def test_bare_databricks_uri_lets_the_server_decide():
    assert artifact_location_for("databricks") is None


def test_absolute_sqlite_store_keeps_artifacts_beside_its_file():
    assert artifact_location_for("sqlite:////abs/dir/mlflow.db") == "file:///abs/dir/mlartifacts"


def test_absolute_sqlite_store_in_tmp(tmp_path):
    uri = f"sqlite:///{tmp_path / 'sub' / 'mlflow.db'}"
    assert artifact_location_for(uri) == (tmp_path / "sub" / "mlartifacts").as_uri()


def test_relative_sqlite_store_falls_back_to_the_project_artifact_root(tmp_path, monkeypatch):
    monkeypatch.setenv("TAXI_PROJECT_DIR", str(tmp_path))
    assert artifact_location_for("sqlite:///mlflow.db") == (tmp_path / "mlartifacts").as_uri()


@pytest.mark.parametrize("uri", ["postgresql://user@host/db", "/some/where/mlruns", "file:///some/where/mlruns"])
def test_other_stores_use_the_project_artifact_root(uri, tmp_path, monkeypatch):
    monkeypatch.setenv("TAXI_PROJECT_DIR", str(tmp_path))
    result = artifact_location_for(uri)
    assert result == (tmp_path / "mlartifacts").as_uri()
    assert Path(result.removeprefix("file://")).is_absolute()
