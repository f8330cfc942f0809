"""The pipeline flow: fetch the data, then execute 01_explore, 02_features and 03_train.

    python flows/pipeline.py --year 2023 --month 3 [--color green] [--data-source URL|DIR] [--experiment NAME]

The flow owns the MLflow run: it creates it before the first notebook, passes its id to the
training notebook, archives every executed notebook and its HTML report (pass or fail) under
`notebooks/` and `reports/`, and sets the final status: FINISHED only if every stage
succeeded. Each notebook is one Prefect task, executed by papermill in a child process.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextvars
import datetime as dt
import signal
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from taxi_duration import services, settings

# Before Prefect is imported: Prefect reads its settings (telemetry included) at import.
settings.apply_environment_defaults()
services.adopt_running_services()  # `make services` wrote where its servers are

from taxi_duration.startup import exit_without_final_collection, imports_without_gc  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--year", default="2023", help="training year (default 2023)")
    parser.add_argument("--month", default="3", help="training month 1-12 (default 3); validation is the next month")
    parser.add_argument("--color", default="green", help="green (default) or yellow")
    parser.add_argument("--data-source", help="URL prefix or folder of trip files (default $TAXI_DATA_SOURCE, else TLC)")
    parser.add_argument("--experiment", help="MLflow experiment (default $MLFLOW_EXPERIMENT_NAME, else nyc-taxi-duration)")
    parser.add_argument("--latest", action="store_true", help="train on the newest month whose data and next month are published")
    parser.add_argument("--force", action="store_true", help="rerun every stage, even those whose inputs have not changed")
    return parser.parse_args(argv)


def start_kernels_ahead(argv: list[str]) -> None:
    """From the command line: start the stages' kernels before Prefect and MLflow are imported.

    Those imports take about 1.4 s of one core; the kernels boot on the other core meanwhile,
    and the flow takes their runners over (taxi_duration.stages). Bad input starts nothing
    here: main() checks the same input and says what is wrong.
    """
    args = parse_args(argv)  # --help and usage errors end here, as they would in main()
    if args.latest:
        return  # the month is not known before the source is asked
    try:
        with imports_without_gc():
            from taxi_duration import data, stages
            from taxi_duration.periods import PipelineParams

        training = stages.training_parameters(
            settings.tracking_uri(), settings.experiment_name(args.experiment), settings.DEFAULT_REGISTERED_MODEL
        )
        params = PipelineParams.parse(args.year, args.month, args.color)
        stages.start_runners_ahead(params, data.trip_source(args.data_source), training, args.force)
    except Exception:  # noqa: BLE001 - see above
        return


if __name__ == "__main__":
    start_kernels_ahead(sys.argv[1:])

with imports_without_gc():
    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE
    from prefect.artifacts import create_markdown_artifact, create_table_artifact
    from prefect.runtime import flow_run

    from taxi_duration import data, gallery, notebooks, reports, runfiles, stagecache, stages, tracking
    from taxi_duration.periods import InvalidParameterError, PipelineParams

    tracking.import_mlflow()  # every run uses it: import it with the rest

STAGES = stages.STAGES
SUMMARY_METRICS = ("train_nnz", "val_nnz", "n_features", "train_rows", "val_rows", "rmse")


def _retry_unless_bad_data(task, task_run, state) -> bool:
    # A missing or invalid file will not fix itself; network hiccups might.
    return not isinstance(state.data, data.TripDataError)


@task(
    name="fetch-trip-files", retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=_retry_unless_bad_data,
    cache_policy=NO_CACHE,
)
def fetch_trip_files(params: PipelineParams, source: data.TripSource) -> dict[str, str]:
    """Make the training and validation files local and validated before any notebook runs."""
    return {
        str(month): str(source.ensure_local(params.color, month))
        for month in (params.train_month, params.validation_month)
    }


@task(name="run-notebook", task_run_name="{stage}", cache_policy=NO_CACHE)
def run_stage(
    stage: str,
    parameters: dict[str, Any],
    run_dir: Path,
    tracking_uri: str,
    run_id: str,
    timeout_seconds: int,
    key: str,
    cache_root: Path,
    reuse: bool = True,
    stop: threading.Event | None = None,
    prepared: notebooks.PreparedRunner | None = None,
) -> dict[str, Any]:
    """Reuse the stage's earlier outputs if its key is cached, else execute it; archive either way.

    Returns the stage's manifest, plus `reused_from` (the cache entry) when nothing ran. With
    `reuse` False (--force) the stage always runs, and its fresh outputs replace the cache entry.
    `prepared` (a runner started ahead for this stage) executes it; it is closed either way.
    """
    cache = stagecache.StageCache(cache_root)
    entry = cache.lookup(stage, key) if reuse else None
    if entry is not None:
        if prepared is not None:
            prepared.close()
        stagecache.StageCache.restore(entry, run_dir)
        _archive_stage_files(run_dir, stage, tracking_uri, run_id)
        manifest = runfiles.read_manifest(run_dir, stage)
        if stage == "03_train":
            _replay_training(tracking_uri, run_id, run_dir, manifest)
        print(f"{stage}: inputs unchanged, reused from {entry.run_dir} (MLflow run {entry.mlflow_run_id})")
        return {**manifest, "reused_from": asdict(entry)}
    manifest = _execute_notebook(stage, parameters, run_dir, tracking_uri, run_id, timeout_seconds, stop, prepared)
    cache.store(stage, key, run_dir, run_id, _stage_files(stage, manifest))
    return manifest


def _stage_files(stage: str, manifest: dict[str, Any]) -> list[str]:
    """What a stage leaves in the run folder (relative paths): what a reuse must bring back."""
    own = [f"{stage}.ipynb", f"{stage}.html", f"{stage}.review.html", runfiles.manifest_path(Path(), stage).name]
    return own + list(manifest.get("files", {}).values())


def _archive_stage_files(run_dir: Path, stage: str, tracking_uri: str, run_id: str) -> None:
    tracking.log_files(tracking_uri, run_id, [run_dir / f"{stage}.ipynb"], "notebooks")
    tracking.log_files(tracking_uri, run_id, [run_dir / f"{stage}.html", run_dir / f"{stage}.review.html"], "reports")


def _replay_training(tracking_uri: str, run_id: str, run_dir: Path, manifest: dict[str, Any]) -> None:
    """Give a run whose training was reused the same params, metrics and preprocessor."""
    from taxi_duration import model  # XGBoost: imported only when a reused training needs replaying

    tracking.log_params(tracking_uri, run_id, model.training_params())
    tracking.log_metrics(tracking_uri, run_id, manifest["metrics"])
    tracking.log_files(tracking_uri, run_id, [run_dir / runfiles.PREPROCESSOR_FILENAME], "preprocessor")
    tracking.set_tags(tracking_uri, run_id, {
        "taxi.model_uri": manifest["model_uri"],
        # The registry saw this model when its training ran; registering it again would
        # only add a duplicate version.
        "taxi.promotion.decision": "reused",
        "taxi.promotion.reason": f"training reused from run {manifest['mlflow_run_id']}, whose model was registered and gated then",
    })


def _execute_notebook(
    stage: str, parameters: dict[str, Any], run_dir: Path, tracking_uri: str, run_id: str, timeout_seconds: int,
    stop: threading.Event | None = None, prepared: notebooks.PreparedRunner | None = None,
) -> dict[str, Any]:
    """Execute one notebook, archive the executed copy and its reports, return its manifest."""
    try:
        result = notebooks.execute_notebook(
            settings.notebooks_dir() / f"{stage}.ipynb",
            run_dir / f"{stage}.ipynb",
            parameters,
            timeout_seconds=timeout_seconds,
            stop=stop,
            prepared=prepared,
        )
    except notebooks.NotebookExecutionError as error:
        _archive(error.result, tracking_uri, run_id)
        raise
    except BaseException:  # stopped from outside (SIGTERM, Ctrl-C, the flow): keep what ran
        _archive_interrupted(run_dir / f"{stage}.ipynb", tracking_uri, run_id)
        raise
    _archive(result, tracking_uri, run_id)
    return runfiles.read_manifest(run_dir, stage)


def _archive_interrupted(executed: Path, tracking_uri: str, run_id: str) -> None:
    """Render and archive a notebook the pipeline was stopped in, as far as it got."""
    if not executed.is_file():
        return
    try:
        paths = reports.render_reports(executed, failure="the pipeline was stopped (SIGTERM or Ctrl-C) while this notebook ran")
        tracking.log_files(tracking_uri, run_id, [executed], "notebooks")
        tracking.log_files(tracking_uri, run_id, [paths.full, paths.review], "reports")
    except Exception as problem:  # noqa: BLE001 - we are already on the way out
        print(f"warning: could not archive the interrupted {executed.name}: {problem!r}")


def _archive(result: notebooks.NotebookResult, tracking_uri: str, run_id: str) -> None:
    if result.executed_notebook.is_file():
        tracking.log_files(tracking_uri, run_id, [result.executed_notebook], "notebooks")
    if result.reports is not None:
        tracking.log_files(tracking_uri, run_id, [result.reports.full, result.reports.review], "reports")


def run_folder(params: PipelineParams, started: dt.datetime, run_id: str) -> Path:
    """`outputs/<color>/<YYYY-MM>/<UTC time>-<run id prefix>`: sortable and unique."""
    return settings.outputs_dir() / params.color / params.train_month.label() / f"{started:%Y%m%dT%H%M%SZ}-{run_id[:8]}"


@flow(name="nyc-taxi-duration", log_prints=True)
def taxi_duration_pipeline(
    year: int | None = 2023,
    month: int | None = 3,
    color: str = "green",
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
    """
    source = data.trip_source(data_source)
    data.check_source_location(source.location)
    if year is None and month is None:
        from taxi_duration import schedule

        newest = schedule.newest_trainable_month(source.location, color)
        year, month = newest.year, newest.month
        print(f"No month given: training on {newest}, the newest month with its following month published")
    params = PipelineParams.parse(year, month, color)
    timeout_seconds = settings.notebook_timeout_seconds()
    tracking_uri = settings.tracking_uri()
    experiment_name = settings.experiment_name(experiment)

    tracking.check_reachable(tracking_uri)
    training_parameters = stages.training_parameters(tracking_uri, experiment_name, registered_model)
    # Kernels for the stages that will execute start now (or started before Prefect was
    # imported, from the command line): their start-up and imports overlap the MLflow run's
    # creation and the stages before them.
    prepared = stages.runners_for(params, source, training_parameters, force)
    try:
        return _run_pipeline(params, source, experiment_name, tracking_uri, training_parameters, timeout_seconds,
                             force, prepared)
    finally:
        stages.close_runners(prepared)  # those no stage took over (a stage failed, or the flow was stopped)


