"""The notebooks run by hand, as users run them: nbconvert from `notebooks/`, papermill from the
project root and from another folder, with a relative `TAXI_DATA_SOURCE`.

Whatever the working directory, they read the same data, write their results under
`<project>/outputs/lab*/` and nothing outside the project but the executed notebook the user
asked for, and their outputs carry no download progress lines.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from taxi_duration import runfiles, settings
from taxi_duration.data.periods import Month
from taxi_duration.data.synthetic import write_trip_file

pytestmark = [pytest.mark.notebooks, pytest.mark.long]

PROJECT_DIR = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
STAGES = ("01_explore", "02_features", "03_train", "04_score")
TIMEOUT = 300
# What the notebooks may leave in the project: their run folders, the download cache, the MLflow store.
PROJECT_WRITES = ("outputs/lab/", "outputs/lab-score/", "data/", "mlflow.db", "mlartifacts/")


def _files(root: Path) -> set[str]:
    return {path.relative_to(root).as_posix() for path in root.rglob("*") if path.is_file()}


def _outputs_text(executed: Path) -> str:
    notebook = json.loads(executed.read_text())
    return json.dumps([cell.get("outputs", []) for cell in notebook["cells"]])


@pytest.fixture
def user_project(tmp_path: Path, empty_tracking_store: Path) -> dict[str, Path]:
    """A project (notebooks, an MLflow store) with the trip files beside it, as ../shared/data/tlc is."""
    project = tmp_path / "project"
    shutil.copytree(PROJECT_DIR / "notebooks", project / "notebooks")
    shutil.copyfile(empty_tracking_store, project / "mlflow.db")
    shared = tmp_path / "shared" / "tlc"
    for month in (Month(2023, 3), Month(2023, 4), Month(2023, 5)):
        write_trip_file(shared, "green", month, 3000, seed=11)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    return {"root": tmp_path, "project": project, "elsewhere": elsewhere}


def _user_environment(project: Path) -> dict[str, str]:
    """A shell's environment: no library defaults set by an entry point, every project knob at its default."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in settings.ENVIRONMENT_DEFAULTS and not key.startswith(("TAXI_", "MLFLOW_"))
    }
    return {
        **env,
        "TAXI_PROJECT_DIR": str(project),
        "TAXI_DATA_SOURCE": "../shared/tlc",
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
    }


def _run(command: list[str], cwd: Path, project: Path) -> None:
    done = subprocess.run(
        command, cwd=cwd, env=_user_environment(project), capture_output=True, text=True, timeout=TIMEOUT
    )
    assert done.returncode == 0, f"{' '.join(command)} in {cwd} failed:\n{done.stderr[-3000:]}"


def _papermill(cwd: Path, project: Path, executed: Path) -> Callable[[str, list[str]], Path]:
    def run(stage: str, parameters: list[str]) -> Path:
        notebook = os.path.relpath(project / "notebooks" / f"{stage}.ipynb", cwd)
        output = executed / f"{stage}.ipynb"
        executed.mkdir(exist_ok=True)
        _run(
            [str(BIN / "papermill"), notebook, str(output), *parameters, "--execution-timeout", str(TIMEOUT)],
            cwd,
            project,
        )
        return output

    return run


def _nbconvert(notebooks: Path, executed: Path) -> Callable[[str, list[str]], Path]:
    def run(stage: str, parameters: list[str]) -> Path:
        assert not parameters, "nbconvert runs a notebook with its defaults"
        _run(
            [
                str(BIN / "jupyter"),
                "nbconvert",
                "--to",
                "notebook",
                "--execute",
                f"{stage}.ipynb",
                "--output-dir",
                str(executed),
                f"--ExecutePreprocessor.timeout={TIMEOUT}",
            ],
            notebooks,
            notebooks.parent,
        )
        return executed / f"{stage}.ipynb"

    return run


def test_notebooks_run_where_they_stand_and_write_only_in_the_project(user_project: dict[str, Path]) -> None:
    root, project = user_project["root"], user_project["project"]
    ways = {
        # The first registers its model, as a user does by hand, so that 04_score has a champion.
        "papermill from the project root": (
            _papermill(project, project, root / "executed-root"),
            {"03_train": ["-p", "registered_model", "nyc-taxi-duration"]},
        ),
        "papermill from another folder": (
            _papermill(user_project["elsewhere"], project, root / "executed-elsewhere"),
            {},
        ),
        "nbconvert from notebooks/": (_nbconvert(project / "notebooks", root / "executed-nbconvert"), {}),
    }
    for way, (run, extra_parameters) in ways.items():
        outside_before = _files(root) - {f"project/{name}" for name in _files(project)}
        project_before = _files(project)
        executed = [run(stage, extra_parameters.get(stage, [])) for stage in STAGES]

        outside_after = _files(root) - {f"project/{name}" for name in _files(project)}
        written_outside = outside_after - outside_before - {path.relative_to(root).as_posix() for path in executed}
        assert not written_outside, f"{way} wrote outside the project: {sorted(written_outside)}"
        written_in_project = _files(project) - project_before
        stray = [name for name in written_in_project if not name.startswith(PROJECT_WRITES)]
        assert not stray, f"{way} wrote where the notebooks have no business: {stray}"

        lab = project / "outputs" / "lab"
        assert runfiles.read_manifest(lab, "02_features")["train_month"] == "2023-03", way
        assert runfiles.read_manifest(lab, "03_train")["mlflow_run_id"], way
        assert (
            runfiles.read_manifest(project / "outputs" / "lab-score", "04_score")["model"]["train_month"] == "2023-03"
        )
        for notebook in executed:
            assert "Downloading artifacts" not in _outputs_text(notebook), f"{way}: progress lines in {notebook.name}"
        shutil.rmtree(project / "outputs")
