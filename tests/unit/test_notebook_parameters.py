"""check_parameters against the real notebooks' `parameters` cells (no kernel is started)."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

from taxi_duration.runner import NotebookParameterError, check_parameters, declared_parameters

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
EXPLORE = NOTEBOOKS / "01_explore.ipynb"
FEATURES = NOTEBOOKS / "02_features.ipynb"
TRAIN = NOTEBOOKS / "03_train.ipynb"
SCORE = NOTEBOOKS / "04_score.ipynb"


def test_real_notebooks_declare_the_expected_parameters():
    data = {"year", "month", "color", "data_source", "data_dir", "run_dir"}
    assert set(declared_parameters(EXPLORE)) == {*data, "train_file"}
    assert set(declared_parameters(FEATURES)) == {*data, "train_file", "validation_file"}
    assert set(declared_parameters(TRAIN)) == {
        "run_dir",
        "tracking_uri",
        "experiment_name",
        "mlflow_run_id",
        "registered_model",
    }
    assert set(declared_parameters(SCORE)) == {
        "year",
        "month",
        "color",
        "model_uri",
        "scored_file",
        "data_source",
        "data_dir",
        "run_dir",
        "tracking_uri",
    }


def test_valid_explore_parameters_pass():
    check_parameters(
        EXPLORE,
        {"year": 2024, "month": 1, "color": "green", "data_source": "/data/tlc", "data_dir": None, "run_dir": "/tmp/r"},
    )


def test_a_subset_of_declared_parameters_passes():
    check_parameters(TRAIN, {"run_dir": "/tmp/r"})
    check_parameters(TRAIN, {})


def test_valid_train_parameters_pass():
    check_parameters(
        TRAIN,
        {"run_dir": "/tmp/r", "tracking_uri": "sqlite:////tmp/m.db", "experiment_name": "x", "mlflow_run_id": None},
    )


def test_plain_scalar_types_pass():
    check_parameters(EXPLORE, {"year": 2024, "month": 1.0, "color": "green", "data_source": None, "data_dir": False})


def test_unknown_name_is_rejected_naming_it_and_the_declared_ones():
    with pytest.raises(NotebookParameterError) as info:
        check_parameters(EXPLORE, {"year": 2024, "colour": "green"})
    message = str(info.value)
    assert "01_explore.ipynb does not declare parameter(s) colour" in message
    assert "it declares: color, data_dir, data_source, month, run_dir, train_file, year" in message


def test_all_unknown_names_are_listed():
    with pytest.raises(NotebookParameterError, match="tracking_url, year"):
        check_parameters(TRAIN, {"year": 2024, "tracking_url": "x"})


def test_parameter_of_another_notebook_is_rejected():
    # `year` belongs to 01/02, not to the training notebook.
    with pytest.raises(NotebookParameterError, match=r"03_train.ipynb does not declare parameter\(s\) year"):
        check_parameters(TRAIN, {"year": 2024})


@pytest.mark.parametrize("value", [[2024], {"year": 2024}, (1, 2), Path("/tmp/r"), {1, 2}])
def test_non_plain_value_is_rejected_naming_the_parameter_and_type(value):
    with pytest.raises(NotebookParameterError) as info:
        check_parameters(EXPLORE, {"run_dir": value})
    message = str(info.value)
    assert "parameter run_dir=" in message
    assert type(value).__name__ in message
    assert "01_explore.ipynb" in message


def new_notebook():
    notebook = nbformat.v4.new_notebook()
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return notebook


def test_notebook_without_parameters_cell_is_rejected(tmp_path):
    notebook = new_notebook()
    notebook.cells = [
        nbformat.v4.new_markdown_cell("# untagged"),
        nbformat.v4.new_code_cell("year = 2024\nmonth = 3"),  # looks like parameters, but no tag
    ]
    path = tmp_path / "untagged.ipynb"
    nbformat.write(notebook, path)
    with pytest.raises(NotebookParameterError, match=r"untagged.ipynb has no cell tagged 'parameters'"):
        check_parameters(path, {"year": 2024})


def test_tagged_cell_in_a_written_notebook_is_honoured(tmp_path):
    notebook = new_notebook()
    cell = nbformat.v4.new_code_cell("alpha = 1\nbeta = 'x'")
    cell.metadata["tags"] = ["parameters"]
    notebook.cells = [cell, nbformat.v4.new_code_cell("print(alpha)")]
    path = tmp_path / "tagged.ipynb"
    nbformat.write(notebook, path)
    check_parameters(path, {"alpha": 2, "beta": "y"})
    with pytest.raises(NotebookParameterError, match="gamma"):
        check_parameters(path, {"gamma": 3})