def _run_pipeline(
    params: PipelineParams, source: data.TripSource, experiment_name: str, tracking_uri: str,
    training_parameters: dict[str, Any], timeout_seconds: int, force: bool,
    prepared: dict[str, notebooks.PreparedRunner],
) -> dict[str, Any]:
    """The flow's body once its inputs are checked: the MLflow run, the stages, the reports."""
    for orphan in tracking.mark_orphaned_runs_killed(tracking_uri, experiment_name):
        print(f"MLflow run {orphan} was left RUNNING by a pipeline process that no longer exists: marked KILLED")

    started = dt.datetime.now(dt.timezone.utc)
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
        "03_train": {"run_dir": str(run_dir), "mlflow_run_id": run_id, **training_parameters},
    }
    status = "FAILED"
    error: BaseException | None = None
    manifests: dict[str, dict[str, Any]] = {}
    timings: list[dict[str, Any]] = []
    stop_explore = threading.Event()
    explore: concurrent.futures.Future | None = None

    def stage_step(stage: str, stop: threading.Event | None = None):
        def work() -> dict[str, Any]:
            return run_stage(stage, stage_parameters[stage], run_dir, tracking_uri, run_id, timeout_seconds,
                             keys[stage], settings.stage_cache_dir(), reuse=not force, stop=stop,
                             prepared=prepared.pop(stage, None))

        return _timed(timings, stage, work, cached=lambda manifest: "reused_from" in manifest)

    # 01_explore only reports on the data: it runs beside 02_features (the two use one core
    # each), and 03_train starts once both have succeeded. A big month is explored first,
    # then featurized (settings.overlap_max_trips: two kernels at once need too much memory).
    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="explore") as background:
        try:
            trip_files = _timed(timings, "fetch-trip-files", lambda: fetch_trip_files(params, source))
            keys = stages.stage_keys(params, trip_files, training_parameters)
            side_by_side = data.trip_count(Path(trip_files[params.train_month.label()])) <= settings.overlap_max_trips()
            # The copied context carries the flow run into the thread, so the task belongs to it.
            explore = background.submit(contextvars.copy_context().run, stage_step, "01_explore", stop_explore)
            if not side_by_side:
                manifests["01_explore"] = explore.result()
            manifests["02_features"] = stage_step("02_features")
            manifests["01_explore"] = explore.result()
            manifests["03_train"] = stage_step("03_train")
            status = "FINISHED"
        except Exception as failed:
            error = failed
            raise
        except BaseException as stopped:  # Ctrl-C, or SIGTERM (Prefect turns it into TerminationSignal)
            status, error = "KILLED", stopped
            stop_explore.set()
            raise
        finally:
            if explore is not None:
                concurrent.futures.wait([explore])  # its notebook is archived before the run closes
            timings.sort(key=lambda entry: ("fetch-trip-files", *STAGES).index(entry["stage"]))
            in_order = {stage: manifests[stage] for stage in STAGES if stage in manifests}
            manifests.clear()
            manifests.update(in_order)
            _close_run(tracking_uri, run_id, status, manifests)
            gallery_path = _report_run(params, started, run_id, experiment_name, tracking_uri, status, error, manifests, timings, run_dir)

    metrics = manifests["03_train"]["metrics"]
    return {
        "color": params.color,
        "train_month": params.train_month.label(),
        "validation_month": params.validation_month.label(),
        "mlflow_run_id": run_id,
        "prefect_flow_run_id": str(flow_run.id),
        "experiment": experiment_name,
        "tracking_uri": tracking_uri,
        "model_uri": manifests["03_train"]["model_uri"],
        "run_dir": str(run_dir),
        "reports": [str(run_dir / f"{stage}.review.html") for stage in STAGES],
        "gallery": str(gallery_path),
        "promotion": manifests["03_train"].get("promotion") if "reused_from" not in manifests["03_train"] else None,
        "reused_stages": {stage: m["reused_from"]["mlflow_run_id"] for stage, m in manifests.items() if "reused_from" in m},
        **{key: metrics[key] for key in SUMMARY_METRICS},
    }


