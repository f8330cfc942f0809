"""What a pipeline run leaves for people: run.json and the gallery row, Prefect artifacts, closing lines."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from taxi_duration import manifests, settings
from taxi_duration.orchestration import declarations, links, lost_server
from taxi_duration.orchestration.request import RunRequest
from taxi_duration.orchestration.tasks import RunContext, StageOutcome, last_record, manifest_metrics
from taxi_duration.review import gallery
from taxi_duration.tracking import mlflow_runs

SUMMARY_METRICS = ("train_nnz", "val_nnz", "n_features", "train_rows", "val_rows", "rmse")


@dataclass(frozen=True)
class RunEnding:
    """How a run ended, as far as it got: what the gallery, the artifacts and the summary show."""

    status: str  # FINISHED, FAILED or KILLED
    error: BaseException | None
    outcomes: dict[str, StageOutcome]  # the stages that ended, in pipeline order
    timings: list[dict[str, Any]]  # stage, status (COMPLETED, CACHED, FAILED), seconds


def report_run(
    request: RunRequest, context: RunContext, started: dt.datetime, flow_run_id: str, ending: RunEnding
) -> Path:
    """Record the run, rebuild the gallery, publish Prefect artifacts; the gallery's path.

    Runs on the way out of a failing flow too, so it must not replace the real error with
    its own: a reporting problem is printed, and the run's own outcome stands.
    """
    gallery_path = settings.outputs_dir() / gallery.GALLERY
    try:
        record = run_record(request, context, started, flow_run_id, ending)
        if ending.status == "FINISHED":
            record["comparison"] = _compare_with_previous_month(context, record)
        gallery.write_run_record(context.run_dir, record)
        gallery_path = gallery.build_gallery(settings.outputs_dir())
        lost_server.unless_lost(lambda: publish_prefect_artifacts(record, context.run_dir, gallery_path))
    except Exception as problem:  # noqa: BLE001 - reporting must not mask the pipeline's result
        print(f"warning: could not record the run in the gallery or Prefect artifacts: {problem!r}")
    return gallery_path


def _compare_with_previous_month(context: RunContext, record: dict[str, Any]) -> str | None:
    """The run's comparison with last month's (its path in the run folder), or None; never fails the run."""
    from taxi_duration.review import compare
    from taxi_duration.review.past_runs import PastRun

    try:
        path = compare.compare_with_previous_month(PastRun(context.run_dir, record), settings.outputs_dir())
    except Exception as problem:  # noqa: BLE001 - a comparison is for reviewers; the run stands without it
        print(f"warning: could not compare the run with the previous month's: {problem!r}")
        return None
    if path:
        print(f"Compared with the previous month's run: {context.run_dir / path}")
    return path


def run_record(
    request: RunRequest, context: RunContext, started: dt.datetime, flow_run_id: str, ending: RunEnding
) -> dict[str, Any]:
    """What the gallery shows of one run; written into the run folder as run.json."""
    params = request.params
    finished = dt.datetime.now(dt.UTC)
    experiment_id = mlflow_runs.experiment_id_of(context.tracking_uri, context.run_id)
    metrics = manifest_metrics(ending.outcomes)
    stage_rows = stage_rows_of(ending.timings, {stage.name for stage in request.stages})
    training, promoted_by = last_record(ending.outcomes, manifests.TrainingManifest)
    promotion = None if training is None else training.promotion
    return {
        "kind": "train",
        "color": params.color,
        "train_month": params.train_month.label(),
        "validation_month": params.validation_month.label(),
        "status": ending.status,
        "error": None if ending.error is None else (str(ending.error) or type(ending.error).__name__),
        "started": started.isoformat(),
        "finished": finished.isoformat(),
        "seconds": round((finished - started).total_seconds(), 1),
        "rmse": metrics.get("rmse"),
        "baseline_rmse": metrics.get("baseline_rmse"),
        "train_rows": metrics.get("train_rows"),
        # promoted / kept; "reused" for a training reused from an earlier run (it registered nothing)
        "promotion": _promotion_decision(promotion, promoted_by),
        "mlflow_run_id": context.run_id,
        "experiment": request.experiment,
        "experiment_id": experiment_id,
        "tracking_uri": context.tracking_uri,
        "mlflow_url": gallery.mlflow_run_url(context.tracking_uri, experiment_id, context.run_id),
        "prefect_flow_run_id": flow_run_id,
        "stages": stage_rows,
        **declarations.provenance(request.stages),
    }


def stage_rows_of(timings: list[dict[str, Any]], notebook_stages: set[str]) -> list[dict[str, Any]]:
    """The gallery's stage rows: each timing, and for a notebook stage its reports' file names."""
    rows = []
    for timing in timings:
        row = dict(timing)
        if timing["stage"] in notebook_stages:
            for key, suffix in (("full_report", ".html"), ("review_report", ".review.html")):
                row[key] = f"{timing['stage']}{suffix}"
        rows.append(row)
    return rows


def _promotion_decision(promotion: dict[str, Any] | None, promoted_by: StageOutcome | None) -> str | None:
    if promoted_by is None:
        return None
    if promoted_by.reused:
        return "reused"
    return (promotion or {}).get("taxi.promotion.decision")


def publish_prefect_artifacts(record: dict[str, Any], run_dir: Path, gallery_path: Path) -> None:
    """A metrics summary (markdown), the stage timings (table) and links, shown in the Prefect UI;
    the same summary becomes the MLflow run's description."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    key = f"taxi-duration-{record['color']}-{record['train_month']}"
    rmse = "n/a" if record["rmse"] is None else f"{record['rmse']:.3f}"
    baseline = "n/a" if record["baseline_rmse"] is None else f"{record['baseline_rmse']:.3f}"
    run_links = links.run_links(record, run_dir, gallery_path)
    mlflow_run = f"`{record['mlflow_run_id']}`"
    if record.get("mlflow_url"):
        mlflow_run = f"[{record['mlflow_run_id'][:8]}]({record['mlflow_url']})"
    cached = [stage["stage"] for stage in record["stages"] if stage.get("status") == "CACHED"]
    markdown = (
        f"# {record['color']} taxis, {record['train_month']} → {record['validation_month']}: {record['status']}\n\n"
        f"| metric | value |\n|---|---|\n| validation RMSE (min) | {rmse} |\n| baseline RMSE (min) | {baseline} |\n"
        f"| registry | {record.get('promotion') or 'n/a'} |\n"
        f"| MLflow run | {mlflow_run} ({record['experiment']}) |\n| duration | {record['seconds']} s |\n\n"
        + (f"**Error:** {record['error']}\n\n" if record["error"] else "")
        + (f"Reused, inputs unchanged: {', '.join(cached)}\n\n" if cached else "")
        + f"## Links\n{links.markdown_list(run_links)}\n"
    )
    create_markdown_artifact(markdown=markdown, key=key, description="Pipeline run summary")
    create_table_artifact(
        table=[{"stage": s["stage"], "status": s["status"], "seconds": s["seconds"]} for s in record["stages"]],
        key=f"{key}-timings",
        description="Wall time of each stage",
    )
    links.publish(record, run_links, markdown)


