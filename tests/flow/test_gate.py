"""Production is the registry: a notebook run by hand leaves it alone, and the gate never judges a model in sample."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from taxi_duration import runfiles, settings
from taxi_duration.runner import execute_notebook

pytestmark = pytest.mark.flow

MODEL = "nyc-taxi-duration"


def _registry(tracking_uri: str) -> dict[str, tuple[list[str], dict[str, str]]]:
    """Every registered model's versions and aliases."""
    client = MlflowClient(tracking_uri)
    return {
        model.name: (
            sorted(str(v.version) for v in client.search_model_versions(f"name = '{model.name}'")),
            {alias: str(version) for alias, version in model.aliases.items()},
        )
        for model in client.search_registered_models()
    }


def _run_folder(outputs: Path, month: str) -> Path:
    (folder,) = (outputs / "green" / month).iterdir()
    return folder


def test_training_by_hand_registers_nothing_and_the_month_before_the_champion_keeps_it(
    run_pipeline, synthetic_source, isolated_stores, tmp_path
):
    uri = str(isolated_stores["tracking_uri"])
    first = run_pipeline("--year", "2023", "--month", "3", "--data-source", str(synthetic_source))
    assert first.returncode == 0, first.stderr[-3000:]
    assert _registry(uri) == {MODEL: (["1"], {"champion": "1"})}

    # 03_train by hand on that run's matrices, with its own defaults (as in JupyterLab or with
    # papermill): its MLflow run is logged, the registry is not touched.
    lab = tmp_path / "lab"
    shutil.copytree(
        _run_folder(isolated_stores["outputs"], "2023-03"),
        lab,
        ignore=shutil.ignore_patterns("*.ipynb", "*.html", "03_train.manifest.json", "run.json"),
    )
    result = execute_notebook(
        settings.notebooks_dir() / "03_train.ipynb", lab / "03_train.ipynb", {"run_dir": str(lab)}, 300
    )
    by_hand = runfiles.read_manifest(lab, "03_train")
    run = MlflowClient(uri).get_run(by_hand["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["taxi.source"] == "notebook"
    assert by_hand["promotion"] is None
    assert not any(key.startswith("taxi.promotion.") for key in run.data.tags)
    assert _registry(uri) == {MODEL: (["1"], {"champion": "1"})}
    assert "Model registry: not registered, champion untouched" in result.reports.review.read_text()

    # The month before: validated on 2023-03, the month champion v1 was trained on. Its score
    # there would be in sample, so the champion stays and everything says why.
    second = run_pipeline("--year", "2023", "--month", "2", "--data-source", str(synthetic_source))
    assert second.returncode == 0, second.stderr[-3000:]
    assert _registry(uri) == {MODEL: (["1", "2"], {"champion": "1"})}
    training = runfiles.read_manifest(_run_folder(isolated_stores["outputs"], "2023-02"), "03_train")
    rmse = training["metrics"]["rmse"]
    reason = (
        f"champion v1 stays: no fair comparison, as it was trained on 2023-03, the validation month "
        f"(challenger {rmse:.3f} is not compared with an in-sample score)"
    )
    # The decision line the run ends with.
    assert re.search(rf"^  model registry +{re.escape(reason)}$", second.stdout, re.MULTILINE), second.stdout[-2000:]
    tags = MlflowClient(uri).get_run(training["mlflow_run_id"]).data.tags
    assert tags["taxi.promotion.decision"] == "kept" and tags["taxi.promotion.comparison"] == "unfair"
    assert tags["taxi.promotion.reason"] == reason
    assert tags["taxi.promotion.champion_version"] == "1" and tags["taxi.promotion.champion_rmse"] == "none"
    version = MlflowClient(uri).get_model_version(MODEL, "2")
    assert version.tags["taxi.promotion.comparison"] == "unfair" and version.tags["taxi.promotion.reason"] == reason
    assert version.tags["taxi.train_month"] == "2023-02"
    # The training report says it too.
    report = (_run_folder(isolated_stores["outputs"], "2023-02") / "03_train.review.html").read_text()
    assert f"Model registry: {MODEL} v2 registered, not champion; {reason}" in report
