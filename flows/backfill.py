"""The backfill's command line: the pipeline once per month over a range, a bounded number at a time.

    python flows/backfill.py --from 2023-01 --to 2023-04 [--color green] [--data-source URL|DIR]
                             [--experiment NAME] [--max-parallel 2] [--force] [--verbose]
                             [--dask | --dask-address tcp://HOST:8786]

The flow and its command line are defined in taxi_duration.orchestration.backfill.
"""

from __future__ import annotations

from taxi_duration.orchestration import cli
from taxi_duration.orchestration.backfill import backfill, main

__all__ = ["backfill"]

if __name__ == "__main__":
    exit_code = main()
    cli.exit_process(exit_code)
