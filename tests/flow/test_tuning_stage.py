"""The tuning stage (notebooks/02_tune.ipynb, declared `when: tune_trials`): off unless a run asks for trials.

`--tune-trials 3` on the synthetic months: one pipeline run whose trials are MLflow child runs,
spread over a local Dask cluster's worker processes; 03_train trains with the best trial's values;
the stage's report is archived; a rerun, with the trials in local processes this time, reuses it
(where trials run is no part of the stage's key). The pipeline without trials is the other flow
tests' business.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.flow

RunPipeline = Callable[..., subprocess.CompletedProcess]
SEARCHED = ("learning_rate", "max_depth", "min_child_weight", "reg_alpha", "reg_lambda", "num_boost_round")


def _records(outputs: Path) -> list[dict[str, Any]]:
    records = [json.loads(path.read_text()) for path in outputs.glob("green/2023-03/*/run.json")]
    return sorted(records, key=lambda record: record["started"])


def _trials(client: MlflowClient, parent_run_id: str) -> list[Run]:
    parent = client.get_run(parent_run_id)
    return client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'"
    )


@pytest.mark.long
def test_three_trials_on_dask_are_child_runs_and_train_uses_the_best_then_a_rerun_reuses_them(
    run_pipeline: RunPipeline, synthetic_source: Path, isolated_stores: dict[str, Any]
) -> None:
    first = run_pipeline("--data-source", str(synthetic_source), "--tune-trials", "3", "--tune-workers", "2", "--dask")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "02_tune.review.html" in first.stdout
    [record] = _records(isolated_stores["outputs"])
    statuses = {row["stage"]: row["status"] for row in record["stages"]}
    assert statuses["02_tune"] == statuses["03_train"] == "COMPLETED"
    client = MlflowClient(isolated_stores["tracking_uri"])
    run_id = record["mlflow_run_id"]

    trials = _trials(client, run_id)
    assert len(trials) == 3 and {trial.info.status for trial in trials} == {"FINISHED"}
    # Two Dask worker processes took the first two trials at once.
    assert len({trial.data.tags["taxi.trial_worker"] for trial in trials}) >= 2
    best = min(trials, key=lambda trial: trial.data.metrics["holdout_rmse"])

    parent = client.get_run(run_id)
    # 03_train logged the parameters it trained with: the best trial's.
    assert {name: parent.data.params[name] for name in SEARCHED} == {name: best.data.params[name] for name in SEARCHED}
    assert parent.data.params["tune.trials"] == "3"
    assert parent.data.metrics["tune.best_holdout_rmse"] == pytest.approx(best.data.metrics["holdout_rmse"])
    archived = {
        artifact.path for folder in ("notebooks", "reports") for artifact in client.list_artifacts(run_id, folder)
    }
    assert {"notebooks/02_tune.ipynb", "reports/02_tune.html", "reports/02_tune.review.html"} <= archived
    report = (Path(parent.data.tags["taxi.run_dir"]) / "02_tune.review.html").read_text()
    assert "<script" not in report and report.count("data:image/png") >= 3  # history, importances, best vs recipe

    # The same search again, its trials in local processes: reused, no new trial runs.
    second = run_pipeline("--data-source", str(synthetic_source), "--tune-trials", "3", "--tune-workers", "2")
    assert second.returncode == 0, second.stderr[-3000:]
    rerun = _records(isolated_stores["outputs"])[-1]
    assert {row["stage"]: row["status"] for row in rerun["stages"]}["02_tune"] == "CACHED"
    assert {row["stage"]: row["status"] for row in rerun["stages"]}["03_train"] == "CACHED"
    assert _trials(client, rerun["mlflow_run_id"]) == []
    replayed = client.get_run(rerun["mlflow_run_id"]).data.params
    assert {name: replayed[f"tune.best.{name}"] for name in SEARCHED} == {
        name: best.data.params[name] for name in SEARCHED
    }
