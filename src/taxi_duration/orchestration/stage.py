"""The pipeline's Prefect tasks: make the trip files local, then run (or reuse) each notebook stage.

Each notebook is one task, executed by papermill in a child process (taxi_duration.runner).
Whatever a stage leaves, executed or reused, passed or failed, is archived in the MLflow run
under `notebooks/` and `reports/`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, Failed, State

from taxi_duration import data, datasets, reports, runfiles, runner, settings, stagecache, stages, tracking
from taxi_duration.orchestration.progress import StageProgress
from taxi_duration.periods import Month, PipelineParams
from taxi_duration.runner import processes as runner_processes

if TYPE_CHECKING:
    from prefect import Task
    from prefect.client.schemas import TaskRun

T = TypeVar("T")


@dataclass(frozen=True)
class RunContext:
    """Where one pipeline run records what its stages do."""

    tracking_uri: str
    run_id: str  # the MLflow run the flow owns
    run_dir: Path


@dataclass(frozen=True)
class StageOutcome:
    """How a stage ended: its manifest, and the cache entry it was reused from (None: it ran)."""

    stage: str
    manifest: dict[str, Any]
    reused_from: stagecache.CacheEntry | None = None

    @property
    def reused(self) -> bool:
        return self.reused_from is not None

    @property
    def status(self) -> str:
        return "CACHED" if self.reused else "COMPLETED"


def _retry_unless_bad_data(task: Task[..., Any], task_run: TaskRun, state: State[Any]) -> bool:
    # A missing or invalid file will not fix itself; network hiccups might.
    return not isinstance(state.data, data.TripDataError)


@task(
    name="fetch-trip-files",
    retries=2,
    retry_delay_seconds=[5, 30],
    retry_condition_fn=_retry_unless_bad_data,
    cache_policy=NO_CACHE,
)
def fetch_trip_files(params: PipelineParams, source: data.TripSource) -> dict[str, str]:
    """Make the training and validation files local and validated before any notebook runs."""
    return {
        str(month): str(source.ensure_local(params.color, month))
        for month in (params.train_month, params.validation_month)
    }


@task(
    name="fetch-trip-file",
    retries=2,
    retry_delay_seconds=[5, 30],
    retry_condition_fn=_retry_unless_bad_data,
    cache_policy=NO_CACHE,
)
def fetch_trip_file(color: str, month: Month, source: data.TripSource) -> str:
    """Make the month to score local and validated (its dropoff times may be missing: not published yet)."""
    return str(source.ensure_local(color, month, actuals=False))


def log_trip_datasets(
    context: RunContext, source: data.TripSource, color: str, files: dict[Month, tuple[str, str, str]]
) -> None:
    """Name the run's input files in MLflow (its Datasets tab): month -> (local path, sha256, context)."""
    datasets.log_trip_datasets(
        context.tracking_uri,
        context.run_id,
        [
            datasets.TripDataset(
                name=data.trip_filename(color, month),
                source=source.origin(color, month),
                sha256=sha256,
                rows=data.trip_count(Path(path)),
                context=role,
            )
            for month, (path, sha256, role) in files.items()
        ],
    )


def quiet_failure(failed: runner.NotebookExecutionError | runner.NotebookStopped) -> State:
    """A notebook's failure as a Failed state, for a task or flow to return rather than raise:
    Prefect then logs its one paragraph, not a traceback of the runner and of Prefect itself.
    Unexpected errors still raise, with their tracebacks."""
    return Failed(message=str(failed), data=failed)


def ending_quietly(body: Callable[[], T]) -> T:
    """A flow's body, whose notebook failure or stop ends the flow run as `quiet_failure` (the caller
    of the flow still gets the NotebookExecutionError or NotebookStopped raised)."""
    try:
        return body()
    except (runner.NotebookExecutionError, runner.NotebookStopped) as failed:
        # Typed as the body's result: Prefect makes a returned State the flow run's own and raises
        # it to the flow's caller, which never receives the State itself.
        return cast(T, quiet_failure(failed))


def run_stage(
    stage: str,
    parameters: dict[str, Any],
    context: RunContext,
    timeout_seconds: int,
    key: str,
    reuse_from: stagecache.CacheEntry | None = None,
    stop: threading.Event | None = None,
    prepared: runner.PreparedRunner | None = None,
) -> StageOutcome:
    """Reuse the cache entry `reuse_from` if given, else execute the stage; archive either way.

    One Prefect task run, named after the stage. An executed stage's outputs become the cache
    entry for `key` (replacing an older one). `prepared` (a runner started ahead for this stage)
    executes it; it is closed either way. Once this process is being stopped (SIGTERM, Ctrl-C), no
    stage starts: NotebookStopped.
    """
    if runner_processes.stopping():
        if prepared is not None:
            prepared.close()
        raise runner.NotebookStopped(f"{stage} not started: the pipeline is being stopped")
    outcome = _stage_task(stage, parameters, context, timeout_seconds, key, reuse_from, stop, prepared)
    # A reused stage's task returns its final state (Cached), which Prefect hands back as is.
    return outcome.result() if isinstance(outcome, State) else outcome


