"""The pipeline flow: fetch the data, then execute 01_explore, 02_features and 03_train.

The flow owns the MLflow run: it creates it before the first notebook, passes its id to the
training notebook, archives every executed notebook and its HTML report (pass or fail) under
`notebooks/` and `reports/`, and sets the final status: FINISHED only if every stage
succeeded. Stages whose inputs have not changed since an earlier successful run are reused
(taxi_duration.stagecache) unless `force`.
"""

# No `from __future__ import annotations` here: the flows' parameter types must be real objects,
# because Prefect builds its parameter model from them in whatever process runs the flow (a
# Dask worker unpickles the flow without this module's names, so strings would not resolve).
import concurrent.futures
import contextvars
import datetime as dt
import functools
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from prefect import Flow, flow
from prefect.runtime import flow_run

from taxi_duration import runfiles, runner, settings, stages, tracking
from taxi_duration.orchestration import lost_server, stopping
from taxi_duration.orchestration.report import SUMMARY_METRICS, RunEnding, report_run
from taxi_duration.orchestration.request import STAGES, RunRequest, StagePlan, local_trip_files, plan, resolve_request
from taxi_duration.orchestration.stage import (
    RunContext,
    StageOutcome,
    ending_quietly,
    fetch_trip_files,
    log_trip_datasets,
    run_stage,
)
from taxi_duration.periods import Color, MonthNumber, Year

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
    """
    request = resolve_request(year, month, color, data_source, experiment, force, registered_model)
    tracking.check_reachable(request.tracking_uri)
    return ending_quietly(lambda: run_pipeline(request))


def run_resolved(request: RunRequest) -> dict[str, Any]:
    """A run of the pipeline flow for a request the caller has resolved and checked already.

    The command line's way in: for Prefect it is a run of the same flow, under the same name
    and with the same parameters as `taxi_duration_pipeline(**request.flow_parameters)`, but
    its body starts from `request` instead of resolving those parameters a second time.
    Raises lost_server.PrefectServerLost, saying how far the MLflow run got, when the Prefect
    server stops answering.
    """
    owned = lost_server.OwnedRun()

    @functools.wraps(taxi_duration_pipeline.fn)  # the same signature, so the same parameters in the UI
    def resolved_pipeline(*args: Any, **kwargs: Any) -> dict[str, Any]:
        return ending_quietly(lambda: run_pipeline(request, owned))

    as_flow = Flow(
        resolved_pipeline,
        name=taxi_duration_pipeline.name,
        log_prints=True,
        description=taxi_duration_pipeline.description,
    )
    return lost_server.run_flow(as_flow, request.flow_parameters, owned)


def run_pipeline(request: RunRequest, owned: lost_server.OwnedRun | None = None) -> dict[str, Any]:
    """The flow's body once its inputs are checked: the MLflow run, the stages, the records.

    `owned` learns where the MLflow run got to (its id, folder, status, result) as it goes.
    """
    owned = owned or lost_server.OwnedRun()
    # When the month's files are already here, the plan is made now and the kernels of the
    # stages that will execute start at once: their start-up and imports overlap the MLflow
    # run's creation and the file checks. Otherwise (or if a file is unreadable, which the
    # fetch task then reports) the plan waits for the fetched files.
    early_plan, runners = plan_and_start_runners(request)
    try:
        with stopping.at_last_resort(lambda: _kill_runs_left_running(request)):
            for orphan in tracking.mark_orphaned_runs_killed(request.tracking_uri, request.experiment):
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
        stages.close_runners(runners)  # those no stage took over (a stage failed, or the flow was stopped)


def _kill_runs_left_running(request: RunRequest) -> None:
    """Archive the notebooks of this process's runs still RUNNING and mark them KILLED (on a stop)."""
    try:
        for run in tracking.running_runs_of_this_process(request.tracking_uri, request.experiment):
            run_dir = run.data.tags.get("taxi.run_dir")
            executed = sorted(Path(run_dir).glob("*.ipynb")) if run_dir else []
            if executed:
                tracking.log_files(request.tracking_uri, run.info.run_id, executed, "notebooks")
            tracking.set_tags(
                request.tracking_uri,
                run.info.run_id,
                {"taxi.killed_reason": "the pipeline was stopped (SIGTERM or Ctrl-C)"},
            )
            tracking.finish_run(request.tracking_uri, run.info.run_id, "KILLED")
            print(f"MLflow run {run.info.run_id} was still RUNNING when the pipeline was stopped: marked KILLED")
    except Exception as problem:  # noqa: BLE001 - on the way out; the next start marks an orphan KILLED
        print(f"warning: could not mark this pipeline's MLflow runs KILLED: {problem!r}")


