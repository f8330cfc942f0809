"""The scoring flow: score one month's trips with a registered model (by default the champion).

It runs the `scoring` pipeline notebooks/pipeline.yaml declares through the same stage engine
as training (taxi_duration.orchestration.tasks): an MLflow run of its own (in the scoring
experiment, apart from training runs), each executed notebook and its reports archived, their
outputs cached by content (the notebook, the month's file, and the pinned model version the
stage receives as `model_uri`: a moved alias scores again), a row in the gallery. The run names
its input file in MLflow's Datasets tab (context `scoring`) and links the model it used.
"""

# No `from __future__ import annotations` here: the flows' parameter types must be real objects,
# because Prefect builds its parameter model from them in whatever process runs the flow (a
# Dask worker unpickles the flow without this module's names, so strings would not resolve).
import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.runtime import flow_run

from taxi_duration import manifests, runfiles, settings
from taxi_duration.data import tripfiles
from taxi_duration.data.periods import Color, Month, MonthNumber, Year, scoring_month
from taxi_duration.modeling import batch_scoring
from taxi_duration.orchestration import declarations, links, lost_server, stopping
from taxi_duration.orchestration.declarations import Stage
from taxi_duration.orchestration.request import NOT_YET, handed_request, plan_stages
from taxi_duration.orchestration.run_summary import stage_rows_of
from taxi_duration.orchestration.tasks import (
    RunContext,
    StageOutcome,
    StagesRun,
    ending_quietly,
    fetch_trip_files,
    last_record,
    log_trip_datasets,
    manifest_metrics,
    run_stages,
    tag_reused_stages,
)
from taxi_duration.review import gallery
from taxi_duration.tracking import mlflow_runs

SCORING = "scoring"  # the pipeline (notebooks/pipeline.yaml) a ScoreRequest runs
SCORE_FLOW_NAME = "nyc-taxi-score"


@dataclass(frozen=True)
class ScoreRequest:
    """Everything a scoring run needs before it starts, checked: the month, the source, the model."""

    month: Month
    color: str
    source: tripfiles.TripSource
    model: batch_scoring.ScoringModel
    tracking_uri: str
    experiment: str
    force: bool
    timeout_seconds: int
    pipeline: tuple[Stage, ...]  # the scoring stages, as notebooks/pipeline.yaml declares them

    @property
    def months(self) -> dict[str, Month]:
        """The month the run reads, by role (stages.MONTH_ROLES)."""
        return {"scored": self.month}

    @property
    def flow_parameters(self) -> dict[str, Any]:
        return {
            "year": self.month.year,
            "month": self.month.month,
            "color": self.color,
            "model_uri": self.model.requested_uri,
            "data_source": self.source.location,
            "experiment": self.experiment,
            "force": self.force,
        }


def resolve_score_request(
    year: int | str,
    month: int | str,
    color: str = "green",
    model_uri: str = batch_scoring.DEFAULT_MODEL_URI,
    data_source: str | None = None,
    experiment: str | None = None,
    force: bool = False,
) -> ScoreRequest:
    """The scoring run these inputs ask for.

    InvalidParameterError, TripDataError or ValueError name bad input; TrackingUnavailableError
    an unreachable tracking server; scoring.ModelNotFoundError a URI that names no version.
    """
    scored, color_text = scoring_month(year, month, color)
    source = tripfiles.trip_source(data_source)
    tripfiles.check_source_location(source.location)
    tracking_uri = settings.tracking_uri()
    mlflow_runs.check_reachable(tracking_uri)
    return ScoreRequest(
        month=scored,
        color=color_text,
        source=source,
        model=batch_scoring.resolve_model(tracking_uri, model_uri),
        tracking_uri=tracking_uri,
        experiment=settings.scoring_experiment_name(experiment),
        force=force,
        timeout_seconds=settings.notebook_timeout_seconds(),
        pipeline=declarations.pipeline(SCORING),
    )


