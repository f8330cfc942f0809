"""Score a month with a registered model: the scoring flow's command line and Prefect entrypoint.

    python flows/score.py --year 2023 --month 5 [--color green] [--model models:/nyc-taxi-duration@champion]
                          [--data-source URL|DIR] [--experiment NAME] [--force] [--verbose]

Prefect's entrypoint (prefect.yaml, `make serve`): flows/score.py:taxi_duration_scoring. The flow
is defined in taxi_duration.orchestration.scoring_flow, the command line in taxi_duration.orchestration.cli.
"""

from __future__ import annotations

from taxi_duration.orchestration import cli
from taxi_duration.orchestration.scoring_flow import taxi_duration_scoring

__all__ = ["taxi_duration_scoring"]

if __name__ == "__main__":
    exit_code = cli.score_main()
    cli.exit_process(exit_code)