def plan_and_start_runners(request: RunRequest) -> tuple[StagePlan | None, stages.Runners]:
    """The stage plan, if the month's files are already here, and the runners started for it.

    Runners start only for the stages that will execute, and only for a small month (its
    kernels run side by side); None and no runners when a file is not local yet or unreadable.
    """
    files = local_trip_files(request)
    if files is None:
        return None, {}
    try:
        early_plan = plan(request, files)
    except Exception:  # noqa: BLE001 - fetch-trip-files validates the files and says what is wrong
        return None, {}
    return early_plan, stages.start_runners(early_plan.to_execute) if early_plan.side_by_side else {}


def _start_mlflow_run(request: RunRequest, started: dt.datetime) -> RunContext:
    params = request.params
    tags = {
        **tracking.process_tags(),
        "prefect.flow_run_id": str(flow_run.id),
        "prefect.flow_run_name": str(flow_run.name),
        "taxi.color": params.color,
        "taxi.train_month": params.train_month.label(),
        "taxi.validation_month": params.validation_month.label(),
    }
    commit = tracking.git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    run_id = tracking.start_run(
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
    tracking.set_tags(request.tracking_uri, run_id, {"taxi.run_dir": str(run_dir)})
    return RunContext(request.tracking_uri, run_id, run_dir)


def _stage_parameters(request: RunRequest, context: RunContext) -> dict[str, dict[str, Any]]:
    data_parameters = {
        "year": request.params.year,
        "month": request.params.month,
        "color": request.params.color,
        "data_source": request.source.location,
        "data_dir": str(request.source.cache_dir),
        "run_dir": str(context.run_dir),
    }
    return {
        "01_explore": data_parameters,
        "02_features": data_parameters,
        "03_train": {"run_dir": str(context.run_dir), "mlflow_run_id": context.run_id, **request.training_parameters},
    }


def _run_stages(
    request: RunRequest,
    context: RunContext,
    started: dt.datetime,
    early_plan: StagePlan | None,
    runners: stages.Runners,
    owned: lost_server.OwnedRun,
) -> dict[str, Any]:
    """Fetch, then the three stages; on the way out (success or not) close the MLflow run and record it."""
    parameters = _stage_parameters(request, context)
    status, error = "FAILED", None
    outcomes: dict[str, StageOutcome] = {}
    timings: list[dict[str, Any]] = []
    stop_explore = threading.Event()
    explore: concurrent.futures.Future | None = None

    def stage_step(stage: str, stop: threading.Event | None = None) -> StageOutcome:
        def work() -> StageOutcome:
            return run_stage(
                stage,
                parameters[stage],
                context,
                request.timeout_seconds,
                stage_plan.keys[stage],
                reuse_from=stage_plan.reuse.get(stage),
                stop=stop,
                prepared=runners.pop(stage, None),
            )

        outcome = _timed(timings, stage, work)
        outcomes[stage] = outcome
        return outcome

    # 01_explore only reports on the data: it runs beside 02_features (the two use one core
    # each), and 03_train starts once both have succeeded. A big month is explored first,
    # then featurized (settings.overlap_max_trips: two kernels at once need too much memory).
    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="explore") as background:
        try:
            trip_files = _timed(timings, "fetch-trip-files", lambda: fetch_trip_files(request.params, request.source))
            stage_plan = early_plan if early_plan is not None else plan(request, trip_files)
            train_month, validation_month = request.months
            log_trip_datasets(
                context,
                request.source,
                request.params.color,
                {
                    month: (trip_files[month.label()], stage_plan.trip_digests[month.label()], role)
                    for month, role in ((train_month, "training"), (validation_month, "validation"))
                },
            )
            # The copied context carries the flow run into the thread, so the task belongs to it.
            explore = background.submit(contextvars.copy_context().run, stage_step, "01_explore", stop_explore)
            if not stage_plan.side_by_side:
                explore.result()
            stage_step("02_features")
            explore.result()
            stage_step("03_train")
            status = "FINISHED"
        except BaseException as ended:
            error = ended
            # Ctrl-C, SIGTERM (Prefect's TerminationSignal), or a stage whose runner the stop killed
            # (taxi_duration.orchestration.stopping): whichever reaches this frame first.
            if stopping.stopped_by(ended):
                status = "KILLED"
                stop_explore.set()
            raise
        finally:
            if explore is not None:
                concurrent.futures.wait([explore])  # its notebook is archived before the run closes
            timings.sort(key=lambda entry: ("fetch-trip-files", *STAGES).index(entry["stage"]))
            ending = RunEnding(status, error, {s: outcomes[s] for s in STAGES if s in outcomes}, timings)
            owned.error = error
            owned.status = ending.status if _close_run(context, ending) else None
            gallery_path = report_run(request, context, started, str(flow_run.id), ending)
    return _result(request, context, ending, gallery_path)


