"""The stage engine: a pipeline's declared stages as Prefect tasks, each started once what it waits for is done.

Each notebook is one task, executed by papermill in a child process (taxi_duration.runner), or
reused from an earlier run whose inputs were the same (taxi_duration.orchestration.stage_cache). Whatever a
stage leaves, executed or reused, passed or failed, is archived in the MLflow run under
`notebooks/` and `reports/`. The engine iterates over the declarations (taxi_duration.orchestration.declarations)
and names no stage.

When a stage starts (`waits_for`): after its upstream. Stages that are not report-only run one
at a time, in declaration order, each with the machine's cores to itself; a report-only stage
runs as soon as its upstream is done, beside the stage that follows it, and the stage after
that waits for it. The plan's limit (two notebooks at once for a small month, else one) caps
them all, through the task runner's threads.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, Failed, State

from taxi_duration import manifests, runfiles, runner, settings
from taxi_duration.data import tripfiles
from taxi_duration.data.periods import Month
from taxi_duration.orchestration import declarations, stage_cache
from taxi_duration.orchestration.declarations import Stage
from taxi_duration.orchestration.progress import StageProgress
from taxi_duration.orchestration.request import StagePlan
from taxi_duration.review import reports
from taxi_duration.runner import processes as runner_processes
from taxi_duration.tracking import datasets, mlflow_runs

if TYPE_CHECKING:
    from prefect import Task
    from prefect.client.schemas import TaskRun
    from prefect.futures import PrefectFuture

T = TypeVar("T")
Record = TypeVar("Record", bound=manifests.StageManifest)


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
    manifest: manifests.StageManifest
    reused_from: stage_cache.CacheEntry | None = None

    @property
    def reused(self) -> bool:
        return self.reused_from is not None

    @property
    def status(self) -> str:
        return "CACHED" if self.reused else "COMPLETED"


def last_record(outcomes: Mapping[str, StageOutcome], kind: type[Record]) -> tuple[Record | None, StageOutcome | None]:
    """The manifest of the last stage whose record is of `kind` (a training, a scoring record), with its outcome:
    the flows ask for a kind of result, never for a stage by name."""
    for outcome in reversed(list(outcomes.values())):
        if isinstance(outcome.manifest, kind):
            return outcome.manifest, outcome
    return None, None


def manifest_metrics(outcomes: Mapping[str, StageOutcome]) -> dict[str, float]:
    """Every stage manifest's `metrics`, merged in pipeline order."""
    merged: dict[str, float] = {}
    for outcome in outcomes.values():
        merged.update(outcome.manifest.metrics)
    return merged


def _retry_unless_bad_data(task: Task[..., Any], task_run: TaskRun, state: State[Any]) -> bool:
    # A missing or invalid file will not fix itself; network hiccups might.
    return not isinstance(state.data, tripfiles.TripDataError)


@task(
    name="fetch-trip-files",
    retries=2,
    retry_delay_seconds=[5, 30],
    retry_condition_fn=_retry_unless_bad_data,
    cache_policy=NO_CACHE,
)
def fetch_trip_files(
    color: str, months: dict[str, Month], source: tripfiles.TripSource, actuals: bool = True
) -> dict[str, str]:
    """Make the run's months local and validated before any notebook runs (role -> path).

    Without `actuals` (a month to score) a file whose dropoff times are not published yet passes.
    """
    return {role: str(source.ensure_local(color, month, actuals=actuals)) for role, month in months.items()}


