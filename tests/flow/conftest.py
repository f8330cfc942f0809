from __future__ import annotations

import os

import pytest


@pytest.fixture
def run_pipeline(isolated_stores, pipeline_cli):
    """The pipeline CLI with this test's isolated MLflow store, outputs and cache."""

    def run(*args: str, extra_env: dict[str, str] | None = None):
        # isolated_stores has set the variables in os.environ already
        keys = ("MLFLOW_TRACKING_URI", "TAXI_OUTPUTS_DIR", "TAXI_DATA_DIR")
        return pipeline_cli(*args, env={**{key: os.environ[key] for key in keys}, **(extra_env or {})})

    return run
