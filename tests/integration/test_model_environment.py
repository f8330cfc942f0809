"""The logged model's pip requirements build a fresh environment that loads and scores it.

The project installs the CPU-only `xgboost-cpu`; a model logged from it must not ask for a
package that is not there (or for the CUDA build). This builds the environment MLflow's
`requirements.txt` describes with uv, as `mlflow models serve --env-manager` would, and loads
the model there through pyfunc, the interface serving uses.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import scipy.sparse

from taxi_duration import model, tracking

pytestmark = pytest.mark.integration

UNREACHABLE_INDEX = re.compile(r"dns error|tcp connect error|Could not connect|error sending request|Network is unreachable|timed out", re.IGNORECASE)
SCORE_IN_FRESH_ENVIRONMENT = """
import json, sys
import mlflow.pyfunc, scipy.sparse
loaded = mlflow.pyfunc.load_model(sys.argv[1])
print(json.dumps([float(value) for value in loaded.predict(scipy.sparse.load_npz(sys.argv[2]))]))
"""


def _small_booster():
    rng = np.random.default_rng(5)
    X = scipy.sparse.csr_matrix(rng.integers(0, 2, size=(200, 12)).astype(np.float32))
    y = (X @ np.arange(12, dtype=np.float32)) + rng.normal(0, 0.5, 200)
    booster = model.train_booster(X[:150], y[:150], X[150:], y[150:])
    return booster, X[150:]


def test_logged_requirements_build_an_environment_that_loads_and_scores_the_model(tmp_path):
    booster, X = _small_booster()
    expected = model.predict(booster, X)
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # Artifacts beside the store, as the flow files them (never in the checkout's ./mlruns).
    run_id = tracking.start_run(tracking_uri, "model-environment", "model-environment", params={}, tags={})
    model_uri = tracking.log_xgboost_model(tracking_uri, run_id, booster, X[:5], expected[:5])
    mlflow.set_tracking_uri(tracking_uri)
    local_model = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=str(tmp_path / "model")))
    requirements = (local_model / "requirements.txt").read_text()
    assert "xgboost-cpu==" in requirements and "nvidia" not in requirements

    environment = tmp_path / "fresh-env"
    uv = Path(sys.executable).with_name("uv")
    subprocess.run([str(uv), "venv", "--quiet", "--python", sys.executable, str(environment)], check=True, timeout=120)
    python = environment / "bin" / "python"
    installed = subprocess.run(
        [str(uv), "pip", "install", "--quiet", "--python", str(python), "-r", str(local_model / "requirements.txt")],
        capture_output=True, text=True, timeout=600,
    )
    if installed.returncode != 0 and UNREACHABLE_INDEX.search(installed.stderr):
        pytest.skip(f"the package index is unreachable, so no environment can be built: {installed.stderr.strip()[-300:]}")
    assert installed.returncode == 0, installed.stderr[-3000:]
    listed = subprocess.run([str(uv), "pip", "list", "--python", str(python), "--format", "json"],
                            capture_output=True, text=True, check=True, timeout=120)
    names = {package["name"] for package in json.loads(listed.stdout)}
    assert "xgboost-cpu" in names and "xgboost" not in names
    assert not any(name.startswith("nvidia-") for name in names), "the CUDA libraries came along"
    assert "taxi-duration" not in names, "the model must load without the project installed"

    scipy.sparse.save_npz(tmp_path / "X.npz", X)
    scored = subprocess.run(
        [str(python), "-c", SCORE_IN_FRESH_ENVIRONMENT, str(local_model), str(tmp_path / "X.npz")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert scored.returncode == 0, scored.stderr[-3000:]
    predictions = json.loads(scored.stdout.strip().splitlines()[-1])
    assert predictions == pytest.approx(expected.tolist(), rel=1e-6)