def log_trip_datasets(
    context: RunContext, source: tripfiles.TripSource, color: str, files: dict[Month, tuple[str, str, str]]
) -> None:
    """Name the run's input files in MLflow (its Datasets tab): month -> (local path, sha256, context)."""
    datasets.log_trip_datasets(
        context.tracking_uri,
        context.run_id,
        [
            datasets.TripDataset(
                name=tripfiles.trip_filename(color, month),
                source=source.origin(color, month),
                sha256=sha256,
                rows=tripfiles.trip_count(Path(path)),
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


class StagesRun:
    """One run's stages as they go: shared by the stage tasks (threads), read by the flow afterwards."""

    def __init__(self, context: RunContext, timeout_seconds: int, runners: declarations.Runners) -> None:
        self.context = context
        self.timeout_seconds = timeout_seconds
        self.runners = runners  # started ahead; each stage takes its own
        self.stop = threading.Event()  # set when the run is stopped: running notebooks end
        self.outcomes: dict[str, StageOutcome] = {}  # stages that succeeded (ran or reused)
        self.errors: dict[str, BaseException] = {}  # stages that failed, and why
        self.timings: dict[str, dict[str, Any]] = {}  # stages that started: stage, status, seconds


def waits_for(pipeline: tuple[Stage, ...]) -> dict[str, tuple[str, ...]]:
    """The stages each stage waits for before it starts (see the module's docstring)."""
    waits: dict[str, tuple[str, ...]] = {}
    previous: Stage | None = None  # the last stage that is not report-only
    beside_previous: list[str] = []  # report-only stages declared before `previous`
    since_previous: list[str] = []  # report-only stages declared after it
    for stage in pipeline:
        if stage.report_only:
            waits[stage.name] = stage.needs
            since_previous.append(stage.name)
            continue
        before = [previous.name] if previous is not None else []
        waits[stage.name] = tuple(dict.fromkeys([*stage.needs, *before, *beside_previous]))
        previous, beside_previous, since_previous = stage, since_previous, []
    return waits


def run_stages(run: StagesRun, plan: StagePlan, values: Mapping[str, Any]) -> None:
    """Run (or reuse) the plan's stages as Prefect tasks, at most `plan.limit` at once.

    Each stage gets the run `values` its parameters cell declares. A failed stage's downstream
    does not start; the others go on. Returns once every started stage has ended (its notebook
    archived), raising the first failure in pipeline order; on a stop (SIGTERM, Ctrl-C) the
    running notebooks are stopped first.
    """
    from prefect.task_runners import ThreadPoolTaskRunner

    parameters = {s.name: runner.stage_parameters(s.notebook, values, s.parameters) for s in plan.stages}
    waits = waits_for(plan.stages)
    futures: dict[str, PrefectFuture[Any]] = {}
    pool: ThreadPoolTaskRunner[Any] = ThreadPoolTaskRunner(max_workers=plan.limit)
    with pool as task_runner:
        try:
            for stage in plan.stages:
                futures[stage.name] = task_runner.submit(
                    run_stage,
                    {
                        "stage": stage,
                        "parameters": parameters[stage.name],
                        "key": plan.keys[stage.name],
                        "reuse_from": plan.reuse.get(stage.name),
                        "run": run,
                    },
                    wait_for=[futures[name] for name in waits[stage.name]],
                )
            for future in futures.values():
                future.wait()
        except BaseException:
            run.stop.set()  # Ctrl-C or SIGTERM reached this thread: the notebooks stop too
            raise
        finally:
            for future in futures.values():
                future.wait()  # every started stage's notebook is archived before the run closes
    for stage in plan.stages:
        if stage.name in run.errors:
            raise run.errors[stage.name]


def tag_reused_stages(context: RunContext, outcomes: Mapping[str, StageOutcome]) -> None:
    """Say on the MLflow run which stages were reused, and from which run and folder."""
    reused = {stage: outcome.reused_from for stage, outcome in outcomes.items() if outcome.reused_from is not None}
    tags = {"taxi.reused_stages": ",".join(reused)}
    for stage, entry in reused.items():
        tags[f"taxi.stage.{stage}.reused_from_run"] = entry.mlflow_run_id
        tags[f"taxi.stage.{stage}.reused_from_dir"] = entry.run_dir
    mlflow_runs.set_tags(context.tracking_uri, context.run_id, tags)


def _stage_run_name() -> str:
    from prefect.runtime import task_run

    return str(task_run.parameters["stage"].name)


@task(name="run-notebook", task_run_name=_stage_run_name, cache_policy=NO_CACHE)
def run_stage(
    stage: Stage,
    parameters: dict[str, Any],
    key: str,
    reuse_from: stage_cache.CacheEntry | None,
    run: StagesRun,
) -> StageOutcome | State:
    """Reuse the cache entry `reuse_from` if given, else execute the stage; archive either way.

    One Prefect task run, named after the stage. An executed stage's outputs become the cache
    entry for `key` (replacing an older one). A runner started ahead for this stage executes
    it; it is closed either way. Once this process is being stopped (SIGTERM, Ctrl-C), no
    stage starts: NotebookStopped. The outcome, or the error, is recorded in `run`.
    """
    prepared = run.runners.pop(stage.name, None)
    timing: dict[str, Any] = {"stage": stage.name, "status": "FAILED", "seconds": None}
    run.timings[stage.name] = timing
    started = time.monotonic()
    try:
        if runner_processes.stopping() or run.stop.is_set():
            raise runner.NotebookStopped(f"{stage.name} not started: the pipeline is being stopped")
        if reuse_from is not None:
            if prepared is not None:
                prepared.close()
            outcome = _reuse(stage, reuse_from, run.context)
        else:
            taken, prepared = prepared, None  # the runner's execution takes it over
            outcome = _execute(stage, parameters, key, run, taken)
        run.outcomes[stage.name] = outcome
        timing["status"] = outcome.status
    except BaseException as error:
        run.errors[stage.name] = error
        if isinstance(error, (runner.NotebookExecutionError, runner.NotebookStopped)):
            return quiet_failure(error)
        raise
    finally:
        if prepared is not None:
            prepared.close()
        timing["seconds"] = round(time.monotonic() - started, 2)
    if outcome.reused_from is None:
        return outcome
    entry = outcome.reused_from
    reused = f"inputs unchanged: reused from MLflow run {entry.mlflow_run_id} ({entry.run_dir})"
    # Completed, named Cached as Prefect's own cache hits are: the UI shows the reuse.
    return Completed(name="Cached", message=reused, data=outcome)


def _reuse(stage: Stage, entry: stage_cache.CacheEntry, context: RunContext) -> StageOutcome:
    stage_cache.StageCache.restore(entry, context.run_dir)
    _archive_stage_files(context, stage.name)
    manifest = manifests.read(context.run_dir, stage.name)
    replay_run_record(context, manifest.run_record)
    return StageOutcome(stage.name, manifest, entry)


def _execute(
    stage: Stage, parameters: dict[str, Any], key: str, run: StagesRun, prepared: runner.PreparedRunner | None
) -> StageOutcome:
    context = run.context
    manifest = _execute_notebook(stage, parameters, run, prepared)
    files = stage_files(stage, context.run_dir)
    stage_cache.StageCache(settings.stage_cache_dir()).store(stage.name, key, context.run_dir, context.run_id, files)
    return StageOutcome(stage.name, manifest)


def replay_run_record(context: RunContext, record: manifests.RunRecord | None) -> None:
    """Give a run that reuses a stage what the stage's notebook logged on the run it ran in.

    The manifest's `run_record` says what: params, metrics, tags, files (MLflow artifact
    folder -> run-folder paths), and the tags that say it was reused (`tags_when_reused`).
    """
    if record is None:
        return
    uri, run_id = context.tracking_uri, context.run_id
    if record.params:
        mlflow_runs.log_params(uri, run_id, record.params)
    if record.metrics:
        mlflow_runs.log_metrics(uri, run_id, record.metrics)
    for artifact_path, paths in record.artifacts.items():
        mlflow_runs.log_files(uri, run_id, [context.run_dir / path for path in paths], artifact_path)
    tags = {**record.tags, **record.tags_when_reused}
    if tags:
        mlflow_runs.set_tags(uri, run_id, tags)


def stage_files(stage: Stage, run_dir: Path) -> list[str]:
    """What a stage left in the run folder (relative paths): its notebook, reports, manifest and
    declared products; what a reuse must bring back."""
    name = stage.name
    files = [f"{name}.ipynb", f"{name}.html", f"{name}.review.html", runfiles.manifest_path(Path(), name).name]
    for product in stage.produces:
        path = run_dir / product
        if path.is_dir():
            files += sorted(found.relative_to(run_dir).as_posix() for found in path.rglob("*") if found.is_file())
        elif path.is_file() and not product.endswith("/"):
            files.append(product)
        else:
            raise declarations.DeclarationError(
                f"{name} succeeded but left no {product} in {run_dir}, which {declarations.declarations_path()} "
                f"says it produces: correct its `produces:`"
            )
    return files


def _archive_stage_files(context: RunContext, stage: str) -> None:
    run_dir = context.run_dir
    mlflow_runs.log_files(context.tracking_uri, context.run_id, [run_dir / f"{stage}.ipynb"], "notebooks")
    mlflow_runs.log_files(
        context.tracking_uri, context.run_id, [run_dir / f"{stage}.html", run_dir / f"{stage}.review.html"], "reports"
    )


def _execute_notebook(
    stage: Stage, parameters: dict[str, Any], run: StagesRun, prepared: runner.PreparedRunner | None
) -> manifests.StageManifest:
    """Execute one notebook, archive the executed copy and its reports, return its manifest."""
    context = run.context
    executed = context.run_dir / f"{stage.name}.ipynb"
    try:
        result = runner.execute_notebook(
            stage.notebook,
            executed,
            parameters,
            timeout_seconds=run.timeout_seconds,
            stop=run.stop,
            prepared=prepared,
            on_progress=StageProgress(stage.name),
        )
    except runner.NotebookExecutionError as error:
        _archive(context, error.result)
        raise
    except BaseException:  # stopped from outside (SIGTERM, Ctrl-C, the flow): keep what ran
        _archive_interrupted(context, executed)
        raise
    _archive(context, result)
    return manifests.read(context.run_dir, stage.name)


def _archive_interrupted(context: RunContext, executed: Path) -> None:
    """Render and archive a notebook the pipeline was stopped in, as far as it got."""
    if not executed.is_file():
        return
    try:
        # The notebook first: its reports can fail to render (a copy the stop cut short).
        mlflow_runs.log_files(context.tracking_uri, context.run_id, [executed], "notebooks")
        paths = reports.render_reports(
            executed, failure="the pipeline was stopped (SIGTERM or Ctrl-C) while this notebook ran"
        )
        mlflow_runs.log_files(context.tracking_uri, context.run_id, [paths.full, paths.review], "reports")
    except Exception as problem:  # noqa: BLE001 - we are already on the way out
        print(f"warning: could not archive the interrupted {executed.name}: {problem!r}")


def _archive(context: RunContext, result: runner.NotebookResult) -> None:
    if result.executed_notebook.is_file():
        mlflow_runs.log_files(context.tracking_uri, context.run_id, [result.executed_notebook], "notebooks")
    if result.reports is not None:
        mlflow_runs.log_files(
            context.tracking_uri, context.run_id, [result.reports.full, result.reports.review], "reports"
        )
