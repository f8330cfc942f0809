"""Stage declarations (notebooks/pipeline.yaml): loaded into Stage values, checked, ordered; and when each stage starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from taxi_duration.data.periods import Month
from taxi_duration.data.synthetic import write_trip_file
from taxi_duration.orchestration import declarations
from taxi_duration.orchestration.declarations import DeclarationError, Stage
from taxi_duration.orchestration.tasks import waits_for

PROJECT_DIR = Path(__file__).resolve().parents[2]


def _project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, declarations: str, notebooks: tuple[str, ...]) -> Path:
    """A project folder holding `declarations` as notebooks/pipeline.yaml and (empty) `notebooks`."""
    folder = tmp_path / "project" / "notebooks"
    folder.mkdir(parents=True)
    for name in notebooks:
        (folder / name).write_text("{}")
    (folder / "pipeline.yaml").write_text(declarations)
    monkeypatch.setenv("TAXI_PROJECT_DIR", str(tmp_path / "project"))
    return folder / "pipeline.yaml"


def test_the_shipped_declarations_load_in_order_with_their_fields():
    training = declarations.pipeline("training")
    assert [stage.name for stage in training] == ["01_explore", "02_features", "02_tune", "03_train"]
    explore, features, tune, train = training
    assert explore.report_only and explore.reads == ("train",) and explore.needs == ()
    assert features.reads == ("train", "validation") and "preprocessor.b" in features.produces
    assert tune.when == "tune_trials" and tune.needs == ("02_features",) and "optuna" in tune.preload
    assert train.needs == ("02_features", "02_tune") and "xgboost" in train.preload and not train.report_only
    assert all(stage.when is None for stage in (explore, features, train))
    assert all(stage.notebook == PROJECT_DIR / "notebooks" / f"{stage.name}.ipynb" for stage in training)
    (score,) = declarations.pipeline("scoring")
    assert score.reads == ("scored",) and dict(score.parameters) == {}
    assert declarations.find(score.name) == score


def test_upstream_comes_first_and_otherwise_declaration_order_holds(tmp_path, monkeypatch):
    _project(
        tmp_path,
        monkeypatch,
        """
pipelines:
  training:
    report:
      notebook: c.ipynb
      needs: [train]
      report_only: true
      parameters: {bins: 12}
    train:
      notebook: b.ipynb
      needs: [features]
    features:
      notebook: a.ipynb
      reads: [train, validation]
""",
        ("a.ipynb", "b.ipynb", "c.ipynb"),
    )
    ordered = declarations.pipeline("training")
    assert [stage.name for stage in ordered] == ["features", "train", "report"]
    assert dict(ordered[2].parameters) == {"bins": 12}


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("notebook: a.ipynb\n      needs: [nowhere]", "pipelines.training.one: unknown upstream stage(s) nowhere"),
        ("notebook: missing.ipynb", "pipelines.training.one: notebook"),
        ("notebook: a.ipynb\n      produce: [x]", "pipelines.training.one: unknown field(s) produce"),
        ("notebook: a.ipynb\n      reads: [scored]", "pipelines.training.one: unknown month role(s) scored"),
        ("notebook: a.ipynb\n      report_only: maybe", "pipelines.training.one: `report_only:` must be true or false"),
        ("notebook: a.ipynb\n      needs: x", "pipelines.training.one: `needs:` must be a list"),
        ("reads: [train]", "pipelines.training.one: `notebook:` must name the notebook file"),
        ("notebook: a.ipynb\n      when: [tune_trials]", "pipelines.training.one: `when:` must name a run value"),
    ],
)
def test_a_bad_declaration_is_refused_naming_the_file_and_the_entry(tmp_path, monkeypatch, entry, message):
    path = _project(tmp_path, monkeypatch, f"pipelines:\n  training:\n    one:\n      {entry}\n", ("a.ipynb",))
    with pytest.raises(DeclarationError) as refused:
        declarations.pipeline("training")
    assert str(refused.value).startswith(f"{path}: ") and message in str(refused.value)


def test_a_cycle_is_refused_naming_its_stages(tmp_path, monkeypatch):
    _project(
        tmp_path,
        monkeypatch,
        "pipelines:\n  training:\n    a:\n      notebook: a.ipynb\n      needs: [b]\n"
        "    b:\n      notebook: a.ipynb\n      needs: [a]\n",
        ("a.ipynb",),
    )
    with pytest.raises(DeclarationError, match=r"pipeline.yaml: pipelines.training: the `needs` of a, b form a cycle"):
        declarations.pipeline("training")


def test_an_unknown_pipeline_or_a_missing_file_is_refused(tmp_path, monkeypatch):
    _project(tmp_path, monkeypatch, "pipelines:\n  training:\n    a:\n      notebook: a.ipynb\n", ("a.ipynb",))
    with pytest.raises(DeclarationError, match="no pipeline 'scoring'; it declares: training"):
        declarations.pipeline("scoring")
    (tmp_path / "project" / "notebooks" / "pipeline.yaml").unlink()
    with pytest.raises(DeclarationError, match="cannot read the stage declarations"):
        declarations.pipeline("training")


def _stage(name: str, needs: tuple[str, ...] = (), report_only: bool = False) -> Stage:
    return Stage(name=name, notebook=Path(f"{name}.ipynb"), needs=needs, report_only=report_only)


def test_report_only_stages_run_beside_the_next_stage_and_the_others_one_at_a_time():
    explore = _stage("explore", report_only=True)
    features = _stage("features")
    quality = _stage("quality", needs=("features",), report_only=True)
    train = _stage("train", needs=("features",))
    errors = _stage("errors", needs=("train",), report_only=True)
    publish = _stage("publish")
    waits = waits_for((explore, features, quality, train, errors, publish))
    assert waits == {
        "explore": (),  # at once
        "features": (),  # beside explore
        "quality": ("features",),  # as soon as its upstream is done, beside train
        "train": ("features", "explore"),  # after the stage before it, and what ran beside that one
        "errors": ("train",),
        "publish": ("train", "quality"),  # not beside quality, which ran beside train
    }


WHEN_DECLARED = """
pipelines:
  training:
    features:
      notebook: a.ipynb
    tune:
      notebook: b.ipynb
      needs: [features]
      when: tune_trials
    train:
      notebook: c.ipynb
      needs: [features, tune]
