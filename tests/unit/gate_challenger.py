"""One challenger process of the gate race (test_gate_concurrency): `python gate_challenger.py SPEC INDEX`.

It imports everything first and says it is ready, then for each round waits for the round's
start file and gates its challenger at once, so that every challenger of a round reads the
champion at about the same moment. Each decision is written to `<folder>/round-R-challenger-I.json`.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from taxi_duration.tracking import registry


def main(spec_path: str, index: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    folder = Path(spec["folder"])
    me = spec["challengers"][int(index)]
    records = pd.read_parquet(spec["records"])
    targets = np.load(spec["targets"])
    (folder / f"ready-{index}").touch()
    for round_number, registered_model in enumerate(spec["registered_models"]):
        start = folder / f"start-{round_number}"
        while not start.exists():
            time.sleep(0.002)
        decision = registry.register_and_gate(
            spec["tracking_uri"],
            me["run_id"],
            me["model_uri"],
            records,
            targets,
            me["rmse"],
            spec["validation_month"],
            registered_model,
        )
        result = folder / f"round-{round_number}-challenger-{index}.json"
        partial = result.with_suffix(".partial")
        partial.write_text(
            json.dumps(
                {
                    "version": decision.version,
                    "promoted": decision.promoted,
                    "rmse": decision.challenger_rmse,
                    "champion_version": decision.champion_version,
                    "champion_rmse": decision.champion_rmse,
                }
            )
        )
        partial.replace(result)  # the test reads it as soon as it exists: never half-written


if __name__ == "__main__":
    main(*sys.argv[1:])