def _close_run(tracking_uri: str, run_id: str, status: str, manifests: dict[str, dict[str, Any]]) -> None:
    """Record reuse and the final status; on the way out of a failure, never mask the real error."""
    try:
        _tag_reused_stages(tracking_uri, run_id, manifests)
        tracking.finish_run(tracking_uri, run_id, status)
    except Exception as problem:  # noqa: BLE001 - e.g. the tracking server went away mid-run
        print(f"warning: could not set MLflow run {run_id} to {status}: {problem!r}; "
              "the next pipeline start on this host marks it KILLED if it stays RUNNING")
        if status == "FINISHED":
            raise


def _tag_reused_stages(tracking_uri: str, run_id: str, manifests: dict[str, dict[str, Any]]) -> None:
    """Say on the MLflow run which stages were reused, and from which run and folder."""
    tags = {"taxi.reused_stages": ",".join(stage for stage, m in manifests.items() if "reused_from" in m)}
    for stage, manifest in manifests.items():
        if "reused_from" in manifest:
            tags[f"taxi.stage.{stage}.reused_from_run"] = manifest["reused_from"]["mlflow_run_id"]
            tags[f"taxi.stage.{stage}.reused_from_dir"] = manifest["reused_from"]["run_dir"]
    tracking.set_tags(tracking_uri, run_id, tags)


