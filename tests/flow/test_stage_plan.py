"""A run's request, resolved once (RunRequest), and its plan: stage keys, overlap, what executes.

Kernels start ahead only for stages that will execute, and only for a month that is local and
small enough for its kernels to run side by side; otherwise each stage starts its own when its
turn comes. Each stage's parameters are checked against its parameters cell before any kernel starts.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest

from taxi_duration import runner
from taxi_duration.data import tripfiles
from taxi_duration.data.periods import InvalidParameterError
from taxi_duration.orchestration import declarations, stage_cache
from taxi_duration.orchestration.pipeline import plan_and_start_runners
from taxi_duration.orchestration.request import RunRequest, plan, plan_stages, resolve_request, run_values

PROJECT_DIR = Path(__file__).resolve().parents[2]
STAGES = ["01_explore", "02_features", "03_train"]


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TAXI_CACHE_DIR", str(tmp_path / "stage-cache"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'unused.db'}")
    monkeypatch.delenv("TAXI_OVERLAP_MAX_TRIPS", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    return tmp_path / "stage-cache"


def _request(source: str, **changes) -> RunRequest:
    return resolve_request(
        **{
            "year": 2023,
            "month": 3,
            "color": "green",
            "data_source": source,
            "experiment": "planned",
            "registered_model": None,
            **changes,
        }
    )


def _files(request: RunRequest) -> dict[str, str]:
    return {role: str(request.source.local_copy("green", month)) for role, month in request.months.items()}


def _started(request: RunRequest) -> list[str]:
    """The stages that got a runner ahead; the runners are closed again at once, and checked to be gone."""
    _, runners = plan_and_start_runners(request)
    try:
        return sorted(runners)
    finally:
        declarations.close_runners(runners)
        assert all(runner.child.returncode is not None for runner in runners.values())


def _cache_stages(request: RunRequest, cache_dir, tmp_path, *cached: str) -> None:
    """Stage-cache entries, under the keys this month's run computes, for the `cached` stages."""
    keys = plan(request, _files(request)).keys
    (tmp_path / "earlier-run").mkdir()
    (tmp_path / "earlier-run" / "output.txt").write_text("x")
    for stage in cached:
        stage_cache.StageCache(cache_dir).store(stage, keys[stage], tmp_path / "earlier-run", "run-id", ["output.txt"])


def test_a_request_is_resolved_once_into_a_frozen_value(synthetic_source, cache_dir, tmp_path):
    request = _request(str(synthetic_source), year="2023", month="3")
    assert (request.params.year, request.params.month, request.params.color) == (2023, 3, "green")
    assert request.source.location == str(synthetic_source)
    assert request.tracking_uri == f"sqlite:///{tmp_path / 'unused.db'}" and request.experiment == "planned"
    # As notebooks/pipeline.yaml declares them; the search (`when: tune_trials`) is in a run only when asked for.
    assert [stage.name for stage in request.pipeline] == ["01_explore", "02_features", "02_tune", "03_train"]
    assert [stage.name for stage in request.stages] == STAGES and request.tune_trials == 0
    tuned = dataclasses.replace(request, tune_trials=3)
    assert [stage.name for stage in tuned.stages] == ["01_explore", "02_features", "02_tune", "03_train"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        request.force = True


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"month": 13}, InvalidParameterError),
        ({"color": "purple"}, InvalidParameterError),
        ({"data_source": "/no/such/folder"}, tripfiles.TripDataError),
    ],
)
def test_bad_input_fails_while_resolving(synthetic_source, cache_dir, changes, error):
    with pytest.raises(error):
        _request(str(synthetic_source), **changes)


def test_a_small_local_month_executes_every_stage_side_by_side_with_runners_ahead(synthetic_source, cache_dir):
    request = _request(str(synthetic_source))
    stage_plan = plan(request, _files(request))
    assert [stage.name for stage in stage_plan.to_execute] == STAGES and stage_plan.reuse == {}
    assert stage_plan.limit == 2
    assert sorted(stage_plan.keys) == STAGES and len(set(stage_plan.keys.values())) == len(STAGES)
    assert _started(request) == STAGES


def test_each_stage_is_keyed_by_what_it_receives_but_not_by_where_things_are(synthetic_source, cache_dir):
    # One rule for every stage: the run folder, the MLflow run id and file paths are no part of a key.
    request = _request(str(synthetic_source))
    files = _files(request)
    pipeline = request.pipeline
    planned = plan_stages(pipeline, run_values(request, files), files, False, 10**9).keys
    elsewhere = plan_stages(pipeline, run_values(request, files, "/some/run", "abc123"), files, False, 10**9).keys
    assert planned == elsewhere
    explore = {stage.name: stage for stage in pipeline}["01_explore"]
    received = runner.stage_parameters(explore.notebook, run_values(request, files), explore.parameters)
    assert received["train_file"] == files["train"] and "validation_file" not in received  # it reads train only
    assert planned["01_explore"] == stage_cache.stage_key(explore, received, declarations.trip_digests(files), {}), (
        "the key is the shared rule's"
    )
    other_month = dict(files, validation=files["train"])  # 02_features reads validation; 01_explore does not
    changed = plan_stages(pipeline, run_values(request, other_month), other_month, False, 10**9).keys
    assert changed["01_explore"] == planned["01_explore"]
    assert changed["02_features"] != planned["02_features"] and changed["03_train"] != planned["03_train"]


