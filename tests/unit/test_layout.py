"""The shape the code keeps: flows/ holds thin entry points, and no module grows past 400 lines."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT_DIR = Path(__file__).resolve().parents[2]
FLOW_SCRIPTS = sorted((PROJECT_DIR / "flows").glob("*.py"))
MAX_MODULE_LINES = 400
MAX_PIPELINE_SCRIPT_LINES = 250


def _is_main_guard(node: ast.stmt) -> bool:
    return (
        isinstance(node, ast.If)
        and isinstance(node.test, ast.Compare)
        and isinstance(node.test.left, ast.Name)
        and node.test.left.id == "__name__"
    )


@pytest.mark.parametrize("script", FLOW_SCRIPTS, ids=lambda path: path.name)
def test_flow_scripts_are_imports_then_a_main_guard_at_the_end(script):
    body = ast.parse(script.read_text()).body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # the docstring
    if body and _is_main_guard(body[-1]):
        body = body[:-1]
    allowed = (ast.Import, ast.ImportFrom)
    for node in body:
        is_all = isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["__all__"]
        assert isinstance(node, allowed) or is_all, (
            f"{script.name} line {node.lineno}: only imports before the main guard"
        )
    assert not any(_is_main_guard(node) for node in body), f"{script.name}: the main guard comes last"


def test_the_flows_import_without_path_edits_and_load_as_prefect_loads_the_entrypoint():
    # In a fresh process: the package's flows import as any module does (a Dask worker needs
    # no PYTHONPATH), and the entrypoint loads as a Prefect worker loads it.
    code = (
        "import sys\n"
        "before = list(sys.path)\n"
        "from taxi_duration.orchestration.backfill import backfill\n"
        "from taxi_duration.orchestration.pipeline import taxi_duration_pipeline\n"
        "assert sys.path == before, set(sys.path) ^ set(before)\n"
        "from prefect.flows import load_flow_from_entrypoint\n"
        "flow = load_flow_from_entrypoint('flows/pipeline.py:taxi_duration_pipeline', use_placeholder_flow=False)\n"
        "print(flow.name, backfill.name, flow.fn is taxi_duration_pipeline.fn)\n"
    )
    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    completed = subprocess.run(
        [sys.executable, "-c", code], cwd=PROJECT_DIR, env=env, capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.split("\n")[-2] == "nyc-taxi-duration nyc-taxi-duration-backfill True"


def test_no_module_is_longer_than_400_lines():
    modules = [*(PROJECT_DIR / "src").rglob("*.py"), *FLOW_SCRIPTS]
    long = {
        str(path.relative_to(PROJECT_DIR)): n
        for path in modules
        if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert long == {}, f"split these modules (more than {MAX_MODULE_LINES} lines): {long}"
    pipeline = PROJECT_DIR / "flows" / "pipeline.py"
    assert len(pipeline.read_text().splitlines()) <= MAX_PIPELINE_SCRIPT_LINES
