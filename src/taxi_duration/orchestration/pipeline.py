"""The pipeline flow: fetch the data, then run the training stages notebooks/pipeline.yaml declares.

The flow owns the MLflow run: it creates it before the first notebook, passes its id to the
training notebook, archives every executed notebook and its HTML report (pass or fail) under
`notebooks/` and `reports/`, and sets the final status: FINISHED only if every stage
succeeded. Stages whose inputs have not changed since an earlier successful run are reused
(taxi_duration.orchestration.stage_cache) unless `force`.
"""

# No `from __future__ import annotations` here: the flows' parameter types must be real objects,
# because Prefect builds its parameter model from them in whatever process runs the flow (a
# Dask worker unpickles the flow without this module's names, so strings would not resolve).
import datetime as dt
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from prefect import flow
from prefect.runtime import flow_run

from taxi_duration import manifests, runfiles, runner, settings
from taxi_duration.data.periods import Color, MonthNumber, Year
from taxi_duration.orchestration import declarations, lost_server, stopping
from taxi_duration.orchestration.request import (
    RunRequest,
    StagePlan,
    handed_request,
    local_trip_files,
    plan,
    resolve_request,
    run_values,
)
from taxi_duration.orchestration.run_summary import SUMMARY_METRICS, RunEnding, report_run
from taxi_duration.orchestration.tasks import (
    RunContext,
    StagesRun,
    ending_quietly,
    fetch_trip_files,
    last_record,
    log_trip_datasets,
    manifest_metrics,
    run_stages,
    tag_reused_stages,
)
from taxi_duration.tracking import mlflow_runs

T = TypeVar("T")


@flow(name="nyc-taxi-duration", log_prints=True)
def taxi_duration_pipeline(
    year: Year | None = 2023,
    month: MonthNumber | None = 3,
    color: Color = "green",
    data_source: str | None = None,
    experiment: str | None = None,
    force: bool = False,
    registered_model: str | None = settings.DEFAULT_REGISTERED_MODEL,
    tune_trials: int = 0,
    tune_workers: int | None = None,
    tune_seed: int = settings.DEFAULT_TUNE_SEED,
    dask: bool = False,
    dask_address: str | None = None,
) -> dict[str, Any]:
    """Train and evaluate the trip-duration model on YEAR-MONTH, validated on the month after.

    With year and month both None (the scheduled deployment), trains on the newest month
    whose data and following month are published. Stages whose inputs have not changed
    since an earlier successful run are reused unless `force`. The trained model is registered
    as a version of `registered_model` and becomes its `champion` only if it beats the current
    one on this validation month (None: no registration).

    Args:
        year: Training year (2009-2100). None, with month None: the newest month the source can train on.
        month: Training month, 1-12; validation is the month after (December rolls to January).
        color: Taxi colour: green (lpep_* columns, from 2013-08) or yellow (tpep_*, from 2009).
        data_source: URL prefix or folder of {color}_tripdata_YYYY-MM.parquet; None: $TAXI_DATA_SOURCE, else TLC.
        experiment: MLflow experiment; None: $MLFLOW_EXPERIMENT_NAME, else nyc-taxi-duration.
        force: Rerun every stage, even those whose inputs are unchanged since an earlier run.
        registered_model: Registered model the trained model becomes a version of; None: register nothing.
        tune_trials: Trials of a hyperparameter search before training (0: none; training uses the recipe).
        tune_workers: Trials at a time; None: $TAXI_TUNE_WORKERS, else the cores.
        tune_seed: The search's seed (Optuna's TPE sampler).
        dask: Run the trials on a local Dask cluster.
        dask_address: Run the trials on the Dask scheduler at this address (tcp://HOST:8786).
    """
    handed = handed_request(RunRequest)  # the command line's request, resolved and checked already
    if handed is not None:
        request, owned = handed
    else:
        request = resolve_request(
            year,
            month,
            color,
            data_source,
            experiment,
            force,
            registered_model,
            tune_trials,
            tune_workers,
            tune_seed,
            dask,
            dask_address,
        )
        mlflow_runs.check_reachable(request.tracking_uri)
        owned = lost_server.OwnedRun()
    return ending_quietly(lambda: run_pipeline(request, owned))


