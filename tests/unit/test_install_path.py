"""The one install path: pyproject.toml declares, two hashed locks pin, uv installs.

`make lock` derives requirements/runtime.txt (the pipeline, its flows, the worker image) and
requirements/dev.txt (runtime plus JupyterLab and the test tools) from pyproject.toml;
`make env`, the Dockerfiles, environment.yml and the devcontainer install from them.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

PROJECT_DIR = Path(__file__).resolve().parents[2]
RUNTIME_LOCK = PROJECT_DIR / "requirements" / "runtime.txt"
DEV_LOCK = PROJECT_DIR / "requirements" / "dev.txt"
PYPROJECT = tomllib.loads((PROJECT_DIR / "pyproject.toml").read_text())
DEV_ONLY = {
    "jupyterlab",
    "pytest",
    "pytest-timeout",
    "pytest-xdist",
    "hypothesis",
    "nbstripout",
    "playwright",
    "uv",
    "ruff",
    "mypy",
    "pandas-stubs",
    "scipy-stubs",
    "pre-commit",
    "check-jsonschema",
}
# uv's words when it cannot reach the package index (and only then).
UNREACHABLE_INDEX = re.compile(
    r"dns error|tcp connect error|Could not connect|error sending request|Network is unreachable|timed out",
    re.IGNORECASE,
)
LOCK_LINE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;\\]+)")


def locked_versions(lock: Path) -> dict[str, str]:
    """{canonical name: version} of a lock written by `uv pip compile`."""
    versions = {}
    for line in lock.read_text().splitlines():
        match = LOCK_LINE.match(line)
        if match:
            versions[canonicalize_name(match.group(1))] = match.group(2)
    return versions


def declared(extra: str | None = None) -> set[str]:
    requirements = (
        PYPROJECT["project"]["dependencies"] if extra is None else PYPROJECT["project"]["optional-dependencies"][extra]
    )
    return {canonicalize_name(Requirement(text).name) for text in requirements}


def imported_top_level_modules(paths: list[Path]) -> set[str]:
    """Top-level names of every `import`, also inside functions, in .py files and notebook code cells."""
    names: set[str] = set()
    for path in paths:
        if path.suffix == ".ipynb":
            cells = json.loads(path.read_text())["cells"]
            sources = ["".join(cell["source"]) for cell in cells if cell["cell_type"] == "code"]
            # Shell escapes and magics are not Python.
            sources = [
                "\n".join(line for line in source.splitlines() if not line.lstrip().startswith(("!", "%")))
                for source in sources
            ]
        else:
            sources = [path.read_text()]
        for source in sources:
            for node in ast.walk(ast.parse(source, filename=str(path))):
                if isinstance(node, ast.Import):
                    names.update(alias.name.split(".")[0] for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names.add(node.module.split(".")[0])
    return names


def third_party_distributions(modules: set[str]) -> dict[str, set[str]]:
    """{module: canonical distribution names} for modules that are neither stdlib nor the project's own."""
    local = {path.stem for path in PROJECT_DIR.rglob("*.py") if ".venv" not in path.parts} | {"taxi_duration"}
    owners = importlib.metadata.packages_distributions()
    found = {}
    for module in sorted(modules - set(sys.stdlib_module_names) - local - {"__future__"}):
        assert module in owners, f"{module} is imported but no installed distribution provides it"
        found[module] = {canonicalize_name(name) for name in owners[module]}
    return found


def project_files(*folders: str, suffixes=(".py",)) -> list[Path]:
    return [path for folder in folders for path in (PROJECT_DIR / folder).rglob("*") if path.suffix in suffixes]


def test_every_package_the_pipeline_imports_is_a_declared_runtime_dependency():
    modules = imported_top_level_modules(
        project_files("src", "flows") + project_files("notebooks", suffixes=(".ipynb",))
    )
    runtime = declared()
    undeclared = {
        module: owners for module, owners in third_party_distributions(modules).items() if not owners & runtime
    }
    assert not undeclared, f"imported by the pipeline but not in [project].dependencies: {undeclared}"


