"""The parameters cell is a notebook's contract: stage_parameters against real and planted cells (no kernel)."""

from __future__ import annotations

import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any

import nbformat
import pytest

from taxi_duration.runner import NotebookParameterError, stage_parameters
from taxi_duration.runner.parameters import typed_parameters

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"

# One training run's values, as the flow builds them (issue 28's names).
TRAINING_RUN = {
    "year": 2023,
    "month": 3,
    "color": "green",
    "data_source": "/data/tlc",
    "data_dir": "/data/cache",
    "train_file": "/data/tlc/green_tripdata_2023-03.parquet",
    "validation_file": "/data/tlc/green_tripdata_2023-04.parquet",
    "run_dir": "/outputs/run",
    "mlflow_run_id": "0123abcd",
    "tracking_uri": "sqlite:////tmp/mlflow.db",
    "experiment_name": "nyc-taxi-duration",
    "registered_model": None,
}

# Names two notebooks declare with different defaults on purpose: 04_score's month is the month
# it scores, after the 2023-03 model's validation month (2023-04), so it scores trips the model
# never saw; and its run folder is its own, so scoring by hand never writes into the training
# notebooks' folder, which 03_train reads. Their types agree all the same.
DIFFERENT_DEFAULTS = {
    ("04_score.ipynb", "month"): "the month scored, not the training month",
    ("04_score.ipynb", "run_dir"): "a scoring folder apart from the training notebooks' folder",
}


def copy_of(tmp_path: Path, stage: str) -> Path:
    """A copy of a real notebook, as a stage declared in a copied project is."""
    copy = tmp_path / f"{stage}.ipynb"
    shutil.copyfile(NOTEBOOKS / f"{stage}.ipynb", copy)
    return copy


def planted(tmp_path: Path, parameters_cell: str, name: str = "planted.ipynb") -> Path:
    """A notebook whose cell tagged `parameters` holds `parameters_cell`."""
    notebook = nbformat.v4.new_notebook()
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    cell = nbformat.v4.new_code_cell(parameters_cell)
    cell.metadata["tags"] = ["parameters"]
    notebook.cells = [cell, nbformat.v4.new_code_cell("print('ran')")]
    path = tmp_path / name
    nbformat.write(notebook, path)
    return path


def refusal(notebook: Path, run_values: dict[str, Any], fixed: dict[str, Any] | None = None) -> str:
    with pytest.raises(NotebookParameterError) as info:
        stage_parameters(notebook, run_values, fixed or {})
    return str(info.value)


def test_a_stage_gets_only_the_run_values_its_cell_declares(tmp_path: Path) -> None:
    explore = stage_parameters(copy_of(tmp_path, "01_explore"), TRAINING_RUN, {})
    assert explore == {
        "year": 2023,
        "month": 3,
        "color": "green",
        "train_file": TRAINING_RUN["train_file"],
        "data_source": "/data/tlc",
        "data_dir": "/data/cache",
        "run_dir": "/outputs/run",
    }
    train = stage_parameters(copy_of(tmp_path, "03_train"), TRAINING_RUN, {})
    assert set(train) == {"run_dir", "tracking_uri", "experiment_name", "mlflow_run_id", "registered_model"}
    assert train["registered_model"] is None, "None where the cell allows str | None"


def test_a_fixed_value_the_cell_declares_is_given_and_replaces_the_run_value(tmp_path: Path) -> None:
    train = stage_parameters(copy_of(tmp_path, "03_train"), TRAINING_RUN, {"experiment_name": "tuning"})
    assert train["experiment_name"] == "tuning"


def test_a_fixed_value_the_cell_does_not_declare_is_refused(tmp_path: Path) -> None:
    message = refusal(copy_of(tmp_path, "01_explore"), TRAINING_RUN, {"colour": "yellow"})
    assert message.startswith("01_explore.ipynb: fixed parameter(s) colour not declared by its parameters cell")
    assert "it declares: color, data_dir, data_source, month, run_dir, train_file, year" in message