def run_pipeline(request: RunRequest, owned: lost_server.OwnedRun) -> dict[str, Any]:
    """The flow's body once its inputs are checked: the MLflow run, the stages, the records.

    `owned` learns where the MLflow run got to (its id, folder, status, result) as it goes.
    """
    # When the month's files are already here, the plan is made now and the kernels of the
    # stages that will execute start at once: their start-up and imports overlap the MLflow
    # run's creation and the file checks. Otherwise (or if a file is unreadable, which the
    # fetch task then reports) the plan waits for the fetched files.
    early_plan, runners = plan_and_start_runners(request)
    try:
        with stopping.at_last_resort(lambda: _kill_runs_left_running(request)):
            for orphan in mlflow_runs.mark_orphaned_runs_killed(request.tracking_uri, request.experiment):
                print(
                    f"MLflow run {orphan} was left RUNNING by a pipeline process that no longer exists: marked KILLED"
                )
            if stopping.requested():
                raise runner.NotebookStopped("stopped before the MLflow run was created")
            started = dt.datetime.now(dt.UTC)
            context = _start_mlflow_run(request, started)
            owned.run_id, owned.run_dir = context.run_id, context.run_dir
            print(f"MLflow run {context.run_id} in experiment {request.experiment!r}; outputs in {context.run_dir}")
            owned.result = _run_stages(request, context, started, early_plan, runners, owned)
            return owned.result
    except BaseException as ended:
        if stopping.stopped_by(ended):
            # A stop while the run was being created leaves it RUNNING with no id returned to close it by.
            _kill_runs_left_running(request)
        raise
    finally:
        declarations.close_runners(runners)  # those no stage took over (a stage failed, or the flow was stopped)


def _kill_runs_left_running(request: RunRequest) -> None:
    """Archive the notebooks of this process's runs still RUNNING and mark them KILLED (on a stop)."""
    try:
        for run in mlflow_runs.running_runs_of_this_process(request.tracking_uri, request.experiment):
            run_dir = run.data.tags.get("taxi.run_dir")
            executed = sorted(Path(run_dir).glob("*.ipynb")) if run_dir else []
            if executed:
                mlflow_runs.log_files(request.tracking_uri, run.info.run_id, executed, "notebooks")
            mlflow_runs.set_tags(
                request.tracking_uri,
                run.info.run_id,
                {"taxi.killed_reason": "the pipeline was stopped (SIGTERM or Ctrl-C)"},
            )
            mlflow_runs.finish_run(request.tracking_uri, run.info.run_id, "KILLED")
            print(f"MLflow run {run.info.run_id} was still RUNNING when the pipeline was stopped: marked KILLED")
    except Exception as problem:  # noqa: BLE001 - on the way out; the next start marks an orphan KILLED
        print(f"warning: could not mark this pipeline's MLflow runs KILLED: {problem!r}")


def plan_and_start_runners(request: RunRequest) -> tuple[StagePlan | None, declarations.Runners]:
    """The stage plan, if the month's files are already here, and the runners started for it.

    Runners start only for the stages that will execute, and only for a small month (its
    kernels may run side by side); None and no runners when a file is not local yet or unreadable.
    A bad stage parameter (runner.NotebookParameterError) is refused here, before any kernel starts.
    """
    files = local_trip_files(request)
    if files is None:
        return None, {}
    try:
        early_plan = plan(request, files)
    except runner.NotebookParameterError:
        raise
    except Exception:  # noqa: BLE001 - fetch-trip-files validates the files and says what is wrong
        return None, {}
    return early_plan, declarations.start_runners(early_plan.to_execute) if early_plan.limit > 1 else {}


def _start_mlflow_run(request: RunRequest, started: dt.datetime) -> RunContext:
    params = request.params
    tags = {
        **mlflow_runs.process_tags(),
        "prefect.flow_run_id": str(flow_run.id),
        "prefect.flow_run_name": str(flow_run.name),
        "taxi.color": params.color,
        "taxi.train_month": params.train_month.label(),
        "taxi.validation_month": params.validation_month.label(),
    }
    commit = mlflow_runs.git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    run_id = mlflow_runs.start_run(
        request.tracking_uri,
        request.experiment,
        run_name=f"{params.color}-{params.train_month.label()}-{started:%Y%m%dT%H%M%SZ}",
        params={
            "year": params.year,
            "month": params.month,
            "color": params.color,
            "data_source": request.source.location,
        },
        tags=tags,
    )
    run_dir = runfiles.run_folder(settings.outputs_dir(), params.color, params.train_month.label(), started, run_id)
    mlflow_runs.set_tags(request.tracking_uri, run_id, {"taxi.run_dir": str(run_dir)})
    return RunContext(request.tracking_uri, run_id, run_dir)


