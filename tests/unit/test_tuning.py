"""The hyperparameter search: hold-out, trials in this process, in local processes and on Dask, faults."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import psutil
import pytest

from taxi_duration.data.periods import Month
from taxi_duration.data.synthetic import generate_trips_table
from taxi_duration.modeling import features, tuning
from taxi_duration.tracking import mlflow_runs

# A trial function in a worker finds the test's folder here (set before the workers start).
TEST_FOLDER_ENV = "TAXI_TEST_TUNING_DIR"
MONTH = Month(2023, 3)
MONTH_END = pd.Timestamp("2023-04-01")


@pytest.fixture(scope="module")
def search_data() -> tuning.SearchData:
    """Synthetic March trips, matrices built as 02_features builds them, its last week held out."""
    trips = features.prepare_trips(generate_trips_table("green", MONTH, 1500, seed=3).to_pandas(), "green")
    trips = trips.reset_index(drop=True)
    matrices = features.build_matrices(trips, trips)
    return tuning.search_data(matrices, trips["lpep_pickup_datetime"], MONTH_END)


@pytest.fixture
def parent_run(isolated_stores: dict[str, Any]) -> tuning.TrialTracking:
    uri = str(isolated_stores["tracking_uri"])
    run_id = mlflow_runs.start_run(uri, "tuning-test", "pipeline", params={}, tags={})
    return tuning.TrialTracking(uri, run_id)


@pytest.fixture
def test_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(TEST_FOLDER_ENV, str(tmp_path))
    return tmp_path


def child_runs(where: tuning.TrialTracking) -> list[Any]:
    client = mlflow_runs.mlflow_client(where.tracking_uri)
    experiment_id = client.get_run(where.parent_run_id).info.experiment_id
    runs = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{where.parent_run_id}'")
    return sorted(runs, key=lambda run: int(run.data.tags["taxi.trial_number"]))


def leftover_processes() -> list[str]:
    """This test process's descendants, less multiprocessing's resource tracker (it ends with its parent)."""
    children = psutil.Process().children(recursive=True)
    return [" ".join(child.cmdline()) for child in children if "resource_tracker" not in " ".join(child.cmdline())]


def trial_that_kills_its_worker_once(params: dict[str, Any], data: tuning.SearchData, nthread: int | None) -> Any:
    """The first trial to get here kills the process it runs in (SIGKILL: no clean-up); the others train."""
    marker = Path(os.environ[TEST_FOLDER_ENV]) / "killed"
    try:
        marker.touch(exist_ok=False)
    except FileExistsError:
        return tuning.run_trial(params, data, nthread)
    os.kill(os.getpid(), signal.SIGKILL)
    raise AssertionError("unreachable")


def trial_recording_threads(params: dict[str, Any], data: tuning.SearchData, nthread: int | None) -> Any:
    """run_trial, after noting which process ran it with how many threads."""
    threads = nthread or tuning._dask_worker_threads()
    with open(Path(os.environ[TEST_FOLDER_ENV]) / "threads", "a") as notes:
        notes.write(f"{os.getpid()} {threads}\n")
    return tuning.run_trial(params, data, nthread)


def slow_trial(params: dict[str, Any], data: tuning.SearchData, nthread: int | None) -> Any:
    """Says it started, then takes long enough for the test to pull the scheduler away."""
    (Path(os.environ[TEST_FOLDER_ENV]) / f"started-{os.getpid()}").touch()
    time.sleep(60)
    return tuning.run_trial(params, data, nthread)


def test_holdout_is_the_last_days_of_the_month() -> None:
    pickups = pd.Series(
        pd.to_datetime(
            [
                *("2023-03-01 08:00", "2023-03-24 23:59", "2023-03-25 00:00", "2023-03-31 23:00"),
                *("2023-02-28 23:50", "2023-04-01 00:10"),
            ]
        )
    )
    fit, holdout = tuning.holdout_split(pickups, MONTH_END, holdout_days=7)
    # A stray pickup before the month is learnt from, one after it is only scored.
    assert fit.tolist() == [0, 1, 4]
    assert holdout.tolist() == [2, 3, 5]


def test_a_holdout_that_leaves_nothing_on_one_side_is_refused() -> None:
    pickups = pd.Series(pd.to_datetime(["2023-03-01", "2023-03-02"]))
    with pytest.raises(ValueError, match="0 to score"):
        tuning.holdout_split(pickups, MONTH_END, holdout_days=7)
    with pytest.raises(ValueError, match="0 trips to fit"):
        tuning.holdout_split(pickups, pd.Timestamp("2023-03-03"), holdout_days=7)


def test_search_data_keeps_the_rows_of_each_part(search_data: tuning.SearchData) -> None:
    trips = features.prepare_trips(generate_trips_table("green", MONTH, 1500, seed=3).to_pandas(), "green")
    late = (trips["lpep_pickup_datetime"] >= pd.Timestamp("2023-03-25")).to_numpy()
    assert search_data.summary() == {"fit_rows": int((~late).sum()), "holdout_rows": int(late.sum())}
    np.testing.assert_array_equal(search_data.y_holdout, trips["duration"].to_numpy()[late])
    with pytest.raises(ValueError, match="pickup times for"):
        matrices = features.build_matrices(trips, trips)
        tuning.search_data(matrices, trips["lpep_pickup_datetime"][:10], MONTH_END)


def test_the_recipe_lies_inside_the_search_space() -> None:
    recipe = tuning.recipe_values()
    assert recipe["learning_rate"] == 0.09585355369315604 and recipe["num_boost_round"] == 30
    for dimension in tuning.SEARCH_SPACE:
        assert dimension.low <= recipe[dimension.name] <= dimension.high, dimension.name


def test_sequential_search_starts_with_the_recipe_and_records_every_trial(
    search_data: tuning.SearchData, parent_run: tuning.TrialTracking
) -> None:
    result = tuning.run_search(search_data, 5, workers=1, seed=7, trials_tracking=parent_run)

    assert [trial.number for trial in result.trials] == [0, 1, 2, 3, 4]
    assert result.recipe.params == tuning.recipe_values()
    assert all(trial.state == "FINISHED" for trial in result.trials)
    assert result.best.holdout_rmse is not None and result.recipe.holdout_rmse is not None
    assert result.best.holdout_rmse <= result.recipe.holdout_rmse
    # The recipe trial scores what the recipe scores, trained directly.
    booster = tuning.model.train_booster(
        search_data.X_fit,
        search_data.y_fit,
        search_data.X_holdout,
        search_data.y_holdout,
        early_stopping_rounds=tuning.TRIAL_EARLY_STOPPING_ROUNDS,
    )
    direct = tuning.model.rmse(search_data.y_holdout, tuning.model.predict(booster, search_data.X_holdout))
    assert result.recipe.holdout_rmse == pytest.approx(direct, rel=1e-6)
    # The same seed in one worker proposes the same trials.
    again = tuning.run_search(search_data, 5, workers=1, seed=7)
    assert [t.params for t in again.trials] == [t.params for t in result.trials]

    runs = child_runs(parent_run)
    assert len(runs) == 5
    for run, trial in zip(runs, result.trials, strict=True):
        assert run.info.status == "FINISHED"
        assert run.info.run_id == trial.mlflow_run_id
        assert run.data.metrics["holdout_rmse"] == pytest.approx(trial.holdout_rmse)
        assert run.data.metrics["duration_seconds"] > 0
        assert run.data.params["max_depth"] == str(trial.params["max_depth"])
        assert run.data.tags["taxi.trial_worker"] == f"{socket.gethostname()}:{os.getpid()}"
    parent = mlflow_runs.mlflow_client(parent_run.tracking_uri).get_run(parent_run.parent_run_id).data
    assert parent.params["tune.trials"] == "5"
    assert parent.params["tune.study"] == result.study_name
    assert parent.params["tune.best.learning_rate"] == str(result.best.params["learning_rate"])
    assert parent.metrics["tune.best_holdout_rmse"] == pytest.approx(result.best.holdout_rmse)


def test_trials_in_local_worker_processes(search_data: tuning.SearchData, parent_run: tuning.TrialTracking) -> None:
    shallow = {**tuning.recipe_values(), "max_depth": 4, "num_boost_round": 12}
    result = tuning.run_search(search_data, 4, workers=2, trials_tracking=parent_run, first_trials=[shallow])

    assert result.engine == "in 2 local worker processes"
    assert result.trials[1].params == shallow
    assert [trial.state for trial in result.trials] == ["FINISHED"] * 4
    assert result.recipe.params == tuning.recipe_values()
    workers = {run.data.tags["taxi.trial_worker"] for run in child_runs(parent_run)}
    assert len(workers) == 2
    assert f"{socket.gethostname()}:{os.getpid()}" not in workers
    assert not leftover_processes(), "a worker process outlived the search"


def test_a_worker_process_killed_mid_trial_fails_that_trial_only(
    search_data: tuning.SearchData, parent_run: tuning.TrialTracking, test_folder: Path
) -> None:
    result = tuning.run_search(
        search_data, 5, workers=2, trials_tracking=parent_run, trial_function=trial_that_kills_its_worker_once
    )

    failed = [trial for trial in result.trials if trial.state == "FAILED"]
    assert len(failed) == 1 and len(result.trials) == 5
    assert failed[0].error is not None and "died" in failed[0].error
    statuses = {run.data.tags["taxi.trial_number"]: run.info.status for run in child_runs(parent_run)}
    assert statuses[str(failed[0].number)] == "FAILED"
    assert sorted(statuses.values()) == ["FAILED"] + ["FINISHED"] * 4
    # The dead worker was replaced: the trials after it ran in a new process.
    assert len({trial.worker for trial in result.trials}) == 3
    assert not leftover_processes()


def test_a_trial_that_raises_is_failed_and_the_search_goes_on(search_data: tuning.SearchData) -> None:
    broken = tuning.SearchData(search_data.X_fit, search_data.y_fit[:5], search_data.X_holdout, search_data.y_holdout)
    result = tuning.run_search(broken, 2, workers=1)
    assert [trial.state for trial in result.trials] == ["FAILED", "FAILED"]
    assert result.trials[0].error
    with pytest.raises(tuning.TuningError, match="every one of the 2 trials"):
        _ = result.best


def test_trials_on_a_local_dask_cluster_use_two_worker_processes_and_their_threads(
    search_data: tuning.SearchData, parent_run: tuning.TrialTracking, test_folder: Path
) -> None:
    result = tuning.run_search(
        search_data, 6, workers=2, dask=True, trials_tracking=parent_run, trial_function=trial_recording_threads
    )

    assert result.engine.startswith("on a local Dask cluster of 2 worker processes")
    assert [trial.state for trial in result.trials] == ["FINISHED"] * 6
    assert result.recipe.params == tuning.recipe_values()
    pids = {run.data.tags["taxi.trial_worker"].split(":")[1] for run in child_runs(parent_run)}
    assert len(pids) >= 2 and str(os.getpid()) not in pids
    notes = [line.split() for line in (test_folder / "threads").read_text().splitlines()]
    assert {pid for pid, _ in notes} == pids
    assert {int(threads) for _, threads in notes} == {max(1, tuning.local_cores() // 2)}
    assert not leftover_processes(), "a Dask process outlived the search"


def test_a_dask_worker_killed_mid_trial_fails_that_trial_only(
    search_data: tuning.SearchData, parent_run: tuning.TrialTracking, test_folder: Path
) -> None:
    result = tuning.run_search(
        search_data,
        4,
        workers=2,
        dask=True,
        trials_tracking=parent_run,
        trial_function=trial_that_kills_its_worker_once,
    )

    failed = [trial for trial in result.trials if trial.state == "FAILED"]
    assert len(failed) == 1 and len(result.trials) == 4
    assert failed[0].error is not None and "died" in failed[0].error
    statuses = {run.data.tags["taxi.trial_number"]: run.info.status for run in child_runs(parent_run)}
    assert sorted(statuses.values()) == ["FAILED"] + ["FINISHED"] * 3
    assert not leftover_processes()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_a_lost_dask_scheduler_ends_the_search_with_one_clear_error(
    search_data: tuning.SearchData, parent_run: tuning.TrialTracking, test_folder: Path
) -> None:
    address = f"tcp://127.0.0.1:{free_port()}"
    # The scheduler and worker unpickle this module's slow_trial: they import it as pytest did.
    importable = Path(__file__).parents[len(__name__.split(".")) - 1]
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(importable), os.environ.get("PYTHONPATH", "")])}
    log = open(test_folder / "dask.log", "w")  # noqa: SIM115 - closed below, after the processes
    scheduler = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "distributed.cli.dask_scheduler",
            "--host",
            "127.0.0.1",
            "--port",
            address.rsplit(":")[-1],
            "--no-dashboard",
        ],
        stdout=log,
        stderr=log,
        env=environment,
    )
    worker = subprocess.Popen(
        [
            *(sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1", "--no-dashboard"),
            *("--resources", "trial=1", "--name", "trial-worker"),
        ],
        stdout=log,
        stderr=log,
        env=environment,
    )

    def pull_the_scheduler_once_a_trial_runs() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not list(test_folder.glob("started-*")):
            time.sleep(0.2)
        scheduler.kill()

    try:
        waiting = time.monotonic()
        from distributed import Client

        with Client(address, timeout=60, set_as_default=False) as client:
            client.wait_for_workers(1, timeout=60)
        assert time.monotonic() - waiting < 60
        threading.Thread(target=pull_the_scheduler_once_a_trial_runs, daemon=True).start()
        with pytest.raises(tuning.DaskSchedulerLostError) as lost:
            tuning.run_search(
                search_data, 3, dask_address=address, trials_tracking=parent_run, trial_function=slow_trial
            )
    finally:
        for process in (scheduler, worker):
            process.kill()
            process.wait()
        log.close()

    message = str(lost.value)
    assert f"lost the Dask scheduler at {address}" in message and "\n" not in message
    runs = child_runs(parent_run)
    assert [run.info.status for run in runs] == ["FAILED"]
    assert "lost the Dask scheduler" in runs[0].data.tags["taxi.trial_error"]
    assert not leftover_processes()


def test_an_unusable_dask_scheduler_is_named(search_data: tuning.SearchData, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tuning, "DASK_CONNECT_TIMEOUT_SECONDS", 1)
    address = f"tcp://127.0.0.1:{free_port()}"
    with pytest.raises(tuning.DaskUnavailableError, match=f"cannot use the Dask scheduler at {address}"):
        tuning.run_search(search_data, 2, dask_address=address)