def test_every_package_the_tests_and_benchmarks_import_is_declared():
    modules = imported_top_level_modules(project_files("tests", "bench", ".devcontainer"))
    known = declared() | declared("dev")
    undeclared = {module: owners for module, owners in third_party_distributions(modules).items() if not owners & known}
    assert not undeclared, f"imported by tests or benchmarks but not declared in pyproject.toml: {undeclared}"


def test_runtime_lock_holds_no_dev_tool_and_dev_lock_holds_runtime_at_the_same_versions():
    runtime, dev = locked_versions(RUNTIME_LOCK), locked_versions(DEV_LOCK)
    assert not DEV_ONLY & set(runtime), f"dev tools in the runtime lock: {DEV_ONLY & set(runtime)}"
    assert DEV_ONLY <= set(dev)
    assert declared() <= set(runtime)
    drift = {name: (version, dev.get(name)) for name, version in runtime.items() if dev.get(name) != version}
    assert not drift, f"the dev lock pins these differently from the runtime lock: {drift}"


def test_locks_are_universal_hashed_and_cpu_only():
    for lock in (RUNTIME_LOCK, DEV_LOCK):
        text = lock.read_text()
        assert text.startswith("# This file was autogenerated by uv via the following command:\n#    make lock\n")
        packages = [line for line in text.splitlines() if LOCK_LINE.match(line)]
        assert packages and all(line.endswith("\\") for line in packages), f"{lock.name}: every pin carries hashes"
        assert "xgboost-cpu==" in text and "sys_platform != 'darwin'" in text
        assert not re.search(r"^(nvidia-|cupy)", text, re.MULTILINE), f"{lock.name} pulls CUDA libraries"
        # Markers for the other platforms are kept, so the same lock installs on Windows and macOS.
        assert "sys_platform == 'win32'" in text


def test_one_uv_version_everywhere():
    makefile = re.search(r"^UV_VERSION := (\S+)$", (PROJECT_DIR / "Makefile").read_text(), re.MULTILINE).group(1)
    assert locked_versions(DEV_LOCK)["uv"] == makefile
    assert f"uv=={makefile}" in PYPROJECT["project"]["optional-dependencies"]["dev"]
    assert importlib.metadata.version("uv") == makefile, "this environment was not built by `make env`"


def test_environment_yml_installs_the_dev_lock():
    text = (PROJECT_DIR / "environment.yml").read_text()
    assert re.search(r"^\s+- -r requirements/dev\.txt$", text, re.MULTILINE)
    assert "python=3.11" in text


def test_lock_files_are_current_against_pyproject(tmp_path):
    """`make lock` on a copy of the project changes nothing: the locks match pyproject.toml."""
    copy = tmp_path / "project"
    (copy / "requirements").mkdir(parents=True)
    for name in ("Makefile", "pyproject.toml", "README.md"):
        shutil.copy(PROJECT_DIR / name, copy / name)
    for lock in (RUNTIME_LOCK, DEV_LOCK):
        shutil.copy(lock, copy / "requirements" / lock.name)
    uv = Path(sys.executable).with_name("uv")
    completed = subprocess.run(
        ["make", "--no-print-directory", "-C", str(copy), "lock", f"UV={uv}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if completed.returncode != 0 and UNREACHABLE_INDEX.search(completed.stderr):
        pytest.skip(
            f"the package index is unreachable, so the locks cannot be re-resolved: {completed.stderr.strip()[-300:]}"
        )
    assert completed.returncode == 0, completed.stderr[-3000:]
    for lock in (RUNTIME_LOCK, DEV_LOCK):
        regenerated = (copy / "requirements" / lock.name).read_text()
        assert regenerated == lock.read_text(), (
            f"{lock.relative_to(PROJECT_DIR)} is stale: run `make lock` and commit it"
        )


def test_make_lab_lets_root_start_jupyterlab():
    # JupyterLab refuses to start as root without --allow-root (containers, this CI machine).
    import os

    planned = subprocess.run(["make", "-n", "lab"], cwd=PROJECT_DIR, capture_output=True, text=True, check=True).stdout
    (command,) = [line for line in planned.splitlines() if "jupyter lab" in line]
    assert ("--allow-root" in command) == (os.getuid() == 0), command
