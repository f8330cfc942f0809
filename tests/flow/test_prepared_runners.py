"""Which notebook runners the pipeline starts ahead (taxi_duration.stages), and the hand-over.

Kernels start ahead only for stages that will execute, and only for a month that is local
and small enough for its kernels to run side by side; otherwise each stage starts its own
when its turn comes. The command line starts them before Prefect is imported; the flow takes
them over only if it runs with exactly the inputs they were started for.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from taxi_duration import data, stagecache, stages
from taxi_duration.periods import PipelineParams

PROJECT_DIR = Path(__file__).resolve().parents[2]

PARAMS = PipelineParams.parse(2023, 3, "green")
TRAINING = {"tracking_uri": "sqlite:///unused.db", "experiment_name": "prepared", "registered_model": None}


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TAXI_CACHE_DIR", str(tmp_path / "stage-cache"))
    monkeypatch.delenv("TAXI_OVERLAP_MAX_TRIPS", raising=False)
    return tmp_path / "stage-cache"


def _prepare(source: data.TripSource, force: bool = False) -> list[str]:
    """The stages prepared; their runners are closed again at once, and checked to be gone."""
    runners = stages.prepare_runners(PARAMS, source, TRAINING, force)
    try:
        return sorted(runners)
    finally:
        for runner in runners.values():
            runner.close()
            assert runner.child.returncode is not None


def _cache_stages(source: data.TripSource, cache_dir, tmp_path, *cached: str) -> None:
    """Stage-cache entries, under the keys this month's run would compute, for the `cached` stages."""
    files = {month.label(): str(source.local_copy(PARAMS.color, month))
             for month in (PARAMS.train_month, PARAMS.validation_month)}
    keys = stages.stage_keys(PARAMS, files, TRAINING)
    (tmp_path / "earlier-run").mkdir()
    (tmp_path / "earlier-run" / "output.txt").write_text("x")
    for stage in cached:
        stagecache.StageCache(cache_dir).store(stage, keys[stage], tmp_path / "earlier-run", "run-id", ["output.txt"])


def test_a_small_local_month_gets_a_runner_for_every_stage(synthetic_source, cache_dir):
    assert _prepare(data.trip_source(str(synthetic_source))) == ["01_explore", "02_features", "03_train"]


def test_reused_stages_get_no_runner_unless_forced(synthetic_source, cache_dir, tmp_path):
    source = data.trip_source(str(synthetic_source))
    _cache_stages(source, cache_dir, tmp_path, "01_explore", "02_features", "03_train")
    assert _prepare(source) == []  # a rerun starts no kernel at all
    assert _prepare(source, force=True) == ["01_explore", "02_features", "03_train"]


def test_only_the_stages_that_will_run_get_a_runner(synthetic_source, cache_dir, tmp_path):
    source = data.trip_source(str(synthetic_source))
    _cache_stages(source, cache_dir, tmp_path, "01_explore")
    assert _prepare(source) == ["02_features", "03_train"]


def test_a_big_month_gets_none(synthetic_source, cache_dir, monkeypatch):
    monkeypatch.setenv("TAXI_OVERLAP_MAX_TRIPS", "100")  # the synthetic month has more trips
    assert _prepare(data.trip_source(str(synthetic_source))) == []


def test_a_month_not_yet_downloaded_gets_none(cache_dir, tmp_path):
    # A URL source whose download cache is empty: the stage keys need the files' digests.
    source = data.trip_source("http://127.0.0.1:9/trip-data", tmp_path / "download-cache")
    assert source.local_copy(PARAMS.color, PARAMS.train_month) is None
    assert _prepare(source) == []


# --- the hand-over from the command line to the flow -----------------------------------------

@pytest.fixture
def no_runners_ahead():
    stages.close_runners_ahead()
    yield
    stages.close_runners_ahead()


def _stopped(runners: dict) -> bool:
    return all(runner.child.poll() is not None for runner in runners.values())


def test_the_flow_takes_over_the_runners_started_ahead_for_its_inputs(synthetic_source, cache_dir, no_runners_ahead):
    source = data.trip_source(str(synthetic_source))
    stages.start_runners_ahead(PARAMS, source, TRAINING, False)
    ahead = dict(stages._ahead[1])
    assert sorted(ahead) == list(stages.STAGES)
    taken = stages.runners_for(PARAMS, source, TRAINING, False)
    try:
        assert all(taken[stage] is ahead[stage] for stage in stages.STAGES)
        assert stages._ahead is None  # handed over once: a second run starts its own
        assert not _stopped(taken)
    finally:
        stages.close_runners(taken)


@pytest.mark.parametrize("change", ["experiment", "month", "force"])
def test_runners_started_for_other_inputs_are_closed_not_used(synthetic_source, cache_dir, no_runners_ahead, change):
    source = data.trip_source(str(synthetic_source))
    stages.start_runners_ahead(PARAMS, source, TRAINING, False)
    ahead = dict(stages._ahead[1])
    params, training, force = PARAMS, TRAINING, False
    if change == "experiment":
        training = {**TRAINING, "experiment_name": "another"}
    elif change == "month":
        params = PipelineParams.parse(2023, 2, "green")
    else:
        force = True
    taken = stages.runners_for(params, source, training, force)
    try:
        for runner in ahead.values():
            runner.child.wait(timeout=30)
        assert _stopped(ahead)
        assert sorted(taken) == list(stages.STAGES)
        assert not any(taken[stage] is ahead[stage] for stage in stages.STAGES)
    finally:
        stages.close_runners(taken)


def test_runners_nobody_took_over_are_closed(synthetic_source, cache_dir, no_runners_ahead):
    stages.start_runners_ahead(PARAMS, data.trip_source(str(synthetic_source)), TRAINING, False)
    ahead = dict(stages._ahead[1])
    stages.close_runners_ahead()
    assert _stopped(ahead)
    assert all(not runner.records.exists() for runner in ahead.values())


@pytest.fixture
def pipeline(script_as_module):
    with script_as_module(PROJECT_DIR / "flows" / "pipeline.py", "taxi_pipeline_under_test") as module:
        yield module


def test_the_command_line_starts_what_the_flow_will_take_over(pipeline, synthetic_source, cache_dir, no_runners_ahead,
                                                              monkeypatch, tmp_path):
    """The command line's guess of the flow's inputs (experiment, store, registered model) is right."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    argv = ["--year", "2023", "--month", "3", "--data-source", str(synthetic_source), "--experiment", "cli"]
    pipeline.start_kernels_ahead(argv)
    ahead = dict(stages._ahead[1])
    args = pipeline.parse_args(argv)
    training = stages.training_parameters(  # what taxi_duration_pipeline computes from its defaults
        pipeline.settings.tracking_uri(), pipeline.settings.experiment_name(args.experiment),
        inspect.signature(pipeline.taxi_duration_pipeline.fn).parameters["registered_model"].default,
    )
    taken = stages.runners_for(PARAMS, data.trip_source(args.data_source), training, args.force)
    try:
        assert all(taken[stage] is ahead[stage] for stage in stages.STAGES)
    finally:
        stages.close_runners(taken)


@pytest.mark.parametrize("argv", [["--latest"], ["--month", "13"], ["--year", "2023", "--month", "3", "--color", "purple"]])
def test_the_command_line_starts_nothing_ahead_for_input_main_will_refuse_or_resolve_later(
    pipeline, synthetic_source, cache_dir, no_runners_ahead, argv
):
    pipeline.start_kernels_ahead([*argv, "--data-source", str(synthetic_source)])
    assert stages._ahead is None
