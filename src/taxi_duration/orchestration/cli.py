"""The pipeline's command line: `python flows/pipeline.py --year 2023 --month 3 [...]` (`make run`).

The arguments are resolved and checked once (orchestration.request.resolve_request), and that
RunRequest is what the flow, called once, runs (orchestration.request.call_flow). Bad input is refused (exit 2) before Prefect starts anything
or MLflow records a run; an unreachable tracking server or Prefect server exits 1 with one line
that says so; a failed run exits 1 after the flow has recorded what happened. A Prefect server
lost during the run leaves the outcome to the MLflow run the flow owns (orchestration.lost_server).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

from taxi_duration import settings
from taxi_duration.data import tripfiles
from taxi_duration.data.periods import InvalidParameterError
from taxi_duration.orchestration import console, lost_server, stopping
from taxi_duration.orchestration.pipeline import taxi_duration_pipeline
from taxi_duration.orchestration.request import call_flow, resolve_request
from taxi_duration.orchestration.run_summary import format_summary
from taxi_duration.runner import fast_start
from taxi_duration.servers import endpoints, local_servers
from taxi_duration.tracking import mlflow_runs

DESCRIPTION = "The pipeline flow: fetch the data, then execute the training stages notebooks/pipeline.yaml declares."
USAGE_EXAMPLE = (
    "python flows/pipeline.py --year 2023 --month 3 [--color green] [--data-source URL|DIR] [--experiment NAME] "
    "[--tune-trials 20 [--tune-workers 2] [--tune-seed 42] [--dask | --dask-address tcp://HOST:8786]]"
)
DASK_ADDRESS_ENV = "TAXI_DASK_ADDRESS"  # as backfill's


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=DESCRIPTION, epilog=USAGE_EXAMPLE)
    parser.add_argument("--year", default="2023", help="training year (default 2023)")
    parser.add_argument("--month", default="3", help="training month 1-12 (default 3); validation is the next month")
    parser.add_argument("--color", default="green", help="green (default) or yellow")
    parser.add_argument(
        "--data-source", help="URL prefix or folder of trip files (default $TAXI_DATA_SOURCE, else TLC)"
    )
    parser.add_argument(
        "--experiment", help="MLflow experiment (default $MLFLOW_EXPERIMENT_NAME, else nyc-taxi-duration)"
    )
    parser.add_argument(
        "--latest", action="store_true", help="train on the newest month whose data and next month are published"
    )
    parser.add_argument(
        "--force", action="store_true", help="rerun every stage, even those whose inputs have not changed"
    )
    parser.add_argument(
        "--tune-trials",
        type=int,
        default=0,
        metavar="N",
        help="search N hyperparameter trials before training, which then uses the best (default 0: the recipe)",
    )
    parser.add_argument(
        "--tune-workers", type=int, metavar="N", help="trials at a time (default $TAXI_TUNE_WORKERS, else the cores)"
    )
    parser.add_argument(
        "--tune-seed", type=int, default=settings.DEFAULT_TUNE_SEED, help="the search's seed (default 42)"
    )
    parser.add_argument("--dask", action="store_true", help="run the trials on a local Dask cluster")
    parser.add_argument(
        "--dask-address",
        metavar="tcp://HOST:PORT",
        help=f"run the trials on this Dask scheduler's workers (default ${DASK_ADDRESS_ENV} unless --dask)",
    )
    console.add_verbose_flag(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    stopping.install()  # SIGTERM and Ctrl-C stop the notebooks at once, whatever the flow is doing
    args = parse_args(argv)
    try:
        request = resolve_request(
            None if args.latest else args.year,
            None if args.latest else args.month,
            args.color,
            args.data_source,
            args.experiment,
            args.force,
            tune_trials=args.tune_trials,
            tune_workers=args.tune_workers,
            tune_seed=args.tune_seed,
            dask=args.dask,
            # An explicit --dask (local cluster) wins over an address that only comes from the environment.
            dask_address=args.dask_address or (None if args.dask else os.environ.get(DASK_ADDRESS_ENV) or None),
        )
        settings.prefect_server_mode()
    except (InvalidParameterError, tripfiles.TripDataError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        mlflow_runs.check_reachable(request.tracking_uri)
    except mlflow_runs.TrackingUnavailableError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    owned = lost_server.OwnedRun()
    return _run_flow(
        lambda: call_flow(taxi_duration_pipeline, request, owned), format_summary, "Pipeline", args.verbose
    )


def _run_flow(
    run: Callable[[], dict[str, Any]], summary: Callable[[dict[str, Any]], str], what: str, verbose: bool = False
) -> int:
    """Run a resolved flow with a Prefect API, print its summary; 1 with one line when it fails.

    The failure's paragraph is the last thing printed; the terminal shows no traceback of a
    failure the project recognises unless `verbose` (orchestration.console).

    A Prefect server lost during the run: 0, the summary and one warning when the MLflow run the
    flow owns FINISHED (its work stands, Prefect's record of it does not); otherwise 1.
    """
    try:
        with (
            endpoints.prefect_api_for_run() as prefect_api,
            endpoints.without_flow_heartbeats(),
            lost_server.said_once(),
            console.one_clear_failure(verbose),
        ):
            result = run()
    except local_servers.ServiceError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except lost_server.PrefectServerLost as lost:
        if lost.run.result is not None:
            print(summary(lost.run.result))
        exit_code, lines = lost_server.outcome_lines(lost, what)
        print("\n".join(lines), file=sys.stderr)
        return exit_code
    except KeyboardInterrupt:
        print(f"\n{what} stopped (Ctrl-C)", file=sys.stderr)
        return stopping.exit_code()
    except Exception as error:  # noqa: BLE001 - any other failure: its message and exit 1
        if stopping.requested():  # the stop reached the flow as its stage's NotebookStopped
            print(f"\n{what} stopped ({stopping.signal_name()})", file=sys.stderr)
            return stopping.exit_code()
        console.settle_prefect_workers()
        print(f"\n{what} failed: {error}", file=sys.stderr)
        return 1
    console.settle_prefect_workers()
    print(summary(result))
    if prefect_api:
        print(f"  Prefect flow run  {prefect_api.removesuffix('/api')}/runs/flow-run/{result['prefect_flow_run_id']}")
    return 0


def exit_process(exit_code: int) -> None:
    """End a flows/ script's process with `exit_code` (its last call)."""
    if lost_server.lost():
        # Prefect's log and event workers would retry the lost server at exit for what they
        # still hold, which can no longer arrive; the run's outcome is decided and said.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code)
    fast_start.exit_without_final_collection()
    sys.exit(exit_code)


SCORE_USAGE = (
    "python flows/score.py --year 2023 --month 5 [--color green] [--model models:/nyc-taxi-duration@champion] "
    "[--data-source URL|DIR] [--experiment NAME] [--force]"
)


def parse_score_args(argv: list[str] | None = None) -> argparse.Namespace:
    from taxi_duration.modeling.batch_scoring import DEFAULT_MODEL_URI

    parser = argparse.ArgumentParser(
        description="Score one month's trips with a registered model (the scoring stages).", epilog=SCORE_USAGE
    )
    parser.add_argument("--year", required=True, help="year of the month to score")
    parser.add_argument("--month", required=True, help="month to score, 1-12")
    parser.add_argument("--color", default="green", help="green (default) or yellow")
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL_URI,
        help=f"registered model: models:/NAME@ALIAS or models:/NAME/VERSION (default {DEFAULT_MODEL_URI})",
    )
    parser.add_argument(
        "--data-source", help="URL prefix or folder of trip files (default $TAXI_DATA_SOURCE, else TLC)"
    )
    parser.add_argument(
        "--experiment", help="MLflow experiment (default $TAXI_SCORING_EXPERIMENT, else <experiment>-scoring)"
    )
    parser.add_argument(
        "--force", action="store_true", help="score again even if this month and model were scored already"
    )
    console.add_verbose_flag(parser)
    return parser.parse_args(argv)


def score_main(argv: list[str] | None = None) -> int:
    """`python flows/score.py` (`make score`): exit 2 for bad input or an unknown model, 1 when the run fails."""
    from taxi_duration.modeling.batch_scoring import ModelNotFoundError
    from taxi_duration.orchestration.scoring_flow import (
        format_score_summary,
        resolve_score_request,
        taxi_duration_scoring,
    )

    stopping.install()
    args = parse_score_args(argv)
    try:
        request = resolve_score_request(
            args.year, args.month, args.color, args.model, args.data_source, args.experiment, args.force
        )
        settings.prefect_server_mode()
    except mlflow_runs.TrackingUnavailableError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except (InvalidParameterError, tripfiles.TripDataError, ValueError, ModelNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    owned = lost_server.OwnedRun()
    return _run_flow(
        lambda: call_flow(taxi_duration_scoring, request, owned), format_score_summary, "Scoring", args.verbose
    )
