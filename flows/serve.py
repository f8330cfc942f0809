"""Serve the pipeline as a scheduled Prefect deployment from this process (`make serve`).

    python flows/serve.py [--cron "0 6 3 * *"] [--name monthly]

Defined in taxi_duration.orchestration.deployment.
"""

from __future__ import annotations

import sys

from taxi_duration.orchestration.deployment import main

if __name__ == "__main__":
    sys.exit(main())
