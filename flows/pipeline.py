"""The pipeline's entry points: its command line, and the flow Prefect deployments name.

    python flows/pipeline.py --year 2023 --month 3 [--color green] [--data-source URL|DIR] [--experiment NAME]
                             [--latest] [--force] [--verbose]

Prefect's entrypoint (prefect.yaml, `make serve`): flows/pipeline.py:taxi_duration_pipeline.
The flow is defined in taxi_duration.orchestration.pipeline, the command line in
taxi_duration.orchestration.cli.
"""

from __future__ import annotations

from taxi_duration.orchestration import cli
from taxi_duration.orchestration.pipeline import taxi_duration_pipeline

__all__ = ["taxi_duration_pipeline"]

if __name__ == "__main__":
    exit_code = cli.main()
    cli.exit_process(exit_code)