def run_values(
    request: ScoreRequest, trip_files: Mapping[str, str], run_dir: str = NOT_YET, mlflow_run_id: str = NOT_YET
) -> dict[str, Any]:
    """What a scoring run offers its stages; each gets the values its parameters cell declares."""
    return {
        "year": request.month.year,
        "month": request.month.month,
        "color": request.color,
        # The version itself: the alias may move while the run is going, and a moved alias scores again.
        "model_uri": request.model.pinned_uri,
        "data_source": request.source.location,
        "data_dir": str(request.source.cache_dir),
        **{f"{role}_file": path for role, path in trip_files.items()},
        "run_dir": run_dir,
        "mlflow_run_id": mlflow_run_id,
        "tracking_uri": request.tracking_uri,
        "experiment_name": request.experiment,
    }


@flow(name=SCORE_FLOW_NAME, log_prints=True)
def taxi_duration_scoring(
    year: Year = 2023,
    month: MonthNumber = 5,
    color: Color = "green",
    model_uri: str = batch_scoring.DEFAULT_MODEL_URI,
    data_source: str | None = None,
    experiment: str | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Score YEAR-MONTH's trips with `model_uri` (default: the champion) and report accuracy and drift.

    The predictions go into the run's folder; a month without published dropoff times is
    scored without the accuracy part. An unchanged month scored by the same model version is
    reused unless `force`.

    Args:
        year: Year of the month to score (2009-2100).
        month: Month to score, 1-12.
        color: Taxi colour: green or yellow.
        model_uri: Registered model to score with: models:/NAME@ALIAS or models:/NAME/VERSION.
        data_source: URL prefix or folder of {color}_tripdata_YYYY-MM.parquet; None: $TAXI_DATA_SOURCE, else TLC.
        experiment: MLflow experiment of the scoring run; None: $TAXI_SCORING_EXPERIMENT, else <experiment>-scoring.
        force: Score again even if this month was scored by the same model version before.
    """
    handed = handed_request(ScoreRequest)  # the command line's request, resolved and checked already
    if handed is not None:
        request, owned = handed
    else:
        request = resolve_score_request(year, month, color, model_uri, data_source, experiment, force)
        owned = lost_server.OwnedRun()
    return ending_quietly(lambda: run_scoring(request, owned))


def run_scoring(request: ScoreRequest, owned: lost_server.OwnedRun) -> dict[str, Any]:
    """The flow's body: fetch the month, open the MLflow run, run or reuse the stages, record it all.

    `owned` learns where the MLflow run got to (see pipeline.run_pipeline).
    """
    started = dt.datetime.now(dt.UTC)
    trip_files = fetch_trip_files(request.color, request.months, request.source, actuals=False)
    stage_plan = plan_stages(
        request.pipeline, run_values(request, trip_files), trip_files, request.force, settings.overlap_max_trips()
    )
    context = _start_mlflow_run(request, started)
    owned.run_id, owned.run_dir = context.run_id, context.run_dir
    print(f"MLflow run {context.run_id} in experiment {request.experiment!r}; outputs in {context.run_dir}")
    log_trip_datasets(
        context,
        request.source,
        request.color,
        {month: (trip_files[role], stage_plan.trip_digests[role], SCORING) for role, month in request.months.items()},
    )
    _link_model(context, request.model)
    status, error = "FAILED", None
    run = StagesRun(context, request.timeout_seconds, {})
    try:
        run_stages(run, stage_plan, run_values(request, trip_files, str(context.run_dir), context.run_id))
        mlflow_runs.log_metrics(context.tracking_uri, context.run_id, _numeric(manifest_metrics(run.outcomes)))
        tag_reused_stages(context, run.outcomes)
        status = "FINISHED"
    except BaseException as ended:
        error = ended
        if stopping.stopped_by(ended):  # SIGTERM, Ctrl-C, or the stop's killing of its runner
            status = "KILLED"
        raise
    finally:
        owned.error = error
        mlflow_runs.finish_run(context.tracking_uri, context.run_id, status)
        owned.status = status
        outcomes = {stage.name: run.outcomes[stage.name] for stage in request.pipeline if stage.name in run.outcomes}
        timings = [run.timings[stage.name] for stage in request.pipeline if stage.name in run.timings]
        gallery_path = _report(request, context, started, status, error, outcomes, timings)
    owned.result = _result(request, context, outcomes, gallery_path)
    return owned.result


def _start_mlflow_run(request: ScoreRequest, started: dt.datetime) -> RunContext:
    model = request.model
    tags = {
        **mlflow_runs.process_tags(),
        "prefect.flow_run_id": str(flow_run.id),
        "prefect.flow_run_name": str(flow_run.name),
        "taxi.kind": "score",
        "taxi.color": request.color,
        "taxi.scored_month": request.month.label(),
        "taxi.model_name": model.name,
        "taxi.model_version": model.version,
    }
    commit = mlflow_runs.git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    run_id = mlflow_runs.start_run(
        request.tracking_uri,
        request.experiment,
        run_name=f"score-{request.color}-{request.month.label()}-v{model.version}-{started:%Y%m%dT%H%M%SZ}",
        params={
            "year": request.month.year,
            "month": request.month.month,
            "color": request.color,
            "data_source": request.source.location,
            "model_uri": model.pinned_uri,
            "requested_model_uri": model.requested_uri,
        },
        tags=tags,
    )
    run_dir = runfiles.run_folder(
        settings.outputs_dir(), request.color, request.month.label(), started, run_id, scoring=True
    )
    mlflow_runs.set_tags(request.tracking_uri, run_id, {"taxi.run_dir": str(run_dir)})
    return RunContext(request.tracking_uri, run_id, run_dir)


def _link_model(context: RunContext, model: batch_scoring.ScoringModel) -> None:
    """Record the model version as an input of the run (the run page links to it)."""
    if model.model_id is None:
        return
    from mlflow.entities import LoggedModelInput

    mlflow_runs.mlflow_client(context.tracking_uri).log_inputs(
        context.run_id, models=[LoggedModelInput(model_id=model.model_id)]
    )


def _numeric(metrics: dict[str, Any]) -> dict[str, float]:
    return {key: float(value) for key, value in metrics.items() if isinstance(value, (int, float))}


def _report(
    request: ScoreRequest,
    context: RunContext,
    started: dt.datetime,
    status: str,
    error: BaseException | None,
    outcomes: dict[str, StageOutcome],
    timings: list[dict[str, Any]],
) -> Path:
    """run.json, the gallery and the Prefect summary; a problem here is printed, never raised."""
    gallery_path = settings.outputs_dir() / gallery.GALLERY
    try:
        finished = dt.datetime.now(dt.UTC)
        metrics = manifest_metrics(outcomes)
        experiment_id = mlflow_runs.experiment_id_of(context.tracking_uri, context.run_id)
        record = {
            "kind": "score",
            "color": request.color,
            "scored_month": request.month.label(),
            "model": request.model.label(),
            "model_train_month": request.model.train_month,
            "status": status,
            "error": None if error is None else (str(error) or type(error).__name__),
            "started": started.isoformat(),
            "finished": finished.isoformat(),
            "seconds": round((finished - started).total_seconds(), 1),
            "rmse": metrics.get("rmse"),
            "mlflow_run_id": context.run_id,
            "experiment": request.experiment,
            "experiment_id": experiment_id,
            "tracking_uri": context.tracking_uri,
            "mlflow_url": gallery.mlflow_run_url(context.tracking_uri, experiment_id, context.run_id),
            "prefect_flow_run_id": str(flow_run.id),
            "stages": stage_rows_of(timings, {stage.name for stage in request.pipeline}),
            **declarations.provenance(request.pipeline),
        }
        gallery.write_run_record(context.run_dir, record)
        gallery_path = gallery.build_gallery(settings.outputs_dir())
        lost_server.unless_lost(lambda: _publish_summary(record, metrics, context.run_dir, gallery_path))
    except Exception as problem:  # noqa: BLE001 - reporting must not mask the run's result
        print(f"warning: could not record the scoring run in the gallery or Prefect artifacts: {problem!r}")
    return gallery_path


def _publish_summary(record: dict[str, Any], metrics: dict[str, Any], run_dir: Path, gallery_path: Path) -> None:
    from prefect.artifacts import create_markdown_artifact

    def figure(key: str, digits: int = 3) -> str:
        value = metrics.get(key)
        return "n/a" if value is None else f"{value:.{digits}f}"

    run_links = links.run_links(record, run_dir, gallery_path)
    markdown = (
        f"# {record['color']} taxis, {record['scored_month']} scored with {record['model']}: {record['status']}\n\n"
        f"| figure | value |\n|---|---|\n| RMSE on the scored trips (min) | {figure('rmse')} |\n"
        f"| trips scored | {int(metrics.get('scored_trips', 0)):,} |\n"
        f"| trips refused | {int(metrics.get('refused_trips', 0)):,} |\n"
        f"| trip-distance PSI | {figure('distance_psi', 4)} |\n| duration PSI | {figure('duration_psi', 4)} |\n"
        f"| PU_DO pairs unseen in training | {figure('unseen_pu_do_share', 4)} |\n\n"
        f"## Links\n{links.markdown_list(run_links)}\n"
    )
    create_markdown_artifact(
        key=f"taxi-score-{record['color']}-{record['scored_month']}",
        description="Scoring run summary",
        markdown=markdown,
    )
    links.publish(record, run_links, markdown)


def _result(
    request: ScoreRequest, context: RunContext, outcomes: dict[str, StageOutcome], gallery_path: Path
) -> dict[str, Any]:
    scored, _ = last_record(outcomes, manifests.ScoringManifest)
    if scored is None:
        raise ValueError(f"no scoring stage's manifest among {', '.join(outcomes)}: the scoring pipeline declares none")
    has_actuals, files = scored.has_actuals, scored.files
    return {
        "color": request.color,
        "scored_month": request.month.label(),
        "model": request.model.label(),
        "model_uri": request.model.pinned_uri,
        "model_train_month": request.model.train_month,
        "model_validation_rmse": request.model.validation_rmse,
        "has_actuals": has_actuals,
        "metrics": manifest_metrics(outcomes),
        "mlflow_run_id": context.run_id,
        "experiment": request.experiment,
        "tracking_uri": context.tracking_uri,
        "prefect_flow_run_id": str(flow_run.id),
        "run_dir": str(context.run_dir),
        "predictions": str(context.run_dir / files["predictions"]),
        "report": str(context.run_dir / f"{request.pipeline[-1].name}.review.html"),
        "gallery": str(gallery_path),
        "reused_stages": {stage: o.reused_from.mlflow_run_id for stage, o in outcomes.items() if o.reused_from},
    }


def format_score_summary(result: dict[str, Any]) -> str:
    """The closing lines of `make score`."""
    metrics = result["metrics"]
    if result["has_actuals"]:
        accuracy = f"  RMSE              {metrics['rmse']:>10.3f} minutes on {result['scored_month']} " + (
            f"(registered with {result['model_validation_rmse']:.3f})"
            if result["model_validation_rmse"] is not None
            else ""
        )
    else:
        accuracy = f"  RMSE              unavailable: {result['scored_month']} has no actual durations yet"
    lines = [
        "",
        f"Scoring finished: {result['color']} taxis of {result['scored_month']} with {result['model']} "
        f"(trained on {result['model_train_month']})",
        f"  trips scored      {int(metrics['scored_trips']):>10,}",
    ]
    # Runs made before the model refused trips have no count.
    if "refused_trips" in metrics:
        reasons = batch_scoring.refusal_lines(metrics)
        lines.append(
            f"  trips refused     {int(metrics['refused_trips']):>10,}"
            + (f" ({'; '.join(reasons)})" if reasons else "")
        )
    lines.append(accuracy)
    for key, label in (("distance_psi", "distance PSI"), ("duration_psi", "duration PSI")):
        if key in metrics:
            lines.append(f"  {label:<17} {metrics[key]:>10.4f}")
    lines += [
        f"  unseen PU_DO      {metrics['unseen_pu_do_share']:>10.2%} of trips",
        f"  predictions       {result['predictions']}",
        f"  report (review)   {result['report']}",
        f"  MLflow run        {result['mlflow_run_id']} (experiment {result['experiment']!r}, {result['tracking_uri']})",
    ]
    if result["reused_stages"]:
        reused = ", ".join(f"{stage} (run {run[:8]})" for stage, run in result["reused_stages"].items())
        lines.append(f"  reused, unchanged {reused}")
    lines.append(f"  all runs          {result['gallery']}")
    return "\n".join(lines)