@task(name="run-notebook", task_run_name="{stage}", cache_policy=NO_CACHE)
def _stage_task(
    stage: str,
    parameters: dict[str, Any],
    context: RunContext,
    timeout_seconds: int,
    key: str,
    reuse_from: stagecache.CacheEntry | None,
    stop: threading.Event | None,
    prepared: runner.PreparedRunner | None,
) -> StageOutcome | State:
    if reuse_from is not None:
        if prepared is not None:
            prepared.close()
        stagecache.StageCache.restore(reuse_from, context.run_dir)
        _archive_stage_files(context, stage)
        manifest = runfiles.read_manifest(context.run_dir, stage)
        if stage == "03_train":
            _replay_training(context, manifest)
        reused = f"inputs unchanged: reused from MLflow run {reuse_from.mlflow_run_id} ({reuse_from.run_dir})"
        # Completed, named Cached as Prefect's own cache hits are: the UI shows the reuse.
        return Completed(name="Cached", message=reused, data=StageOutcome(stage, manifest, reuse_from))
    try:
        manifest = _execute_notebook(stage, parameters, context, timeout_seconds, stop, prepared)
    except (runner.NotebookExecutionError, runner.NotebookStopped) as failed:
        return quiet_failure(failed)
    stagecache.StageCache(settings.stage_cache_dir()).store(
        stage, key, context.run_dir, context.run_id, _stage_files(stage, manifest)
    )
    return StageOutcome(stage, manifest)


def _stage_files(stage: str, manifest: dict[str, Any]) -> list[str]:
    """What a stage leaves in the run folder (relative paths): what a reuse must bring back."""
    own = [f"{stage}.ipynb", f"{stage}.html", f"{stage}.review.html", runfiles.manifest_path(Path(), stage).name]
    return own + list(manifest.get("files", {}).values())


def _archive_stage_files(context: RunContext, stage: str) -> None:
    run_dir = context.run_dir
    tracking.log_files(context.tracking_uri, context.run_id, [run_dir / f"{stage}.ipynb"], "notebooks")
    tracking.log_files(
        context.tracking_uri, context.run_id, [run_dir / f"{stage}.html", run_dir / f"{stage}.review.html"], "reports"
    )


def _replay_training(context: RunContext, manifest: dict[str, Any]) -> None:
    """Give a run whose training was reused the same params, metrics and preprocessor."""
    from taxi_duration import model  # XGBoost: imported only when a reused training needs replaying

    uri, run_id = context.tracking_uri, context.run_id
    tracking.log_params(uri, run_id, model.training_params())
    tracking.log_metrics(uri, run_id, manifest["metrics"])
    tracking.log_files(uri, run_id, [context.run_dir / runfiles.PREPROCESSOR_FILENAME], "preprocessor")
    tracking.set_tags(
        uri,
        run_id,
        {
            "taxi.model_uri": manifest["model_uri"],
            # The registry saw this model when its training ran; registering it again would
            # only add a duplicate version.
            "taxi.promotion.decision": "reused",
            "taxi.promotion.reason": f"training reused from run {manifest['mlflow_run_id']}, whose model was registered and gated then",
        },
    )


def _execute_notebook(
    stage: str,
    parameters: dict[str, Any],
    context: RunContext,
    timeout_seconds: int,
    stop: threading.Event | None = None,
    prepared: runner.PreparedRunner | None = None,
) -> dict[str, Any]:
    """Execute one notebook, archive the executed copy and its reports, return its manifest."""
    executed = context.run_dir / f"{stage}.ipynb"
    try:
        result = runner.execute_notebook(
            stages.notebook_path(stage),
            executed,
            parameters,
            timeout_seconds=timeout_seconds,
            stop=stop,
            prepared=prepared,
            on_progress=StageProgress(stage),
        )
    except runner.NotebookExecutionError as error:
        _archive(context, error.result)
        raise
    except BaseException:  # stopped from outside (SIGTERM, Ctrl-C, the flow): keep what ran
        _archive_interrupted(context, executed)
        raise
    _archive(context, result)
    return runfiles.read_manifest(context.run_dir, stage)


def _archive_interrupted(context: RunContext, executed: Path) -> None:
    """Render and archive a notebook the pipeline was stopped in, as far as it got."""
    if not executed.is_file():
        return
    try:
        # The notebook first: its reports can fail to render (a copy the stop cut short).
        tracking.log_files(context.tracking_uri, context.run_id, [executed], "notebooks")
        paths = reports.render_reports(
            executed, failure="the pipeline was stopped (SIGTERM or Ctrl-C) while this notebook ran"
        )
        tracking.log_files(context.tracking_uri, context.run_id, [paths.full, paths.review], "reports")
    except Exception as problem:  # noqa: BLE001 - we are already on the way out
        print(f"warning: could not archive the interrupted {executed.name}: {problem!r}")


def _archive(context: RunContext, result: runner.NotebookResult) -> None:
    if result.executed_notebook.is_file():
        tracking.log_files(context.tracking_uri, context.run_id, [result.executed_notebook], "notebooks")
    if result.reports is not None:
        tracking.log_files(
            context.tracking_uri, context.run_id, [result.reports.full, result.reports.review], "reports"
        )
