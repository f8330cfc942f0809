"""Serve the pipeline as a scheduled Prefect deployment, and scoring on demand, from this process.

    python flows/serve.py [--cron "0 6 3 * *"] [--name monthly]

Registers the deployments `nyc-taxi-duration/<name>` (monthly training) and `nyc-taxi-score/score`
(score a month with the champion) with the Prefect API and executes their runs here until
interrupted (Ctrl-C pauses the schedule). Scheduled runs pass no YEAR or
MONTH, so each trains on the newest month TLC has published (taxi_duration.orchestration.schedule).
Serving needs a Prefect server that outlives this process, for the schedule and for
`prefect deployment run` from another terminal: PREFECT_API_URL, else the project's local
server (`make services`, or started here on first use).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

from taxi_duration import settings
from taxi_duration.orchestration.schedule import (
    DEPLOYMENT_DESCRIPTION,
    DEPLOYMENT_NAME,
    DEPLOYMENT_TAGS,
    MONTHLY_CRON,
    SCHEDULE_TIMEZONE,
    deployment_parameters,
)
from taxi_duration.servers import endpoints, local_servers

if TYPE_CHECKING:
    from prefect import Flow
    from prefect.deployments.runner import RunnerDeployment

FLOW_FUNCTION = "taxi_duration_pipeline"


def flow_entrypoint() -> str:
    """`<project>/flows/pipeline.py:taxi_duration_pipeline`, wherever the command runs from."""
    return f"{settings.project_dir() / 'flows' / 'pipeline.py'}:{FLOW_FUNCTION}"


def load_pipeline_flow() -> Flow:
    """The pipeline flow, loaded the way Prefect loads an entrypoint (flows/ is no package).

    No placeholder fallback: a flow file that fails to import must fail here, loudly,
    rather than be served as a stub that fails at every scheduled run.
    """
    from prefect.flows import load_flow_from_entrypoint

    return load_flow_from_entrypoint(flow_entrypoint(), use_placeholder_flow=False)


def build_deployment(name: str = DEPLOYMENT_NAME, cron: str = MONTHLY_CRON) -> RunnerDeployment:
    """The deployment `nyc-taxi-duration/<name>` on `cron` (UTC); nothing is registered or run.

    Prefect records the entrypoint relative to the current directory, and served runs
    execute from it; main() therefore changes to the project folder first.
    """
    from prefect.deployments.runner import RunnerDeployment
    from prefect.schedules import Cron

    load_pipeline_flow()  # fails loudly if the flow does not import (from_entrypoint would serve a placeholder)
    # From the entrypoint, not the flow object: the flow is defined in the package, and Prefect
    # would record that module's path instead of the thin entry point prefect.yaml names.
    entrypoint = f"{os.path.relpath(settings.project_dir() / 'flows' / 'pipeline.py')}:{FLOW_FUNCTION}"
    return RunnerDeployment.from_entrypoint(
        entrypoint,
        name=name,
        schedule=Cron(cron, timezone=SCHEDULE_TIMEZONE),
        parameters=deployment_parameters(),
        description=DEPLOYMENT_DESCRIPTION,
        tags=list(DEPLOYMENT_TAGS),
    )


SCORING_DEPLOYMENT_NAME = "score"
SCORING_DEPLOYMENT_TAGS = ("nyc-taxi", "scoring")
SCORING_DEPLOYMENT_DESCRIPTION = (
    "Score one month's trips with a registered model (default: the champion): predictions, accuracy "
    "next to the model's validation RMSE, and drift since its training month. Run it with YEAR and MONTH."
)


def build_scoring_deployment(name: str = SCORING_DEPLOYMENT_NAME) -> RunnerDeployment:
    """The on-demand deployment `nyc-taxi-score/<name>` (no schedule: a month is scored when asked)."""
    from prefect.deployments.runner import RunnerDeployment
    from prefect.flows import load_flow_from_entrypoint

    from taxi_duration.modeling.batch_scoring import DEFAULT_MODEL_URI

    entrypoint = f"{os.path.relpath(settings.project_dir() / 'flows' / 'score.py')}:taxi_duration_scoring"
    load_flow_from_entrypoint(entrypoint, use_placeholder_flow=False)  # fails loudly, as load_pipeline_flow
    return RunnerDeployment.from_entrypoint(
        entrypoint,
        name=name,
        parameters={"color": "green", "model_uri": DEFAULT_MODEL_URI},
        description=SCORING_DEPLOYMENT_DESCRIPTION,
        tags=list(SCORING_DEPLOYMENT_TAGS),
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cron", default=MONTHLY_CRON, help=f"cron schedule in UTC (default {MONTHLY_CRON!r})")
    parser.add_argument("--name", default=DEPLOYMENT_NAME, help=f"deployment name (default {DEPLOYMENT_NAME!r})")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Same working directory as prefect.yaml's pull step: entrypoint flows/pipeline.py.
    os.chdir(settings.project_dir())
    try:
        deployments = [build_deployment(name=args.name, cron=args.cron), build_scoring_deployment()]
    except ValueError as error:  # a malformed cron or name, reported by Prefect
        print(f"error: {error}", file=sys.stderr)
        return 2

    from prefect import serve

    try:
        with endpoints.prefect_api_for_run() as prefect_api:
            if prefect_api:
                print(f"Prefect UI: {prefect_api.removesuffix('/api')}/deployments")
            serve(*deployments)
    except local_servers.ServiceError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0
