"""The pipeline flow: fetch the data, then execute 01_explore, 02_features and 03_train.

    python flows/pipeline.py --year 2023 --month 3 [--color green] [--data-source URL|DIR] [--experiment NAME]

The flow owns the MLflow run: it creates it before the first notebook, passes its id to the
training notebook, archives every executed notebook and its HTML report (pass or fail) under
`notebooks/` and `reports/`, and sets the final status: FINISHED only if every stage
succeeded. Each notebook is one Prefect task, executed by papermill in a child process.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path
from typing import Any

from taxi_duration import settings

# Before Prefect is imported: Prefect reads its settings (telemetry included) at import.
settings.apply_quiet_environment()

from prefect import flow, task  # noqa: E402
from prefect.runtime import flow_run  # noqa: E402

from taxi_duration import data, notebooks, runfiles, tracking  # noqa: E402
from taxi_duration.periods import InvalidParameterError, PipelineParams  # noqa: E402

STAGES = ("01_explore", "02_features", "03_train")
SUMMARY_METRICS = ("train_nnz", "val_nnz", "n_features", "train_rows", "val_rows", "rmse")


def _retry_unless_bad_data(task, task_run, state) -> bool:
    # A missing or invalid file will not fix itself; network hiccups might.
    return not isinstance(state.data, data.TripDataError)


@task(name="fetch-trip-files", retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=_retry_unless_bad_data)
def fetch_trip_files(params: PipelineParams, source: data.TripSource) -> dict[str, str]:
    """Make the training and validation files local and validated before any notebook runs."""
    return {
        str(month): str(source.ensure_local(params.color, month))
        for month in (params.train_month, params.validation_month)
    }


@task(name="run-notebook", task_run_name="{stage}")
def run_notebook(
    stage: str, parameters: dict[str, Any], run_dir: Path, tracking_uri: str, run_id: str, timeout_seconds: int
) -> dict[str, Any]:
    """Execute one notebook, archive the executed copy and its report, return its manifest."""
    try:
        result = notebooks.execute_notebook(
            settings.notebooks_dir() / f"{stage}.ipynb",
            run_dir / f"{stage}.ipynb",
            parameters,
            timeout_seconds=timeout_seconds,
        )
    except notebooks.NotebookExecutionError as error:
        _archive(error.result, tracking_uri, run_id)
        raise
    _archive(result, tracking_uri, run_id)
    return runfiles.read_manifest(run_dir, stage)


def _archive(result: notebooks.NotebookResult, tracking_uri: str, run_id: str) -> None:
    if result.executed_notebook.is_file():
        tracking.log_files(tracking_uri, run_id, [result.executed_notebook], "notebooks")
    if result.html_report is not None:
        tracking.log_files(tracking_uri, run_id, [result.html_report], "reports")


def run_folder(params: PipelineParams, started: dt.datetime, run_id: str) -> Path:
    """`outputs/<color>/<YYYY-MM>/<UTC time>-<run id prefix>`: sortable and unique."""
    return settings.outputs_dir() / params.color / params.train_month.label() / f"{started:%Y%m%dT%H%M%SZ}-{run_id[:8]}"


@flow(name="nyc-taxi-duration", log_prints=True)
def taxi_duration_pipeline(
    year: int = 2023,
    month: int = 3,
    color: str = "green",
    data_source: str | None = None,
    experiment: str | None = None,
) -> dict[str, Any]:
    """Train and evaluate the trip-duration model on YEAR-MONTH, validated on the month after."""
    params = PipelineParams.parse(year, month, color)
    source = data.trip_source(data_source)
    data.check_source_location(source.location)
    timeout_seconds = settings.notebook_timeout_seconds()
    tracking_uri = settings.tracking_uri()
    experiment_name = settings.experiment_name(experiment)

    started = dt.datetime.now(dt.timezone.utc)
    tags = {
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
        tracking_uri,
        experiment_name,
        run_name=f"{params.color}-{params.train_month.label()}-{started:%Y%m%dT%H%M%SZ}",
        params={"year": params.year, "month": params.month, "color": params.color, "data_source": source.location},
        tags=tags,
    )
    run_dir = run_folder(params, started, run_id)
    tracking.set_tags(tracking_uri, run_id, {"taxi.run_dir": str(run_dir)})
    print(f"MLflow run {run_id} in experiment {experiment_name!r}; outputs in {run_dir}")

    data_parameters = {
        "year": params.year,
        "month": params.month,
        "color": params.color,
        "data_source": source.location,
        "data_dir": str(source.cache_dir),
        "run_dir": str(run_dir),
    }
    stage_parameters = {
        "01_explore": data_parameters,
        "02_features": data_parameters,
        "03_train": {
            "run_dir": str(run_dir),
            "tracking_uri": tracking_uri,
            "experiment_name": experiment_name,
            "mlflow_run_id": run_id,
        },
    }
    status = "FAILED"
    manifests: dict[str, dict[str, Any]] = {}
    try:
        fetch_trip_files(params, source)
        for stage in STAGES:
            manifests[stage] = run_notebook(stage, stage_parameters[stage], run_dir, tracking_uri, run_id, timeout_seconds)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracking.finish_run(tracking_uri, run_id, status)

    metrics = manifests["03_train"]["metrics"]
    return {
        "color": params.color,
        "train_month": params.train_month.label(),
        "validation_month": params.validation_month.label(),
        "mlflow_run_id": run_id,
        "experiment": experiment_name,
        "tracking_uri": tracking_uri,
        "model_uri": manifests["03_train"]["model_uri"],
        "run_dir": str(run_dir),
        "reports": [str(run_dir / f"{stage}.html") for stage in STAGES],
        **{key: metrics[key] for key in SUMMARY_METRICS},
    }


def format_summary(result: dict[str, Any]) -> str:
    """The closing lines a user looks for after a run."""
    lines = [
        "",
        f"Pipeline finished: {result['color']} taxis, trained on {result['train_month']}, validated on {result['validation_month']}",
        f"  train matrix      {result['train_rows']:>10,} rows  {result['train_nnz']:>10,} non-zeros",
        f"  validation matrix {result['val_rows']:>10,} rows  {result['val_nnz']:>10,} non-zeros",
        f"  features          {result['n_features']:>10,}",
        f"  validation RMSE   {result['rmse']:>10.3f} minutes",
        f"  MLflow run        {result['mlflow_run_id']} (experiment {result['experiment']!r}, {result['tracking_uri']})",
        f"  model             {result['model_uri']}",
        f"  reports           {result['run_dir']}/",
    ]
    lines += [f"                    {Path(report).name}" for report in result["reports"]]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--year", default="2023", help="training year (default 2023)")
    parser.add_argument("--month", default="3", help="training month 1-12 (default 3); validation is the next month")
    parser.add_argument("--color", default="green", help="green (default) or yellow")
    parser.add_argument("--data-source", help="URL prefix or folder of trip files (default $TAXI_DATA_SOURCE, else TLC)")
    parser.add_argument("--experiment", help="MLflow experiment (default $MLFLOW_EXPERIMENT_NAME, else nyc-taxi-duration)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Fail on bad input before Prefect starts anything or MLflow records a run.
    try:
        params = PipelineParams.parse(args.year, args.month, args.color)
        data.check_source_location(data.trip_source(args.data_source).location)
        settings.notebook_timeout_seconds()
    except (InvalidParameterError, data.TripDataError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        result = taxi_duration_pipeline(
            year=params.year, month=params.month, color=params.color,
            data_source=args.data_source, experiment=args.experiment,
        )
    except Exception as error:
        print(f"\nPipeline failed: {error}", file=sys.stderr)
        return 1
    print(format_summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