def format_summary(result: dict[str, Any]) -> str:
    """The closing lines a user looks for after a run (`result`: what the flow returns)."""
    lines = [
        "",
        f"Pipeline finished: {result['color']} taxis, trained on {result['train_month']}, validated on {result['validation_month']}",
        f"  train matrix      {result['train_rows']:>10,} rows  {result['train_nnz']:>10,} non-zeros",
        f"  validation matrix {result['val_rows']:>10,} rows  {result['val_nnz']:>10,} non-zeros",
        f"  features          {result['n_features']:>10,}",
        f"  validation RMSE   {result['rmse']:>10.3f} minutes",
        f"  MLflow run        {result['mlflow_run_id']} (experiment {result['experiment']!r}, {result['tracking_uri']})",
        f"  model             {result['model_uri']}",
        f"  reports (review)  {result['run_dir']}/",
    ]
    lines += [f"                    {Path(report).name}" for report in result["reports"]]
    if result.get("promotion"):
        lines.append(f"  model registry    {result['promotion']['taxi.promotion.reason']}")
    if result["reused_stages"]:
        reused = ", ".join(f"{stage} (run {run[:8]})" for stage, run in result["reused_stages"].items())
        lines.append(f"  reused, unchanged {reused}")
    lines.append(f"  all runs          {result['gallery']}")
    return "\n".join(lines)
