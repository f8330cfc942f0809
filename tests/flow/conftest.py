from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT_DIR = Path(__file__).resolve().parents[2]
FLOW_TIMEOUT = 900


@pytest.fixture(scope="session")
def prefect_home(tmp_path_factory) -> Path:
    """One Prefect home for the session's flow runs, away from the user's ~/.prefect."""
    return tmp_path_factory.mktemp("prefect-home")


@pytest.fixture
def run_pipeline(isolated_stores, prefect_home):
    """Run `python flows/pipeline.py ARGS` as a user would; return the completed process."""

    def run(*args: str, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        env = {**os.environ, "PREFECT_HOME": str(prefect_home), **(extra_env or {})}
        env.pop("PREFECT_API_URL", None)  # the embedded default: no server to install
        return subprocess.run(
            [sys.executable, str(PROJECT_DIR / "flows" / "pipeline.py"), *args],
            cwd=PROJECT_DIR,
            env=env,
            capture_output=True,
            text=True,
            timeout=FLOW_TIMEOUT,
        )

    return run
