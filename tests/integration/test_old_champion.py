"""A champion registered by the code from before the package was regrouped keeps working.

A user's registry holds servable models whose logged code (`code_paths`) is the package as it was
when they were trained, and whose saved Pipeline names `taxi_duration.serving.TripFeaturizer`.
Here the commit before the regrouping, checked out in a git worktree, trains on synthetic trips
and registers such a champion, in a subprocess that imports only that copy. Then today's code
gates a challenger against it (re-scoring it on the validation trips), scores a month with it
through the scoring command, and `mlflow models serve` answers with it over HTTP; each gives the
predictions the old code gave. Loading it in this process leaves no trace of its old copy: sys.path
is as before and every taxi_duration module comes from the running package.

These tests import no module of the package by its path inside it beyond `taxi_duration.tracking.registry`:
they use the command lines and the registry's public functions, so they hold across a move.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

import taxi_duration
from taxi_duration.tracking import registry

pytestmark = [pytest.mark.integration, pytest.mark.long]

# HEAD when this test was written, before the package was regrouped into subpackages: the flat
# package whose models users have registered.
PRE_MOVE_COMMIT = "97c4ecb976329fdf95425db2c7abf4dcffca5fa4"
PROJECT_DIR = Path(__file__).resolve().parents[2]
PACKAGE_DIR = Path(taxi_duration.__file__).resolve().parent
REGISTERED_MODEL = "nyc-taxi-duration"
RAW_COLUMNS = ["PULocationID", "DOLocationID", "trip_distance"]
TRAIN_MONTH, VALIDATION_MONTH = "2023-03", "2023-04"

# Run with the old commit's src/ first on PYTHONPATH: its own module paths, frozen with it.
OLD_CODE_SCRIPT = """
import json, sys
from pathlib import Path

import taxi_duration
from taxi_duration import data, drift, features, model, registry, serving, settings, tracking

settings.apply_environment_defaults()
source, tracking_uri, out, old_src = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4])
assert Path(taxi_duration.__file__).resolve().is_relative_to(old_src), taxi_duration.__file__


def month(name):
    return features.prepare_trips(data.read_trips(source / f"green_tripdata_{name}.parquet", "green"), "green")


train, validation = month("2023-03"), month("2023-04")
matrices = features.build_matrices(train, validation)
raw_validation = validation[serving.RAW_COLUMNS].reset_index(drop=True)
profile = drift.trip_profile("2023-03", train["trip_distance"], train["duration"])


def logged(run_name, rounds):
    booster = model.train_booster(
        matrices.X_train, matrices.y_train, matrices.X_val, matrices.y_val, num_boost_round=rounds
    )
    pipeline = serving.servable_model(matrices.vectorizer, booster)
    tags = {"taxi.train_month": "2023-03", "taxi.validation_month": "2023-04", "taxi.color": "green"}
    run_id = tracking.start_run(tracking_uri, "nyc-taxi-duration", run_name, params={}, tags=tags)
    uri = tracking.log_servable_model(tracking_uri, run_id, pipeline, serving.input_example(train), profile)
    return run_id, uri, pipeline, registry.servable_rmse(pipeline, raw_validation, matrices.y_val)


champion_run, champion_uri, champion, champion_rmse = logged("old-champion", model.NUM_BOOST_ROUND)
decision = registry.register_and_gate(
    tracking_uri, champion_run, champion_uri, raw_validation, matrices.y_val, champion_rmse, "2023-04",
    train_month="2023-03",
)
assert decision.promoted and decision.version == "1", decision
tracking.finish_run(tracking_uri, champion_run, "FINISHED")
# Two boosting rounds: a challenger the champion beats, so the champion stays whatever runs first.
challenger_run, challenger_uri, _, challenger_rmse = logged("old-challenger", 2)