def _result(request: RunRequest, context: RunContext, ending: RunEnding, gallery_path: Path) -> dict[str, Any]:
    """What the flow returns (and the command line prints): a plain, JSON-ready summary."""
    training = ending.outcomes["03_train"]
    metrics = training.manifest["metrics"]
    params = request.params
    return {
        "color": params.color,
        "train_month": params.train_month.label(),
        "validation_month": params.validation_month.label(),
        "mlflow_run_id": context.run_id,
        "prefect_flow_run_id": str(flow_run.id),
        "experiment": request.experiment,
        "tracking_uri": context.tracking_uri,
        "model_uri": training.manifest["model_uri"],
        "run_dir": str(context.run_dir),
        "reports": [str(context.run_dir / f"{stage}.review.html") for stage in STAGES],
        "gallery": str(gallery_path),
        "promotion": None if training.reused else training.manifest.get("promotion"),
        "reused_stages": {stage: o.reused_from.mlflow_run_id for stage, o in ending.outcomes.items() if o.reused_from},
        **{key: metrics[key] for key in SUMMARY_METRICS},
    }


def _close_run(context: RunContext, ending: RunEnding) -> bool:
    """Record reuse and the final status (False: it could not be set); on the way out of a failure,
    never mask the real error."""
    try:
        _tag_reused_stages(context, ending.outcomes)
        tracking.finish_run(context.tracking_uri, context.run_id, ending.status)
        return True
    except Exception as problem:  # e.g. the tracking server went away mid-run
        print(
            f"warning: could not set MLflow run {context.run_id} to {ending.status}: {problem!r}; "
            "the next pipeline start on this host marks it KILLED if it stays RUNNING"
        )
        if ending.status == "FINISHED":
            raise
        return False


def _tag_reused_stages(context: RunContext, outcomes: dict[str, StageOutcome]) -> None:
    """Say on the MLflow run which stages were reused, and from which run and folder."""
    reused = {stage: outcome.reused_from for stage, outcome in outcomes.items() if outcome.reused_from is not None}
    tags = {"taxi.reused_stages": ",".join(reused)}
    for stage, entry in reused.items():
        tags[f"taxi.stage.{stage}.reused_from_run"] = entry.mlflow_run_id
        tags[f"taxi.stage.{stage}.reused_from_dir"] = entry.run_dir
    tracking.set_tags(context.tracking_uri, context.run_id, tags)


def _timed(timings: list[dict[str, Any]], stage: str, work: Callable[[], T]) -> T:
    """Run `work`, recording the stage's wall time and outcome (a StageOutcome's status) even when it raises."""
    started = time.monotonic()
    entry: dict[str, Any] = {"stage": stage, "status": "FAILED", "seconds": None}
    timings.append(entry)
    try:
        result = work()
        entry["status"] = result.status if isinstance(result, StageOutcome) else "COMPLETED"
        return result
    finally:
        entry["seconds"] = round(time.monotonic() - started, 2)