def _timed(timings: list[dict[str, Any]], stage: str, work, cached=lambda result: False):
    """Run `work`, recording the stage's wall time and outcome even when it raises."""
    started = time.monotonic()
    entry = {"stage": stage, "status": "FAILED", "seconds": None}
    timings.append(entry)
    try:
        result = work()
        entry["status"] = "CACHED" if cached(result) else "COMPLETED"
        return result
    finally:
        entry["seconds"] = round(time.monotonic() - started, 2)


def _report_run(params, started, run_id, experiment_name, tracking_uri, status, error, manifests, timings, run_dir) -> Path:
    """Record the run, rebuild the gallery, publish Prefect artifacts.

    Runs on the way out of a failing flow too, so it must not replace the real error with
    its own: a reporting problem is printed, and the run's own outcome stands.
    """
    gallery_path = settings.outputs_dir() / gallery.GALLERY
    try:
        record = _run_record(params, started, run_id, experiment_name, tracking_uri, status, error, manifests, timings)
        gallery.write_run_record(run_dir, record)
        gallery_path = gallery.build_gallery(settings.outputs_dir())
        _publish_prefect_artifacts(record, run_dir, gallery_path)
    except Exception as problem:  # noqa: BLE001 - reporting must not mask the pipeline's result
        print(f"warning: could not record the run in the gallery or Prefect artifacts: {problem!r}")
    return gallery_path