def test_a_value_the_notebook_does_not_declare_is_refused_before_any_kernel_starts(
    synthetic_source, cache_dir, tmp_path, monkeypatch
):
    project = tmp_path / "project"
    shutil.copytree(PROJECT_DIR / "notebooks", project / "notebooks", ignore=shutil.ignore_patterns("reopened"))
    declarations = project / "notebooks" / "pipeline.yaml"
    declarations.write_text(
        declarations.read_text().replace(
            "      report_only: true\n", "      report_only: true\n      parameters: {bins: 12}\n", 1
        )
    )
    monkeypatch.setenv("TAXI_PROJECT_DIR", str(project))
    request = _request(str(synthetic_source))
    with pytest.raises(runner.NotebookParameterError, match=r"01_explore.ipynb.*bins"):
        plan_and_start_runners(request)


def test_cached_stages_are_reused_and_get_no_runner_unless_forced(synthetic_source, cache_dir, tmp_path):
    request = _request(str(synthetic_source))
    _cache_stages(request, cache_dir, tmp_path, *STAGES)
    stage_plan, _ = plan_and_start_runners(request)
    assert stage_plan is not None
    assert stage_plan.to_execute == () and sorted(stage_plan.reuse) == STAGES
    assert stage_plan.reuse["03_train"].mlflow_run_id == "run-id"
    assert _started(request) == []  # a rerun starts no kernel at all
    assert _started(_request(str(synthetic_source), force=True)) == STAGES


def test_only_the_stages_that_will_run_get_a_runner(synthetic_source, cache_dir, tmp_path):
    request = _request(str(synthetic_source))
    _cache_stages(request, cache_dir, tmp_path, "01_explore")
    assert _started(request) == ["02_features", "03_train"]


def test_a_big_month_runs_explore_first_and_gets_no_runners(synthetic_source, cache_dir, monkeypatch):
    monkeypatch.setenv("TAXI_OVERLAP_MAX_TRIPS", "100")  # the synthetic month has more trips
    request = _request(str(synthetic_source))
    stage_plan, runners = plan_and_start_runners(request)
    assert stage_plan is not None
    assert stage_plan.limit == 1 and [stage.name for stage in stage_plan.to_execute] == STAGES and runners == {}


def test_a_month_not_yet_downloaded_is_planned_after_its_fetch(cache_dir, tmp_path, monkeypatch):
    # A URL source whose download cache is empty: the stage keys need the files' digests.
    monkeypatch.setenv("TAXI_DATA_DIR", str(tmp_path / "download-cache"))
    request = _request("http://127.0.0.1:9/trip-data")
    assert request.source.local_copy("green", request.params.train_month) is None
    assert plan_and_start_runners(request) == (None, {})


def test_the_training_key_depends_on_where_the_run_logs(synthetic_source, cache_dir):
    # A reuse does not log the model again, so another store or experiment must train again.
    one = _request(str(synthetic_source))
    other = _request(str(synthetic_source), experiment="elsewhere")
    files = _files(one)
    first, second = plan(one, files), plan(other, files)
    assert first.keys["02_features"] == second.keys["02_features"]
    assert first.keys["03_train"] != second.keys["03_train"]


def test_the_flow_parameters_of_a_request_ask_for_that_same_request(synthetic_source, cache_dir):
    # What the command line's flow run records in Prefect (and a deployment run would pass)
    # resolves back to the request it ran.
    import inspect

    from taxi_duration.orchestration.pipeline import taxi_duration_pipeline

    request = _request(str(synthetic_source), force=True)
    assert list(request.flow_parameters) == list(inspect.signature(taxi_duration_pipeline.fn).parameters)
    assert resolve_request(**request.flow_parameters) == request


def test_the_scoring_key_follows_the_pinned_model_version(synthetic_source, cache_dir):
    # The scoring stage receives the pinned version (models:/NAME/VERSION): a moved alias scores again.
    scoring = declarations.pipeline("scoring")
    files = {"scored": str(synthetic_source / "green_tripdata_2023-05.parquet")}

    def keys(model_uri: str, run_dir: str = "/runs/one") -> dict[str, str]:
        values = {
            "year": 2023,
            "month": 5,
            "color": "green",
            "model_uri": model_uri,
            "data_source": str(synthetic_source),
            "data_dir": "/data",
            "scored_file": files["scored"],
            "run_dir": run_dir,
            "mlflow_run_id": "run",
            "tracking_uri": "sqlite:///unused.db",
            "experiment_name": "scoring",
        }
        return plan_stages(scoring, values, files, False, 10**9).keys

    assert keys("models:/nyc-taxi-duration/1") == keys("models:/nyc-taxi-duration/1", run_dir="/runs/two")
    assert keys("models:/nyc-taxi-duration/1") != keys("models:/nyc-taxi-duration/2")