def _run_stages(
    request: RunRequest,
    context: RunContext,
    started: dt.datetime,
    early_plan: StagePlan | None,
    runners: declarations.Runners,
    owned: lost_server.OwnedRun,
) -> dict[str, Any]:
    """Fetch, then the declared stages; on the way out (success or not) close the MLflow run and record it."""
    status, error = "FAILED", None
    timings: list[dict[str, Any]] = []
    run = StagesRun(context, request.timeout_seconds, runners)
    try:
        trip_files = _timed(
            timings,
            "fetch-trip-files",
            lambda: fetch_trip_files(request.params.color, request.months, request.source),
        )
        stage_plan = early_plan if early_plan is not None else plan(request, trip_files)
        log_trip_datasets(
            context,
            request.source,
            request.params.color,
            {
                month: (trip_files[role], stage_plan.trip_digests[role], TRIP_DATASET_CONTEXTS.get(role, role))
                for role, month in request.months.items()
            },
        )
        values = run_values(request, trip_files, str(context.run_dir), context.run_id)
        run_stages(run, stage_plan, values)
        status = "FINISHED"
    except BaseException as ended:
        error = ended
        # Ctrl-C, SIGTERM (Prefect's TerminationSignal), or a stage whose runner the stop killed
        # (taxi_duration.orchestration.stopping): whichever reaches this frame first.
        if stopping.stopped_by(ended):
            status = "KILLED"
        raise
    finally:
        timings += [run.timings[stage.name] for stage in request.stages if stage.name in run.timings]
        outcomes = {stage.name: run.outcomes[stage.name] for stage in request.stages if stage.name in run.outcomes}
        ending = RunEnding(status, error, outcomes, timings)
        owned.error = error
        owned.status = ending.status if _close_run(context, ending) else None
        gallery_path = report_run(request, context, started, str(flow_run.id), ending)
    return _result(request, context, ending, gallery_path)


# The MLflow dataset context of each month role (the Datasets tab's words).
TRIP_DATASET_CONTEXTS = {"train": "training", "validation": "validation"}


def _result(request: RunRequest, context: RunContext, ending: RunEnding, gallery_path: Path) -> dict[str, Any]:
    """What the flow returns (and the command line prints): a plain, JSON-ready summary."""
    metrics = manifest_metrics(ending.outcomes)
    training, trained_by = last_record(ending.outcomes, manifests.TrainingManifest)
    params = request.params
    return {
        "color": params.color,
        "train_month": params.train_month.label(),
        "validation_month": params.validation_month.label(),
        "mlflow_run_id": context.run_id,
        "prefect_flow_run_id": str(flow_run.id),
        "experiment": request.experiment,
        "tracking_uri": context.tracking_uri,
        "model_uri": None if training is None else training.model_uri,
        "run_dir": str(context.run_dir),
        "reports": [str(context.run_dir / f"{stage.name}.review.html") for stage in request.stages],
        "gallery": str(gallery_path),
        # A reused stage registered nothing in this run.
        "promotion": None if training is None or trained_by is None or trained_by.reused else training.promotion,
        "reused_stages": {stage: o.reused_from.mlflow_run_id for stage, o in ending.outcomes.items() if o.reused_from},
        **{key: metrics[key] for key in SUMMARY_METRICS},
    }


def _close_run(context: RunContext, ending: RunEnding) -> bool:
    """Record reuse and the final status (False: it could not be set); on the way out of a failure,
    never mask the real error."""
    try:
        tag_reused_stages(context, ending.outcomes)
        mlflow_runs.finish_run(context.tracking_uri, context.run_id, ending.status)
        return True
    except Exception as problem:  # e.g. the tracking server went away mid-run
        print(
            f"warning: could not set MLflow run {context.run_id} to {ending.status}: {problem!r}; "
            "the next pipeline start on this host marks it KILLED if it stays RUNNING"
        )
        if ending.status == "FINISHED":
            raise
        return False


def _timed(timings: list[dict[str, Any]], step: str, work: Callable[[], T]) -> T:
    """Run `work`, recording its wall time and outcome in `timings`, even when it raises."""
    started = time.monotonic()
    entry: dict[str, Any] = {"stage": step, "status": "FAILED", "seconds": None}
    timings.append(entry)
    try:
        result = work()
        entry["status"] = "COMPLETED"
        return result
    finally:
        entry["seconds"] = round(time.monotonic() - started, 2)
