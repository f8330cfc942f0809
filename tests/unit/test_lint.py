"""`make lint` on a small copy of the project: it passes on clean code and stops on each planted finding.

The copy holds the real Makefile, pyproject.toml (ruff's and mypy's configuration) and deployment
files, with a two-file package in place of src/ and flows/ so that mypy checks in seconds. The
real tree's `make lint` runs first in `make test`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

PROJECT_DIR = Path(__file__).resolve().parents[2]
# The interpreter running the tests is the project's: .venv/bin/python (not resolved: a symlink).
VENV = Path(sys.executable).parent.parent
COPIED = ["Makefile", "pyproject.toml", "docker-compose.yaml", "prefect.yaml", ".devcontainer/devcontainer.json"]
CLEAN_MODULE = '"""A module lint passes."""\n\n\ndef double(value: int) -> int:\n    return value * 2\n'
CLEAN_ENTRY = '"""An entry point lint passes."""\n\nfrom planted import double\n\nprint(double(2))\n'


@pytest.fixture(scope="module")
def mypy_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One mypy cache for the module's runs: only the first reads the standard library's stubs."""
    return tmp_path_factory.mktemp("mypy-cache")


@pytest.fixture
def project(tmp_path: Path) -> Path:
    for name in COPIED:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(PROJECT_DIR / name, tmp_path / name)
    for folder in ("src/planted", "flows", "tests", "bench", "notebooks"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "src" / "planted" / "__init__.py").write_text(CLEAN_MODULE)
    (tmp_path / "flows" / "entry.py").write_text(CLEAN_ENTRY)
    return tmp_path


def make_lint(project: Path, mypy_cache: Path) -> subprocess.CompletedProcess[str]:
    """`make lint` in `project` with this .venv's tools; -o: the environment counts as installed."""
    return subprocess.run(
        ["make", "-o", str(VENV / ".installed"), "lint", f"VENV={VENV}"],
        cwd=project,
        env={**os.environ, "MYPY_CACHE_DIR": str(mypy_cache)},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_lint_passes_on_clean_code_and_checks_the_deployment_files(project: Path, mypy_cache: Path) -> None:
    result = make_lint(project, mypy_cache)
    assert result.returncode == 0, result.stdout + result.stderr
    for step in ("ruff check", "ruff format --check", "bin/mypy", "--builtin-schema vendor.compose-spec", "json5.load"):
        assert step in result.stdout


def test_an_unused_import_fails_ruff_naming_f401(project: Path, mypy_cache: Path) -> None:
    (project / "src" / "planted" / "__init__.py").write_text(CLEAN_MODULE.replace('"""\n\n', '"""\n\nimport os\n\n', 1))
    result = make_lint(project, mypy_cache)
    assert result.returncode != 0
    assert "F401" in result.stdout and "`os` imported but unused" in result.stdout, result.stdout
    assert "bin/mypy" not in result.stdout  # make stops at the first failing check


def test_a_wrong_return_type_fails_mypy(project: Path, mypy_cache: Path) -> None:
    (project / "src" / "planted" / "__init__.py").write_text(CLEAN_MODULE.replace("value * 2", "str(value * 2)"))
    result = make_lint(project, mypy_cache)
    assert result.returncode != 0
    assert 'Incompatible return value type (got "str", expected "int")  [return-value]' in result.stdout, result.stdout


def test_an_unannotated_function_fails_mypy(project: Path, mypy_cache: Path) -> None:
    (project / "flows" / "entry.py").write_text(CLEAN_ENTRY + "\n\ndef triple(value):\n    return value * 3\n")
    result = make_lint(project, mypy_cache)
    assert result.returncode != 0
    assert "entry.py:8: error: Function is missing a type annotation  [no-untyped-def]" in result.stdout, result.stdout


def test_an_unknown_key_in_the_compose_file_fails_the_schema_check(project: Path, mypy_cache: Path) -> None:
    compose = yaml.safe_load((project / "docker-compose.yaml").read_text())
    service = next(iter(compose["services"].values()))
    service["restart_policy"] = "always"  # not a Compose key (`restart` is)
    (project / "docker-compose.yaml").write_text(yaml.safe_dump(compose))
    result = make_lint(project, mypy_cache)
    assert result.returncode != 0
    assert "'restart_policy' was unexpected" in result.stdout + result.stderr, result.stdout + result.stderr


def test_a_devcontainer_file_that_does_not_parse_fails(project: Path, mypy_cache: Path) -> None:
    devcontainer = project / ".devcontainer" / "devcontainer.json"
    devcontainer.write_text(devcontainer.read_text().replace('"image":', '"image"', 1))
    result = make_lint(project, mypy_cache)
    assert result.returncode != 0
    assert "json5.load" in result.stdout and "ValueError" in result.stderr, result.stderr