"""


def test_a_stage_with_when_is_in_a_run_only_when_that_run_value_is_truthy(tmp_path, monkeypatch):
    _project(tmp_path, monkeypatch, WHEN_DECLARED, ("a.ipynb", "b.ipynb", "c.ipynb"))
    declared = declarations.pipeline("training")
    on = declarations.in_run(declared, {"tune_trials": 3})
    assert [(stage.name, stage.needs) for stage in on] == [
        ("features", ()),
        ("tune", ("features",)),
        ("train", ("features", "tune")),
    ]
    # Off: absent, and the stage that needs it waits for, and is keyed by, the others only.
    for off_value in (0, None, False):
        off = declarations.in_run(declared, {"tune_trials": off_value})
        assert [(stage.name, stage.needs) for stage in off] == [("features", ()), ("train", ("features",))]
    assert waits_for(declarations.in_run(declared, {"tune_trials": 0}))["train"] == ("features",)


def test_a_when_naming_no_run_value_is_refused(tmp_path, monkeypatch):
    _project(
        tmp_path,
        monkeypatch,
        WHEN_DECLARED.replace("when: tune_trials", "when: tune_trial"),
        ("a.ipynb", "b.ipynb", "c.ipynb"),
    )
    with pytest.raises(
        DeclarationError, match="`when:` names tune_trial, which the run does not offer; it offers: tune_trials"
    ):
        declarations.in_run(declarations.pipeline("training"), {"tune_trials": 3})


def _notebook(folder: Path, name: str, parameters: str) -> None:
    """A notebook whose only cell is its parameters cell."""
    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook

    notebook = new_notebook(cells=[new_code_cell(parameters, id="parameters", metadata={"tags": ["parameters"]})])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(notebook, folder / name)


def test_a_stage_left_out_leaves_its_downstream_key_as_if_it_were_never_declared(tmp_path, monkeypatch):
    """The key of a stage downstream of one that is off equals its key in a pipeline without that stage."""
    from taxi_duration.orchestration import request

    without = WHEN_DECLARED.replace(
        "    tune:\n      notebook: b.ipynb\n      needs: [features]\n      when: tune_trials\n", ""
    ).replace("needs: [features, tune]", "needs: [features]")
    keys = {}
    for name, text in (("with", WHEN_DECLARED), ("without", without)):
        folder = _project(tmp_path / name, monkeypatch, text, ()).parent
        for notebook in ("a.ipynb", "b.ipynb", "c.ipynb"):
            _notebook(
                folder, notebook, "run_dir = 'x'\ntune_trials = 0\n" if notebook == "b.ipynb" else "run_dir = 'x'\n"
            )
        write_trip_file(folder, "green", Month(2023, 3), 50, seed=1)
        trips = next(folder.glob("*.parquet"))
        monkeypatch.setenv("TAXI_CACHE_DIR", str(tmp_path / name / "cache"))
        for trials in (0, 3):
            plan = request.plan_stages(
                declarations.pipeline("training"),
                {"tune_trials": trials, "run_dir": "r"},
                {"train": str(trips)},
                False,
                0,
            )
            keys[name, trials] = plan.keys
    assert keys["with", 0] == keys["without", 0] == keys["without", 3]
    assert (
        set(keys["with", 3]) == {"features", "tune", "train"} and keys["with", 3]["train"] != keys["with", 0]["train"]
    )
