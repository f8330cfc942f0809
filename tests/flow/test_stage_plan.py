"""A run's request, resolved once (RunRequest), and its plan: stage keys, overlap, what executes.

Kernels start ahead only for stages that will execute, and only for a month that is local and
small enough for its kernels to run side by side; otherwise each stage starts its own when its
turn comes.
"""

from __future__ import annotations

import dataclasses

import pytest

from taxi_duration import data, stagecache, stages
from taxi_duration.orchestration.pipeline import plan_and_start_runners
from taxi_duration.orchestration.request import RunRequest, plan, resolve_request
from taxi_duration.periods import InvalidParameterError

STAGES = list(stages.STAGES)


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


def _started(request: RunRequest) -> list[str]:
    """The stages that got a runner ahead; the runners are closed again at once, and checked to be gone."""
    _, runners = plan_and_start_runners(request)
    try:
        return sorted(runners)
    finally:
        stages.close_runners(runners)
        assert all(runner.child.returncode is not None for runner in runners.values())


def _cache_stages(request: RunRequest, cache_dir, tmp_path, *cached: str) -> None:
    """Stage-cache entries, under the keys this month's run computes, for the `cached` stages."""
    files = {month.label(): str(request.source.local_copy(request.params.color, month)) for month in request.months}
    keys = stages.stage_keys(request.params, stages.trip_digests(files), request.training_parameters)
    (tmp_path / "earlier-run").mkdir()
    (tmp_path / "earlier-run" / "output.txt").write_text("x")
    for stage in cached:
        stagecache.StageCache(cache_dir).store(stage, keys[stage], tmp_path / "earlier-run", "run-id", ["output.txt"])


def test_a_request_is_resolved_once_into_a_frozen_value(synthetic_source, cache_dir, tmp_path):
    request = _request(str(synthetic_source), year="2023", month="3")
    assert (request.params.year, request.params.month, request.params.color) == (2023, 3, "green")
    assert request.source.location == str(synthetic_source)
    assert request.tracking_uri == f"sqlite:///{tmp_path / 'unused.db'}" and request.experiment == "planned"
    assert request.training_parameters == {
        "tracking_uri": request.tracking_uri,
        "experiment_name": "planned",
        "registered_model": None,
    }
    with pytest.raises(dataclasses.FrozenInstanceError):
        request.force = True


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"month": 13}, InvalidParameterError),
        ({"color": "purple"}, InvalidParameterError),
        ({"data_source": "/no/such/folder"}, data.TripDataError),
    ],
)
def test_bad_input_fails_while_resolving(synthetic_source, cache_dir, changes, error):
    with pytest.raises(error):
        _request(str(synthetic_source), **changes)


def test_a_small_local_month_executes_every_stage_side_by_side_with_runners_ahead(synthetic_source, cache_dir):
    request = _request(str(synthetic_source))
    files = {month.label(): str(request.source.local_copy("green", month)) for month in request.months}
    stage_plan = plan(request, files)
    assert stage_plan.to_execute == tuple(STAGES) and stage_plan.reuse == {} and stage_plan.side_by_side
    assert stage_plan.keys == stages.stage_keys(request.params, stages.trip_digests(files), request.training_parameters)
    assert _started(request) == STAGES


def test_cached_stages_are_reused_and_get_no_runner_unless_forced(synthetic_source, cache_dir, tmp_path):
    request = _request(str(synthetic_source))
    _cache_stages(request, cache_dir, tmp_path, *STAGES)
    stage_plan, _ = plan_and_start_runners(request)
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
    assert not stage_plan.side_by_side and stage_plan.to_execute == tuple(STAGES) and runners == {}


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
    files = {month.label(): str(one.source.local_copy("green", month)) for month in one.months}
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