raw_validation.assign(duration=matrices.y_val).to_parquet(out / "validation.parquet")
scored = month("2023-05")[serving.RAW_COLUMNS].drop_duplicates().reset_index(drop=True)
scored = scored[serving.refusal_reasons(scored).isna()].reset_index(drop=True)
scored.assign(old_minutes=champion.predict(scored)).to_parquet(out / "scored.parquet")
(out / "old.json").write_text(json.dumps({
    "champion_rmse": champion_rmse,
    "challenger_run_id": challenger_run,
    "challenger_model_uri": challenger_uri,
    "challenger_rmse": challenger_rmse,
}))
"""


@dataclass(frozen=True)
class OldChampion:
    """What the old code left: its MLflow store with champion v1, and its own figures and predictions."""

    root: Path  # mlflow.db and mlartifacts/ (the models, with their old code)
    old_package: Path  # the worktree's src/taxi_duration
    validation: pd.DataFrame  # the validation trips' RAW_COLUMNS and duration
    scored: pd.DataFrame  # distinct trips of the scored month (RAW_COLUMNS) and the champion's old_minutes
    figures: dict[str, Any]  # champion_rmse, challenger_run_id, challenger_model_uri, challenger_rmse

    def store_copy(self, folder: Path) -> str:
        """A tracking URI for a copy of the store, so each test changes only its own registry."""
        shutil.copyfile(self.root / "mlflow.db", folder / "mlflow.db")
        return f"sqlite:///{folder / 'mlflow.db'}"


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(PROJECT_DIR), *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def old_champion(tmp_path_factory, synthetic_source, empty_tracking_store) -> Iterator[OldChampion]:
    """The pre-move commit trains and registers a champion (and logs a challenger) in its own process."""
    if _git("cat-file", "-e", f"{PRE_MOVE_COMMIT}^{{commit}}").returncode != 0:
        pytest.skip(
            f"commit {PRE_MOVE_COMMIT[:12]} (the package before it was regrouped) is not in this clone "
            "(a shallow clone, or no git checkout): fetch the full history to run this test"
        )
    root = tmp_path_factory.mktemp("old-champion")
    worktree = root / "pre-move"
    added = _git("worktree", "add", "--detach", "--quiet", str(worktree), PRE_MOVE_COMMIT)
    assert added.returncode == 0, added.stderr
    try:
        shutil.copyfile(empty_tracking_store, root / "mlflow.db")
        tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
        old_src = worktree / "src"
        trained = subprocess.run(
            [sys.executable, "-c", OLD_CODE_SCRIPT, str(synthetic_source), tracking_uri, str(root), str(old_src)],
            env={
                **os.environ,
                "PYTHONPATH": str(old_src),  # before site-packages, where today's package is installed
                "MLFLOW_TRACKING_URI": tracking_uri,
            },
            cwd=root,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert trained.returncode == 0, trained.stderr[-3000:]
        yield OldChampion(
            root=root,
            old_package=old_src / "taxi_duration",
            validation=pd.read_parquet(root / "validation.parquet"),
            scored=pd.read_parquet(root / "scored.parquet"),
            figures=json.loads((root / "old.json").read_text()),
        )
    finally:
        _git("worktree", "remove", "--force", str(worktree))
        _git("worktree", "prune")


def _from_running_package(module: Any) -> bool:
    return Path(module.__file__).resolve().is_relative_to(PACKAGE_DIR)


def test_the_gate_rescores_the_old_champion_and_leaves_no_old_code_behind(old_champion, tmp_path):
    tracking_uri = old_champion.store_copy(tmp_path)
    figures = old_champion.figures
    path_before = list(sys.path)

    decision = registry.register_and_gate(
        tracking_uri,
        figures["challenger_run_id"],
        figures["challenger_model_uri"],
        old_champion.validation[RAW_COLUMNS],
        old_champion.validation["duration"].to_numpy(),
        figures["challenger_rmse"],
        VALIDATION_MONTH,
        train_month=TRAIN_MONTH,
    )
    # Today's code re-scored the old champion on the same trips, and found the RMSE the old code measured.
    assert (decision.champion_version, decision.comparison, decision.version) == ("1", registry.COMPARED, "2")
    assert decision.champion_rmse == pytest.approx(figures["champion_rmse"], rel=1e-9)
    assert not decision.promoted and decision.challenger_rmse > decision.champion_rmse

    # Loaded here, it predicts what the old code predicted, with the running package's classes.
    servable, metadata = registry.load_servable(tracking_uri, REGISTERED_MODEL, "1")
    np.testing.assert_allclose(
        servable.predict(old_champion.scored[RAW_COLUMNS]), old_champion.scored["old_minutes"], rtol=1e-6
    )
    assert "taxi_training_profile" in metadata
    featurizer_class = type(servable.steps[0][1])
    assert featurizer_class.__module__ == "taxi_duration.serving"
    assert _from_running_package(sys.modules[featurizer_class.__module__])

    # No trace of the model's old copy: sys.path as before, and no entry on it holds a taxi_duration
    # but today's (a process spawned from here gets this sys.path).
    assert sys.path == path_before
    holders = [Path(entry or ".") / "taxi_duration" for entry in sys.path]
    assert {holder.resolve() for holder in holders if holder.is_dir()} <= {PACKAGE_DIR}
    # Any module imported from now on would come from the running package (where the import system
    # finds each one; whether a test run has imported it already or not), as does every one imported before.
    module_names = [
        ".".join(("taxi_duration", *path.relative_to(PACKAGE_DIR).with_suffix("").parts))
        for path in PACKAGE_DIR.rglob("*.py")
        if path.name != "__init__.py"
    ]
    assert len(module_names) > 30, module_names
    found_elsewhere = [
        name
        for name in module_names
        if not Path(importlib.util.find_spec(name).origin).resolve().is_relative_to(PACKAGE_DIR)
    ]
    assert found_elsewhere == []
    package_modules = [module for name, module in sys.modules.items() if name.partition(".")[0] == "taxi_duration"]
    assert all(_from_running_package(module) for module in package_modules if getattr(module, "__file__", None))


def test_the_scoring_command_scores_a_month_with_the_old_champion(
    old_champion, pipeline_cli, synthetic_source, tmp_path
):
    env = {
        "MLFLOW_TRACKING_URI": old_champion.store_copy(tmp_path),
        "TAXI_OUTPUTS_DIR": str(tmp_path / "outputs"),
        "TAXI_DATA_DIR": str(tmp_path / "data"),
    }
    scored = pipeline_cli(
        "--year", "2023", "--month", "5", "--data-source", str(synthetic_source), env=env, script="score.py"
    )
    assert scored.returncode == 0, scored.stderr[-3000:]
    assert f"green taxis of 2023-05 with {REGISTERED_MODEL} v1" in scored.stdout, scored.stdout[-2000:]
    (predictions_file,) = (tmp_path / "outputs").rglob("predictions/green_2023-05.parquet")
    predictions = pd.read_parquet(predictions_file)
    # Every trip scored, with the minutes the old code predicted for it.
    compared = predictions.merge(old_champion.scored, on=RAW_COLUMNS, how="left", validate="many_to_one")
    assert len(predictions) > 0 and compared["old_minutes"].notna().all()
    np.testing.assert_allclose(compared["predicted_minutes"], compared["old_minutes"], rtol=1e-6)


def _post(url: str, payload: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_mlflow_models_serve_answers_with_the_old_champion(old_champion, free_port, tmp_path):
    port = free_port()
    bin_dir = Path(sys.executable).parent
    with open(tmp_path / "serve.log", "wb") as log:  # the server holds its own copy of the file
        server = subprocess.Popen(
            [
                str(bin_dir / "mlflow"),
                "models",
                "serve",
                "-m",
                f"models:/{REGISTERED_MODEL}@champion",
                "--env-manager",
                "local",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            env={
                **os.environ,
                "MLFLOW_TRACKING_URI": old_champion.store_copy(tmp_path),
                "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
            },
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5):
                    break
            except OSError:
                assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "the model server did not answer /ping within 180 s"
                time.sleep(0.5)
        sample = old_champion.scored.sample(100, random_state=5)
        status, body = _post(
            f"http://127.0.0.1:{port}/invocations",
            {"dataframe_split": sample[RAW_COLUMNS].to_dict(orient="split", index=False)},
        )
        assert status == 200, body
        np.testing.assert_allclose(body["predictions"], sample["old_minutes"], rtol=1e-6)
        # The model's own input rules hold too: a zone that is no TLC zone refuses the batch.
        status, body = _post(
            f"http://127.0.0.1:{port}/invocations",
            {"dataframe_records": [{"PULocationID": 999, "DOLocationID": 75, "trip_distance": 1.2}]},
        )
        assert status == 400 and "PULocationID 999 is not a TLC zone" in body["message"], body
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
