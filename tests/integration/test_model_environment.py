"""The logged models' pip requirements build a fresh environment that loads and scores them.

The project installs the CPU-only `xgboost-cpu`; a model logged from it must not ask for a
package that is not there (or for the CUDA build). This builds the environment MLflow's
`requirements.txt` describes with uv, as `mlflow models serve --env-manager` would, and loads
there through pyfunc, the interface serving uses, both the bare booster and the servable
model, which must bring its own feature code (the project is not installed there).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import scipy.sparse

from taxi_duration import serving
from taxi_duration.modeling import drift, features, model
from taxi_duration.tracking import mlflow_runs

pytestmark = pytest.mark.integration

UNREACHABLE_INDEX = re.compile(
    r"dns error|tcp connect error|Could not connect|error sending request|Network is unreachable|timed out",
    re.IGNORECASE,
)
SCORE_IN_FRESH_ENVIRONMENT = """
import json, sys
import mlflow.pyfunc, scipy.sparse
loaded = mlflow.pyfunc.load_model(sys.argv[1])
print(json.dumps([float(value) for value in loaded.predict(scipy.sparse.load_npz(sys.argv[2]))]))
"""
SCORE_TRIPS_IN_FRESH_ENVIRONMENT = """
import json, sys
import mlflow.pyfunc, pandas as pd
loaded = mlflow.pyfunc.load_model(sys.argv[1])
print(json.dumps([float(value) for value in loaded.predict(pd.read_parquet(sys.argv[2]))]))
"""


def _small_model():
    """A booster trained on synthetic trips, its validation matrix and raw trips, and the servable model."""
    rng = np.random.default_rng(5)
    trips = pd.DataFrame(
        {
            "PULocationID": rng.integers(1, 8, 300),
            "DOLocationID": rng.integers(1, 8, 300),
            "trip_distance": rng.uniform(0.2, 12, 300).round(2),
        }
    )
    trips["duration"] = 3 + 2.5 * trips["trip_distance"] + rng.normal(0, 1, 300)
    prepared = features.with_zone_pairs(trips.copy())
    X_train, vectorizer = features.fit_trip_matrix(prepared[:200])
    X_val = features.trip_matrix(prepared[200:], vectorizer)
    booster = model.train_booster(
        X_train, trips["duration"][:200].to_numpy(), X_val, trips["duration"][200:].to_numpy()
    )
    return (
        booster,
        X_val,
        trips[200:][serving.RAW_COLUMNS].reset_index(drop=True),
        serving.servable_model(vectorizer, booster),
    )


def test_logged_requirements_build_an_environment_that_loads_and_scores_the_model(tmp_path):
    booster, X, trips, servable = _small_model()
    expected = model.predict(booster, X)
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # Artifacts beside the store, as the flow files them (never in the checkout's ./mlruns).
    run_id = mlflow_runs.start_run(tracking_uri, "model-environment", "model-environment", params={}, tags={})
    model_uri = mlflow_runs.log_xgboost_model(tracking_uri, run_id, booster, X[:5], expected[:5])
    profile = drift.trip_profile("2023-03", trips["trip_distance"], None)
    servable_uri = mlflow_runs.log_servable_model(tracking_uri, run_id, servable, serving.input_example(trips), profile)
    mlflow.set_tracking_uri(tracking_uri)
    local_model = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=str(tmp_path / "model")))
    local_servable = Path(mlflow.artifacts.download_artifacts(servable_uri, dst_path=str(tmp_path / "servable")))
    assert (local_servable / "requirements.txt").read_text() == (local_model / "requirements.txt").read_text()
    requirements = (local_model / "requirements.txt").read_text()
    assert "xgboost-cpu==" in requirements and "nvidia" not in requirements

    environment = tmp_path / "fresh-env"
    uv = Path(sys.executable).with_name("uv")
    subprocess.run([str(uv), "venv", "--quiet", "--python", sys.executable, str(environment)], check=True, timeout=120)
    python = environment / "bin" / "python"
    installed = subprocess.run(
        [str(uv), "pip", "install", "--quiet", "--python", str(python), "-r", str(local_model / "requirements.txt")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if installed.returncode != 0 and UNREACHABLE_INDEX.search(installed.stderr):
        pytest.skip(
            f"the package index is unreachable, so no environment can be built: {installed.stderr.strip()[-300:]}"
        )
    assert installed.returncode == 0, installed.stderr[-3000:]
    listed = subprocess.run(
        [str(uv), "pip", "list", "--python", str(python), "--format", "json"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    names = {package["name"] for package in json.loads(listed.stdout)}
    assert "xgboost-cpu" in names and "xgboost" not in names
    assert not any(name.startswith("nvidia-") for name in names), "the CUDA libraries came along"
    assert "taxi-duration" not in names, "the model must load without the project installed"

    def scored_there(script: str, model_dir: Path, inputs: Path) -> list[float]:
        scored = subprocess.run(
            [str(python), "-c", script, str(model_dir), str(inputs)],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=tmp_path,
        )
        assert scored.returncode == 0, scored.stderr[-3000:]
        return json.loads(scored.stdout.strip().splitlines()[-1])

    scipy.sparse.save_npz(tmp_path / "X.npz", X)
    assert scored_there(SCORE_IN_FRESH_ENVIRONMENT, local_model, tmp_path / "X.npz") == pytest.approx(
        expected.tolist(), rel=1e-6
    )
    # The servable model scores raw trip fields there, with the feature code it carries.
    trips.to_parquet(tmp_path / "trips.parquet")
    assert scored_there(SCORE_TRIPS_IN_FRESH_ENVIRONMENT, local_servable, tmp_path / "trips.parquet") == pytest.approx(
        expected.tolist(), rel=1e-6
    )
