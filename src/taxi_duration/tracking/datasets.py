"""The input files of a run, as MLflow records them (`log_inputs`: the run's Datasets tab)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass

from taxi_duration.tracking.mlflow_runs import mlflow_client


@dataclass(frozen=True)
class TripDataset:
    """One trip file a run read, as its MLflow Datasets tab names it."""

    name: str  # the file name, {color}_tripdata_YYYY-MM.parquet
    source: str  # the URL it comes from, or its path in a folder source
    sha256: str  # the digest the stage keys compute
    rows: int  # trips in the file
    context: str  # training, validation or scoring


# MLflow's SQL stores keep a dataset digest in 36 characters: the digest is the sha256's
# first 16 hex digits, and the whole sha256 is in the dataset's profile.
DATASET_DIGEST_LENGTH = 16


def log_trip_datasets(tracking_uri: str, run_id: str, datasets: Iterable[TripDataset]) -> None:
    """Record the run's input files with `log_inputs`: name, digest, source, row count, context."""
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    inputs = []
    for dataset in datasets:
        remote = dataset.source.startswith(("http://", "https://"))
        inputs.append(
            DatasetInput(
                dataset=Dataset(
                    name=dataset.name,
                    digest=dataset.sha256[:DATASET_DIGEST_LENGTH],
                    # The source JSON of MLflow's own HTTP and local-file dataset sources.
                    source_type="http" if remote else "local",
                    source=json.dumps({"url": dataset.source} if remote else {"uri": dataset.source}),
                    profile=json.dumps({"num_rows": dataset.rows, "sha256": dataset.sha256}),
                ),
                tags=[InputTag(key=MLFLOW_DATASET_CONTEXT, value=dataset.context)],
            )
        )
    client = mlflow_client(tracking_uri)
    for attempt in range(3):
        try:
            client.log_inputs(run_id, datasets=inputs)
            return
        except Exception:
            # Runs logging the same file at once (a backfill: one month's validation file is the
            # next one's training file) race to create the experiment's dataset row; the loser
            # finds it on the next try.
            if attempt == 2:
                raise
            time.sleep(0.2 * (attempt + 1))
