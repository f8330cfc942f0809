"""Which notebook runners the pipeline starts ahead (flows/pipeline.py `_prepare_runners`).

Kernels start at flow start only for stages that will execute, and only for a month that is
local and small enough for its kernels to run side by side; otherwise each stage starts its
own when its turn comes.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from taxi_duration import data, stagecache
from taxi_duration.periods import PipelineParams

PROJECT_DIR = Path(__file__).resolve().parents[2]

PARAMS = PipelineParams.parse(2023, 3, "green")
TRAINING = {"tracking_uri": "sqlite:///unused.db", "experiment_name": "prepared", "registered_model": None}


@pytest.fixture(scope="module")
def pipeline(script_as_module):
    with script_as_module(PROJECT_DIR / "flows" / "pipeline.py", "taxi_pipeline_under_test") as module:
        yield module


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TAXI_CACHE_DIR", str(tmp_path / "stage-cache"))
    monkeypatch.delenv("TAXI_OVERLAP_MAX_TRIPS", raising=False)
    return tmp_path / "stage-cache"


def _prepare(pipeline, source: data.TripSource, force: bool = False) -> list[str]:
    """The stages prepared; their runners are closed again at once, and checked to be gone."""
    runners = pipeline._prepare_runners(PARAMS, source, TRAINING, force)
    try:
        return sorted(runners)
    finally:
        for runner in runners.values():
            runner.close()
            assert runner.child.returncode is not None


def _cache_stages(pipeline, source: data.TripSource, cache_dir, tmp_path, *stages: str) -> None:
    """Stage-cache entries, under the keys this month's run would compute, for `stages`."""
    files = {month.label(): str(source.local_copy(PARAMS.color, month))
             for month in (PARAMS.train_month, PARAMS.validation_month)}
    keys = pipeline._stage_keys(PARAMS, files, TRAINING)
    (tmp_path / "earlier-run").mkdir()
    (tmp_path / "earlier-run" / "output.txt").write_text("x")
    for stage in stages:
        stagecache.StageCache(cache_dir).store(stage, keys[stage], tmp_path / "earlier-run", "run-id", ["output.txt"])


def test_a_small_local_month_gets_a_runner_for_every_stage(pipeline, synthetic_source, cache_dir):
    assert _prepare(pipeline, data.trip_source(str(synthetic_source))) == ["01_explore", "02_features", "03_train"]


def test_reused_stages_get_no_runner_unless_forced(pipeline, synthetic_source, cache_dir, tmp_path):
    source = data.trip_source(str(synthetic_source))
    _cache_stages(pipeline, source, cache_dir, tmp_path, "01_explore", "02_features", "03_train")
    assert _prepare(pipeline, source) == []  # a rerun starts no kernel at all
    assert _prepare(pipeline, source, force=True) == ["01_explore", "02_features", "03_train"]


def test_only_the_stages_that_will_run_get_a_runner(pipeline, synthetic_source, cache_dir, tmp_path):
    source = data.trip_source(str(synthetic_source))
    _cache_stages(pipeline, source, cache_dir, tmp_path, "01_explore")
    assert _prepare(pipeline, source) == ["02_features", "03_train"]


def test_a_big_month_gets_none(pipeline, synthetic_source, cache_dir, monkeypatch):
    monkeypatch.setenv("TAXI_OVERLAP_MAX_TRIPS", "100")  # the synthetic month has more trips
    assert _prepare(pipeline, data.trip_source(str(synthetic_source))) == []


def test_a_month_not_yet_downloaded_gets_none(pipeline, cache_dir, tmp_path):
    # A URL source whose download cache is empty: the stage keys need the files' digests.
    source = data.trip_source("http://127.0.0.1:9/trip-data", tmp_path / "download-cache")
    assert source.local_copy(PARAMS.color, PARAMS.train_month) is None
    assert _prepare(pipeline, source) == []
