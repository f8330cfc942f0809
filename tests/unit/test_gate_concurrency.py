"""The champion gate under concurrency: challengers in separate processes gate at the same moment.

Three challengers, all better than the champion and each better than the last, start their
gates together (a start file each round), in two rounds of a fresh registered model each.
Without the gate's lock every challenger reads the first champion before any alias moves, so
all three promote over it and whichever writes last wins: the decisions show the stale read at
once, and the champion is the best only by chance. With the lock, the decisions form one chain
from the first champion to the best challenger. Once with the file lock (no Prefect server), once
with a Prefect global concurrency limit on the tests' real local Prefect server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from taxi_duration.modeling.features import RAW_FEATURES
from taxi_duration.servers import endpoints
from taxi_duration.tracking import gate_lock, mlflow_runs, registry

from .test_registry import challenger_data, one_xgboost_thread, train_and_log, uri  # noqa: F401 - fixtures by name

ROUNDS = 2
CHALLENGER_ROUNDS = (4, 12, 40)  # boosting rounds: more rounds, lower RMSE on these tiny months
CHILD = Path(__file__).with_name("gate_challenger.py")
WAIT_SECONDS = 180


def check_decisions(first_champion: str, rmse_of: dict[str, float], decisions: list[dict], champion: str) -> None:
    """The decisions of one round are those of gates that took turns, and the best challenger won.

    `rmse_of`: each version's RMSE on the round's validation trips; `champion`: the alias at the end.
    """
    promoted = [decision for decision in decisions if decision["promoted"]]
    seen = [decision["champion_version"] for decision in promoted]
    assert len(set(seen)) == len(seen), f"two gates promoted over the same champion (a stale read): {decisions}"
    # Serial gates: each promotion replaces the champion the previous one left.
    promoted_over = {decision["champion_version"]: decision["version"] for decision in promoted}
    current, chain = first_champion, [first_champion]
    while current in promoted_over:
        current = promoted_over[current]
        chain.append(current)
    assert len(chain) == len(promoted) + 1, f"the promotions do not form one chain from v{first_champion}: {decisions}"
    assert champion == current, f"champion is v{champion}, but the last promotion was to v{current}"
    for decision in decisions:
        assert decision["champion_version"] in chain, (
            f"a gate compared with v{decision['champion_version']}, never champion"
        )
        assert decision["champion_rmse"] == pytest.approx(rmse_of[decision["champion_version"]], rel=1e-9)
        assert decision["promoted"] == (decision["rmse"] < decision["champion_rmse"]), decision
    best = min(rmse_of, key=rmse_of.get)
    assert champion == best, (
        f"champion is v{champion} ({rmse_of[champion]:.4f}), not the best v{best} ({rmse_of[best]:.4f})"
    )


def test_the_decision_check_sees_a_stale_read():
    rmse_of = {"1": 9.0, "2": 8.0, "3": 7.0, "4": 6.0}
    # All three read v1 before any alias moved, and v2 wrote last.
    racing = [
        {"version": v, "promoted": True, "rmse": rmse_of[v], "champion_version": "1", "champion_rmse": 9.0}
        for v in ("2", "3", "4")
    ]
    with pytest.raises(AssertionError, match="stale read"):
        check_decisions("1", rmse_of, racing, "2")
    serial = [
        {"version": "3", "promoted": True, "rmse": 7.0, "champion_version": "1", "champion_rmse": 9.0},
        {"version": "2", "promoted": False, "rmse": 8.0, "champion_version": "3", "champion_rmse": 7.0},
        {"version": "4", "promoted": True, "rmse": 6.0, "champion_version": "3", "champion_rmse": 7.0},
    ]
    check_decisions("1", rmse_of, serial, "4")
    with pytest.raises(AssertionError, match="not the best"):
        check_decisions("1", rmse_of, serial[:2], "3")


def race(uri: str, folder: Path, environment: dict[str, str]) -> None:  # noqa: F811 - a URI, not the fixture
    """ROUNDS rounds of concurrent gates; each round's decisions checked with check_decisions."""
    train, validation, month = challenger_data()
    champion = train_and_log(uri, "champion", train, validation, month, rounds=1)
    challengers = [train_and_log(uri, f"challenger-{n}", train, validation, month, rounds=n) for n in CHALLENGER_ROUNDS]
    records, targets = validation[RAW_FEATURES].reset_index(drop=True), champion.matrices.y_val
    rmses = [
        registry.servable_rmse(registry.load_servable_uri(uri, run.model_uri)[0], records, targets)
        for run in (champion, *challengers)
    ]
    assert rmses == sorted(rmses, reverse=True) and len(set(rmses)) == len(rmses), (
        f"challengers not ever better: {rmses}"
    )

    records.to_parquet(folder / "records.parquet")
    import numpy as np

    np.save(folder / "targets.npy", targets)
    models = [f"race-{folder.name}-{number}" for number in range(ROUNDS)]
    spec = {
        "folder": str(folder),
        "tracking_uri": uri,
        "validation_month": month,
        "registered_models": models,
        "records": str(folder / "records.parquet"),
        "targets": str(folder / "targets.npy"),
        "challengers": [
            {"run_id": run.run_id, "model_uri": run.model_uri, "rmse": rmse}
            for run, rmse in zip(challengers, rmses[1:], strict=True)
        ],
    }
    (folder / "spec.json").write_text(json.dumps(spec))
    children = [
        subprocess.Popen(
            [sys.executable, str(CHILD), str(folder / "spec.json"), str(index)],
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for index in range(len(challengers))
    ]
    try:
        wait_for(folder, [f"ready-{index}" for index in range(len(children))], children)
        for number, model in enumerate(models):
            first = registry.register_and_gate(
                uri, champion.run_id, champion.model_uri, records, targets, rmses[0], month, model
            )
            (folder / f"start-{number}").touch()
            results = [f"round-{number}-challenger-{index}.json" for index in range(len(children))]
            wait_for(folder, results, children)
            decisions = [json.loads((folder / name).read_text()) for name in results]
            rmse_of = {first.version: rmses[0], **{d["version"]: d["rmse"] for d in decisions}}
            alias = mlflow_runs.mlflow_client(uri).get_model_version_by_alias(model, registry.CHAMPION_ALIAS)
            check_decisions(first.version, rmse_of, decisions, str(alias.version))
    finally:
        for child in children:
            child.kill() if child.poll() is None else None
            child.wait(timeout=30)


def wait_for(folder: Path, names: list[str], children: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not all((folder / name).exists() for name in names):
        for child in children:
            if child.poll() is not None and child.returncode != 0:
                pytest.fail(f"a challenger process failed ({child.returncode}):\n{child.stderr.read()[-3000:]}")
        assert time.monotonic() < deadline, f"challengers did not write {names} within {WAIT_SECONDS} s"
        time.sleep(0.01)


def test_concurrent_gates_on_one_machine_take_turns_through_the_file_lock(uri, tmp_path):  # noqa: F811 - the fixture
    environment = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    race(uri, tmp_path, environment)
    assert gate_lock.lock_file(uri, f"race-{tmp_path.name}-0").exists()


@pytest.mark.integration
def test_concurrent_gates_take_turns_through_a_prefect_global_concurrency_limit(uri, tmp_path):  # noqa: F811 - the fixture
    api = endpoints.ensure_prefect_server()
    race(uri, tmp_path, {**os.environ, "PREFECT_API_URL": api})
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name(gate_lock.limit_name(f"race-{tmp_path.name}-0"))
    assert (limit.limit, limit.active, limit.active_slots) == (1, True, 0)


def test_limit_names_keep_to_what_prefect_allows_and_stay_apart():
    assert gate_lock.limit_name("nyc-taxi-duration") == "taxi-champion-gate-nyc-taxi-duration"
    odd = [gate_lock.limit_name(name) for name in ("team/model", "team%model", "team-model")]
    assert all(not set("/%&><") & set(name) for name in odd)
    assert len(set(odd)) == 3


def test_the_file_lock_excludes_a_second_holder(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"  # noqa: F811 - this test's own store, not the fixture
    holder = "import sys, time; from taxi_duration.tracking import gate_lock\nwith gate_lock.champion_gate(sys.argv[1], 'm'):\n    print('held', flush=True); time.sleep(30)"
    environment = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    other = subprocess.Popen([sys.executable, "-c", holder, uri], env=environment, stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "held"
        with pytest.MonkeyPatch.context() as patch:
            patch.delenv("PREFECT_API_URL", raising=False)
            patch.setattr(gate_lock, "WAIT_SECONDS", 0.3)
            with (
                pytest.raises(gate_lock.GateLockError, match=r"waited 0.3 s for the file lock .*another gate holds it"),
                gate_lock.champion_gate(uri, "m"),
            ):
                pass
            with gate_lock.champion_gate(uri, "another model"):
                pass  # each registered model has its own lock
    finally:
        other.kill()
        other.wait(timeout=30)


@pytest.mark.integration
def test_a_limit_that_would_not_exclude_is_refused_naming_it(monkeypatch):
    api = endpoints.ensure_prefect_server()
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.settings import PREFECT_API_URL, temporary_settings

    name = gate_lock.limit_name("two-slot-model")
    with temporary_settings(updates={PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=2))
    monkeypatch.setenv("PREFECT_API_URL", api)
    with (
        pytest.raises(gate_lock.GateLockError, match=rf"{name}.*has 2 slot\(s\).*prefect gcl update {name} --limit 1"),
        temporary_settings(updates={PREFECT_API_URL: api}),
        gate_lock.champion_gate("sqlite:///x.db", "two-slot-model"),
    ):
        pass