def _run_record(params, started, run_id, experiment_name, tracking_uri, status, error, manifests, timings) -> dict[str, Any]:
    """What the gallery shows of one run; written into the run folder as run.json."""
    finished = dt.datetime.now(dt.timezone.utc)
    experiment_id = tracking.experiment_id_of(tracking_uri, run_id)
    metrics = manifests.get("03_train", {}).get("metrics", {})
    stage_rows = []
    for timing in timings:
        entry = dict(timing)
        if timing["stage"] in STAGES:
            for key, suffix in (("full_report", ".html"), ("review_report", ".review.html")):
                entry[key] = f"{timing['stage']}{suffix}"
        stage_rows.append(entry)
    return {
        "color": params.color,
        "train_month": params.train_month.label(),
        "validation_month": params.validation_month.label(),
        "status": status,
        "error": None if error is None else (str(error) or type(error).__name__),
        "started": started.isoformat(),
        "finished": finished.isoformat(),
        "seconds": round((finished - started).total_seconds(), 1),
        "rmse": metrics.get("rmse"),
        "baseline_rmse": metrics.get("baseline_rmse"),
        "mlflow_run_id": run_id,
        "experiment": experiment_name,
        "experiment_id": experiment_id,
        "tracking_uri": tracking_uri,
        "mlflow_url": gallery.mlflow_run_url(tracking_uri, experiment_id, run_id),
        "prefect_flow_run_id": str(flow_run.id),
        "stages": stage_rows,
    }


def _publish_prefect_artifacts(record: dict[str, Any], run_dir: Path, gallery_path: Path) -> None:
    """A metrics summary (markdown) and the stage timings (table), shown in the Prefect UI."""
    key = f"taxi-duration-{record['color']}-{record['train_month']}"
    rmse = "n/a" if record["rmse"] is None else f"{record['rmse']:.3f}"
    baseline = "n/a" if record["baseline_rmse"] is None else f"{record['baseline_rmse']:.3f}"
    reports = "\n".join(
        f"- {stage['stage']}: `{run_dir / stage['review_report']}` (full: `{stage['full_report']}`)"
        for stage in record["stages"] if "review_report" in stage
    )
    markdown = (
        f"# {record['color']} taxis, {record['train_month']} → {record['validation_month']}: {record['status']}\n\n"
        f"| metric | value |\n|---|---|\n| validation RMSE (min) | {rmse} |\n| baseline RMSE (min) | {baseline} |\n"
        f"| MLflow run | `{record['mlflow_run_id']}` ({record['experiment']}) |\n| duration | {record['seconds']} s |\n\n"
        + (f"**Error:** {record['error']}\n\n" if record["error"] else "")
        + f"## Reports\n{reports}\n\nAll runs: `{gallery_path}`\n"
    )
    create_markdown_artifact(markdown=markdown, key=key, description="Pipeline run summary")
    create_table_artifact(
        table=[{"stage": s["stage"], "status": s["status"], "seconds": s["seconds"]} for s in record["stages"]],
        key=f"{key}-timings",
        description="Wall time of each stage",
    )


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


def _exit_on_sigterm(signum: int, frame) -> None:
    # Prefect turns SIGTERM during a flow run into TerminationSignal, then re-sends it to the
    # previous handler. Python's default would end the process on the spot, skipping atexit,
    # and leave Prefect's temporary API server running; a SystemExit unwinds normally.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    args = parse_args(argv)
    # Fail on bad input before Prefect starts anything or MLflow records a run.
    try:
        if args.latest:
            from taxi_duration import schedule

            newest = schedule.newest_trainable_month(data.trip_source(args.data_source).location, args.color)
            args.year, args.month = newest.year, newest.month
        params = PipelineParams.parse(args.year, args.month, args.color)
        data.check_source_location(data.trip_source(args.data_source).location)
        settings.notebook_timeout_seconds()
        settings.overlap_max_trips()
        settings.prefect_server_mode()
    except (InvalidParameterError, data.TripDataError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        tracking.check_reachable(settings.tracking_uri())
    except tracking.TrackingUnavailableError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    try:
        with services.prefect_api_for_run() as prefect_api, services.without_flow_heartbeats():
            result = taxi_duration_pipeline(
                year=params.year, month=params.month, color=params.color,
                data_source=args.data_source, experiment=args.experiment, force=args.force,
            )
    except services.ServiceError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except Exception as error:
        print(f"\nPipeline failed: {error}", file=sys.stderr)
        return 1
    print(format_summary(result))
    if prefect_api:
        print(f"  Prefect flow run  {prefect_api.removesuffix('/api')}/runs/flow-run/{result['prefect_flow_run_id']}")
    return 0


if __name__ == "__main__":
    try:
        exit_code = main()
    finally:
        stages.close_runners_ahead()  # those no flow took over (bad input, MLflow unreachable, ...)
    exit_without_final_collection()
    sys.exit(exit_code)