@pytest.mark.parametrize(
    ("stage", "name", "value", "expected"),
    [
        ("01_explore", "month", "3", "01_explore.ipynb: parameter month='3' is a str; its parameters cell allows int"),
        ("01_explore", "year", True, "01_explore.ipynb: parameter year=True is a bool; its parameters cell allows int"),
        ("01_explore", "month", None, "01_explore.ipynb: parameter month=None is None; its parameters cell allows int"),
        ("01_explore", "color", 3, "01_explore.ipynb: parameter color=3 is an int; its parameters cell allows str"),
        (
            "03_train",
            "registered_model",
            3,
            "03_train.ipynb: parameter registered_model=3 is an int; its parameters cell allows str | None",
        ),
        (
            "02_features",
            "validation_file",
            1.5,
            "02_features.ipynb: parameter validation_file=1.5 is a float; its parameters cell allows str | None",
        ),
    ],
)
def test_a_run_value_of_a_type_the_cell_does_not_allow_is_refused(
    tmp_path: Path, stage: str, name: str, value: object, expected: str
) -> None:
    assert refusal(copy_of(tmp_path, stage), {**TRAINING_RUN, name: value}) == expected


def test_a_fixed_value_of_the_wrong_type_is_refused_too(tmp_path: Path) -> None:
    message = refusal(copy_of(tmp_path, "03_train"), TRAINING_RUN, {"run_dir": None})
    assert message == "03_train.ipynb: parameter run_dir=None is None; its parameters cell allows str"


def test_a_value_that_is_no_plain_literal_is_refused(tmp_path: Path) -> None:
    message = refusal(copy_of(tmp_path, "01_explore"), {**TRAINING_RUN, "run_dir": Path("/outputs/run")})
    assert "parameter run_dir=" in message and "01_explore.ipynb" in message and "PosixPath" in message


def test_an_int_is_accepted_where_a_float_is_declared_and_a_bool_where_a_bool_is(tmp_path: Path) -> None:
    notebook = planted(tmp_path, 'rate = 0.5\nverbose = False\nlabel: str | None = None\nlimit: "int | None" = None')
    values = {"rate": 1, "verbose": True, "label": None, "limit": 7}
    assert stage_parameters(notebook, values, {}) == values
    assert "rate=True is a bool; its parameters cell allows float" in refusal(notebook, {"rate": True})


@pytest.mark.parametrize(
    "declaration",
    ["threshold = None", "threshold: list[str] = None", "threshold = Path('x')", "threshold = [1, 2]"],
)
def test_a_name_without_a_usable_type_asks_for_an_annotation(tmp_path: Path, declaration: str) -> None:
    notebook = planted(tmp_path, f"year = 2023\n{declaration}  # what it means")
    # Refused even when no value is given for it: the contract has to be whole.
    message = refusal(notebook, {"year": 2024})
    assert message.startswith("planted.ipynb: parameter threshold = ")
    assert "annotate it in the parameters cell" in message
    assert "`threshold: str | None = None`" in message


def test_a_notebook_without_a_parameters_cell_is_refused(tmp_path: Path) -> None:
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell("year = 2023")]
    path = tmp_path / "untagged.ipynb"
    nbformat.write(notebook, path)
    assert refusal(path, {"year": 2024}) == "untagged.ipynb has no cell tagged 'parameters'"


def test_notebooks_declaring_the_same_name_agree_on_its_type_and_default() -> None:
    declared: dict[str, dict[str, tuple[str, str]]] = defaultdict(dict)
    for notebook in sorted(NOTEBOOKS.glob("*.ipynb")):
        for name, parameter in typed_parameters(notebook).items():
            declared[name][notebook.name] = (parameter.allowed(), parameter.default)
    shared = {name: by_notebook for name, by_notebook in declared.items() if len(by_notebook) > 1}
    assert {"year", "month", "color", "data_source", "data_dir", "run_dir", "tracking_uri"} <= set(shared)
    for name, by_notebook in shared.items():
        assert len({allowed for allowed, _ in by_notebook.values()}) == 1, f"{name} has different types: {by_notebook}"
        defaults = {
            default for notebook, (_, default) in by_notebook.items() if (notebook, name) not in DIFFERENT_DEFAULTS
        }
        assert len(defaults) == 1, f"{name} has different defaults: {by_notebook}"
    for notebook, name in DIFFERENT_DEFAULTS:  # each exception still differs, or it goes
        others = {default for other, (_, default) in declared[name].items() if other != notebook}
        assert declared[name][notebook][1] not in others, f"{notebook}'s {name} agrees now: drop it from the exceptions"
