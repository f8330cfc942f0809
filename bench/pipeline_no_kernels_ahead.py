"""flows/pipeline.py with no runners started ahead: each stage starts its runner when its turn comes.

bench/run.py's "cold, no kernels ahead" variant: what starting the kernels ahead
(taxi_duration.orchestration.declarations.start_runners) saves a cold run. Same arguments as flows/pipeline.py.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import taxi_duration.orchestration  # noqa: F401 - first: its environment and imports, as in flows/pipeline.py
from taxi_duration.orchestration import declarations
from taxi_duration.runner import PreparedRunner

FLOW_SCRIPT = Path(__file__).resolve().parents[1] / "flows" / "pipeline.py"


def no_runners(to_execute: object) -> dict[str, PreparedRunner]:
    return {}


if __name__ == "__main__":
    # Fails loudly, rather than measuring the unchanged pipeline, if the hook moved.
    assert callable(getattr(declarations, "start_runners", None)), (
        "taxi_duration.orchestration.declarations.start_runners is gone"
    )
    declarations.start_runners = no_runners
    sys.argv = [str(FLOW_SCRIPT), *sys.argv[1:]]
    runpy.run_path(str(FLOW_SCRIPT), run_name="__main__")
