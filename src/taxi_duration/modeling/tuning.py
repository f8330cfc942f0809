"""Hyperparameter search over the recipe's XGBoost parameters, trials in worker processes or on Dask.

How it runs, and why this way:

- One driver (the process that calls `run_search`) owns the Optuna study, in memory, and uses
  ask/tell: it asks for a trial's parameters, hands them to a worker, and tells the study the
  worker's hold-out RMSE (or FAILED). Workers never touch the study, so no storage every worker
  must reach is needed (no RDB, no Dask-hosted storage): trials on another machine need only the
  data, which travels with them. The cost is that the driver must live as long as the search;
  in a pipeline stage it does.
- The driver also records every trial as an MLflow child run, from the worker's result. A trial
  whose worker died is recorded FAILED as well, which a worker logging its own run could not do.
- Trials run `workers` at a time: in this process (workers=1, no Dask), in local worker
  processes (one single-process pool per worker, so a worker that dies takes only its own trial
  with it), on a local Dask cluster (`dask=True`) or on an existing scheduler (`dask_address`).
  On Dask each trial holds the worker resource `trial` (1 per worker), so a worker runs one
  trial at a time, trained on the worker's own threads.
- XGBoost's OpenMP threads are set per trial (`nthread`) to the threads its worker has: the
  cores divided among the local workers, a Dask worker's `nthreads`. Every trial using all cores
  while others do the same is the oversubscription docs/performance.md warns about.
- TPE is seeded, and the recipe's own values are the first trial, so the best trial is never
  worse than the recipe on the hold-out. With one worker the search is reproducible; with more,
  which trials finish first (and so what TPE has seen when it proposes the next) depends on timing.
"""

from __future__ import annotations

import math
import os
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor
from concurrent.futures import wait as wait_futures
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np
import pandas as pd

from taxi_duration import settings
from taxi_duration.modeling import model
from taxi_duration.tracking import mlflow_runs

if TYPE_CHECKING:
    import optuna
    import scipy.sparse

    from taxi_duration.modeling.features import FeatureMatrices

HOLDOUT_DAYS = 7
# Rounds without a better hold-out RMSE after which a trial stops: the rounds the search proposes
# are an upper bound, as in the training notebook.
TRIAL_EARLY_STOPPING_ROUNDS = 10
DEFAULT_SEED = settings.DEFAULT_TUNE_SEED
DASK_TRIAL_RESOURCE = "trial"
DASK_CONNECT_TIMEOUT_SECONDS = 10
TrialState = Literal["FINISHED", "FAILED"]


class TuningError(RuntimeError):
    """The search cannot go on (not one failed trial: those are recorded and the search goes on)."""


class DaskUnavailableError(TuningError):
    """The Dask scheduler cannot be reached or has no worker that can run a trial."""


class DaskSchedulerLostError(TuningError):
    """The Dask scheduler went away in the middle of the search."""


@dataclass(frozen=True)
class Dimension:
    """One searched parameter: its range, on a log scale or not, whole numbers or not."""

    name: str
    low: float
    high: float
    log: bool = False
    integer: bool = False


# The recipe's values (model.XGB_PARAMS, model.NUM_BOOST_ROUND) lie inside every range.
SEARCH_SPACE: tuple[Dimension, ...] = (
    Dimension("learning_rate", 0.01, 0.5, log=True),
    Dimension("max_depth", 3, 40, integer=True),
    Dimension("min_child_weight", 0.5, 20.0, log=True),
    Dimension("reg_alpha", 1e-3, 10.0, log=True),
    Dimension("reg_lambda", 1e-3, 10.0, log=True),
    Dimension("num_boost_round", 10, 100, integer=True),
)


def recipe_values() -> dict[str, Any]:
    """The recipe's own values of the searched parameters: the search's first trial."""
    recipe = {**model.XGB_PARAMS, "num_boost_round": model.NUM_BOOST_ROUND}
    return {dimension.name: recipe[dimension.name] for dimension in SEARCH_SPACE}


def search_space_description() -> list[dict[str, Any]]:
    """The search space as plain values: for a cache key and the run's record."""
    return [{"name": d.name, "low": d.low, "high": d.high, "log": d.log, "integer": d.integer} for d in SEARCH_SPACE]


def suggest(trial: optuna.Trial) -> dict[str, Any]:
    """The trial's parameters, drawn from SEARCH_SPACE (an enqueued trial gets its fixed values)."""
    values: dict[str, Any] = {}
    for d in SEARCH_SPACE:
        if d.integer:
            values[d.name] = trial.suggest_int(d.name, int(d.low), int(d.high), log=d.log)
        else:
            values[d.name] = trial.suggest_float(d.name, d.low, d.high, log=d.log)
    return values


# ---------------------------------------------------------------------------------------------
# The hold-out: the training month's last days


def holdout_split(
    pickup_times: pd.Series | np.ndarray, month_end: pd.Timestamp, holdout_days: int = HOLDOUT_DAYS
) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (fit, hold-out): the hold-out is every trip picked up in the `holdout_days` before `month_end`.

    `month_end` is the first instant after the training month. A stray pickup from before the
    month goes to the fit rows, one after it to the hold-out (a later trip is never learnt from).
    """
    if holdout_days < 1:
        raise ValueError(f"holdout_days must be at least 1, got {holdout_days}")
    times = pd.to_datetime(pd.Series(np.asarray(pickup_times)))
    cutoff = pd.Timestamp(month_end) - pd.Timedelta(days=holdout_days)
    in_holdout = (times >= cutoff).to_numpy()
    fit_rows, holdout_rows = np.flatnonzero(~in_holdout), np.flatnonzero(in_holdout)
    if not len(fit_rows) or not len(holdout_rows):
        raise ValueError(
            f"a {holdout_days}-day hold-out before {month_end} leaves {len(fit_rows)} trips to fit and "
            f"{len(holdout_rows)} to score: the search needs both"
        )
    return fit_rows, holdout_rows


@dataclass(frozen=True)
class SearchData:
    """What every trial trains on (the training month less its hold-out) and is scored on."""

    X_fit: scipy.sparse.csr_matrix
    y_fit: np.ndarray
    X_holdout: scipy.sparse.csr_matrix
    y_holdout: np.ndarray

    def summary(self) -> dict[str, int]:
        return {"fit_rows": int(self.X_fit.shape[0]), "holdout_rows": int(self.X_holdout.shape[0])}


def search_data(
    matrices: FeatureMatrices,
    pickup_times: pd.Series | np.ndarray,
    month_end: pd.Timestamp,
    holdout_days: int = HOLDOUT_DAYS,
) -> SearchData:
    """The training matrix split by `holdout_split`; `pickup_times` are the training rows', in their order."""
    if len(pickup_times) != matrices.X_train.shape[0]:
        raise ValueError(f"{len(pickup_times)} pickup times for {matrices.X_train.shape[0]} training rows")
    fit_rows, holdout_rows = holdout_split(pickup_times, month_end, holdout_days)
    return SearchData(
        X_fit=matrices.X_train[fit_rows],
        y_fit=matrices.y_train[fit_rows],
        X_holdout=matrices.X_train[holdout_rows],
        y_holdout=matrices.y_train[holdout_rows],
    )


# ---------------------------------------------------------------------------------------------
# One trial, in a worker


@dataclass(frozen=True)
class TrialOutcome:
    """What a worker sends back: the score, or why there is none."""

    worker: str  # host:pid
    started: float  # seconds since the epoch
    ended: float
    holdout_rmse: float | None = None
    best_iteration: int | None = None
    error: str | None = None


def worker_identity() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def run_trial(params: dict[str, Any], data: SearchData, nthread: int | None) -> TrialOutcome:
    """Train with `params` on the fit rows, score on the hold-out; an error is returned, not raised.

    `nthread` None means: the threads of the Dask worker this runs in.
    """
    started = time.time()
    try:
        threads = nthread or _dask_worker_threads()
        overrides = {name: value for name, value in params.items() if name != "num_boost_round"}
        booster = model.train_booster(
            data.X_fit,
            data.y_fit,
            data.X_holdout,
            data.y_holdout,
            num_boost_round=int(params["num_boost_round"]),
            early_stopping_rounds=TRIAL_EARLY_STOPPING_ROUNDS,
            params={**overrides, "nthread": threads},
        )
        score = model.rmse(data.y_holdout, model.predict(booster, data.X_holdout))
        if not math.isfinite(score):
            raise ValueError(f"hold-out RMSE is {score}")
        return TrialOutcome(worker_identity(), started, time.time(), score, int(booster.best_iteration))
    except Exception as error:  # noqa: BLE001 - a trial's failure is its result; the search goes on
        return TrialOutcome(worker_identity(), started, time.time(), error=f"{type(error).__name__}: {error}")


def _dask_worker_threads() -> int:
    from distributed import get_worker

    return int(get_worker().state.nthreads)


TrialFunction = Callable[[dict[str, Any], SearchData, "int | None"], TrialOutcome]


# ---------------------------------------------------------------------------------------------
# Where trials run: this process, local worker processes, Dask


class _Engine(Protocol):
    capacity: int
    description: str

    def submit(self, number: int, params: dict[str, Any]) -> None: ...

    def next_done(self) -> tuple[int, TrialOutcome]: ...

    def close(self) -> None: ...


def local_cores() -> int:
    return settings.local_cores()


class _InThisProcess:
    """workers=1 without Dask: trials one after another here, on all the cores."""

    capacity = 1
    description = "sequentially in this process"

    def __init__(self, data: SearchData, trial_function: TrialFunction) -> None:
        self._data, self._trial_function, self._done = data, trial_function, list[tuple[int, TrialOutcome]]()

    def submit(self, number: int, params: dict[str, Any]) -> None:
        self._done.append((number, self._trial_function(params, self._data, local_cores())))

    def next_done(self) -> tuple[int, TrialOutcome]:
        return self._done.pop(0)

    def close(self) -> None:
        pass


def _hold_data(data: SearchData) -> None:
    global _worker_data
    _worker_data = data


_worker_data: SearchData | None = None


def _trial_on_held_data(trial_function: TrialFunction, params: dict[str, Any], nthread: int) -> TrialOutcome:
    assert _worker_data is not None, "the worker was started without the search data"
    return trial_function(params, _worker_data, nthread)


@dataclass
class _Slot:
    """One worker process (a pool of one): if it dies, only its own trial is lost."""

    pool: ProcessPoolExecutor
    identity: str
    running: tuple[int, float, Future[TrialOutcome]] | None = None


class _LocalProcesses:
    """Trials in `workers` local processes, each trial on cores // workers threads."""

    def __init__(self, data: SearchData, trial_function: TrialFunction, workers: int) -> None:
        self.capacity = workers
        self.description = f"in {workers} local worker processes"
        self._data, self._trial_function = data, trial_function
        self._threads = max(1, local_cores() // workers)
        self._slots: list[_Slot] = []
        pools: list[ProcessPoolExecutor] = []
        try:
            pools = [self._new_pool() for _ in range(workers)]
            identities = [pool.submit(worker_identity) for pool in pools]  # all start at once
            self._slots = [_Slot(pool, identity.result()) for pool, identity in zip(pools, identities, strict=True)]
        except BaseException:
            for pool in pools:
                pool.shutdown(cancel_futures=True)
            raise

    def _new_pool(self) -> ProcessPoolExecutor:
        import multiprocessing

        # spawn, not fork: a fork of a process whose OpenMP threads exist (a kernel that trained) can hang.
        return ProcessPoolExecutor(
            1, mp_context=multiprocessing.get_context("spawn"), initializer=_hold_data, initargs=(self._data,)
        )

    def submit(self, number: int, params: dict[str, Any]) -> None:
        slot = next(slot for slot in self._slots if slot.running is None)
        future = slot.pool.submit(_trial_on_held_data, self._trial_function, params, self._threads)
        slot.running = (number, time.time(), future)

    def next_done(self) -> tuple[int, TrialOutcome]:
        running = {slot.running[2]: slot for slot in self._slots if slot.running is not None}
        done, _ = wait_futures(running, return_when=FIRST_COMPLETED)
        future = next(iter(done))
        slot = running[future]
        assert slot.running is not None
        number, submitted, _ = slot.running
        slot.running = None
        try:
            return number, future.result()
        except BrokenProcessPool:
            died = TrialOutcome(slot.identity, submitted, time.time(), error=f"worker process {slot.identity} died")
            slot.pool.shutdown(cancel_futures=True)
            slot.pool = self._new_pool()
            slot.identity = slot.pool.submit(worker_identity).result()
            return number, died
        except Exception as error:  # noqa: BLE001 - e.g. the result could not be unpickled: that trial failed
            return number, TrialOutcome(slot.identity, submitted, time.time(), error=f"{type(error).__name__}: {error}")

    def close(self) -> None:
        for slot in self._slots:
            # A trial still running (the search was interrupted) is not waited for.
            for process in list(getattr(slot.pool, "_processes", {}).values()):
                process.kill()
            slot.pool.shutdown(wait=True, cancel_futures=True)


class _OnDask:
    """Trials on a Dask cluster: a local one started here, or the scheduler at `address`."""

    def __init__(self, data: SearchData, trial_function: TrialFunction, workers: int, address: str | None) -> None:
        import dask
        from distributed import Client, LocalCluster

        self._cluster: LocalCluster | None = None
        self._address = address
        self._trial_function = trial_function
        self._running: dict[Any, tuple[int, float, Any]] = {}
        if address is None:
            # The scheduler runs in this process and reads this when it starts: a trial whose
            # worker dies is failed at once, not retried on another worker it might kill too.
            with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
                self._cluster = LocalCluster(
                    n_workers=workers,
                    threads_per_worker=max(1, local_cores() // workers),
                    processes=True,
                    resources={DASK_TRIAL_RESOURCE: 1},
                    # Trials are bounded by the data they get; a limit would only let Dask restart a worker mid-trial.
                    memory_limit=0,
                    # A free loopback port: two searches at once must not both want 8787.
                    dashboard_address="127.0.0.1:0",
                )
            self._client = Client(self._cluster, set_as_default=False)
            where = f"a local Dask cluster of {workers} worker processes"
        else:
            self._client = _connect(address)
            where = f"the Dask scheduler at {address}"
        try:
            trial_workers = self._trial_workers()
            self.capacity = len(trial_workers)
            self.description = f"on {where} ({self.capacity} trial workers, one trial each at a time)"
            # Sent to every worker once, not with each trial.
            self._data = self._client.scatter(data, broadcast=True)
        except BaseException:
            self.close()
            raise

    def _trial_workers(self) -> list[str]:
        workers = self._client.scheduler_info(n_workers=-1)["workers"]
        able = [address for address, info in workers.items() if info.get("resources", {}).get(DASK_TRIAL_RESOURCE)]
        if not able:
            raise DaskUnavailableError(
                f"no worker of the Dask scheduler at {self._address} offers the resource '{DASK_TRIAL_RESOURCE}' "
                f"({len(workers)} worker(s)): start each one with `dask worker {self._address} --nthreads N "
                f"--resources {DASK_TRIAL_RESOURCE}=1`, so that it runs one trial at a time on its N threads"
            )
        return able

    def submit(self, number: int, params: dict[str, Any]) -> None:
        future = self._client.submit(
            self._trial_function,
            params,
            self._data,
            None,
            resources={DASK_TRIAL_RESOURCE: 1},
            pure=False,
            key=f"taxi-trial-{number}-{os.urandom(4).hex()}",
        )
        self._running[future.key] = (number, time.time(), future)

    def next_done(self) -> tuple[int, TrialOutcome]:
        from distributed.client import FutureCancelledError, FuturesCancelledError
        from distributed.scheduler import KilledWorker

        # Polled: distributed's wait and as_completed need a default client, and this one is not.
        while not (done := [key for key, (_, _, future) in self._running.items() if future.done()]):
            time.sleep(0.05)
        number, submitted, future = self._running.pop(done[0])
        try:
            return number, future.result()
        except KilledWorker as error:
            worker = f"{error.last_worker.host}:{error.last_worker.pid}"
            return number, TrialOutcome(worker, submitted, time.time(), error=f"Dask worker {worker} died")
        except (FutureCancelledError, FuturesCancelledError) as error:
            raise self._lost(error) from None
        except Exception as error:  # noqa: BLE001 - e.g. the worker could not unpickle the trial: that trial failed
            if self._client.status != "running" or "scheduler-connection-lost" in str(error):
                raise self._lost(error) from None
            return number, TrialOutcome("?", submitted, time.time(), error=f"{type(error).__name__}: {error}")

    def _lost(self, error: BaseException) -> DaskSchedulerLostError:
        where = self._address or "the local Dask cluster's scheduler"
        return DaskSchedulerLostError(
            f"lost the Dask scheduler at {where} in the middle of the search, with {len(self._running) + 1} trial(s) "
            f"running ({type(error).__name__}). The trials that had finished are recorded in MLflow; the others are "
            "recorded FAILED. Start the scheduler and its workers again (or run without Dask) and rerun: the "
            "search starts over."
        )

    def close(self) -> None:
        import logging

        # After a lost scheduler the client logs each reconnection attempt; the error says it once.
        logger = logging.getLogger("distributed.client")
        level = logger.level
        logger.setLevel(logging.CRITICAL)
        try:
            self._client.close(timeout=DASK_CONNECT_TIMEOUT_SECONDS)
        except Exception:  # noqa: BLE001 - closing a client whose scheduler is gone may fail; nothing is left to do
            pass
        finally:
            logger.setLevel(level)
        if self._cluster is not None:
            self._cluster.close(timeout=DASK_CONNECT_TIMEOUT_SECONDS)


def _connect(address: str) -> Any:
    from distributed import Client

    try:
        return Client(address, timeout=DASK_CONNECT_TIMEOUT_SECONDS, set_as_default=False)
    except Exception as error:  # noqa: BLE001 - whatever answered (or did not), it is no usable scheduler
        raise DaskUnavailableError(
            f"cannot use the Dask scheduler at {address}: {type(error).__name__}: {error}"
        ) from None


@contextmanager
def _engine(
    data: SearchData, trial_function: TrialFunction, workers: int, dask: bool, dask_address: str | None
) -> Iterator[_Engine]:
    if dask and dask_address:
        raise ValueError("dask starts a local cluster and dask_address uses an existing one: choose one")
    engine: _Engine
    if dask or dask_address:
        engine = _OnDask(data, trial_function, workers, dask_address)
    elif workers == 1:
        engine = _InThisProcess(data, trial_function)
    else:
        engine = _LocalProcesses(data, trial_function, workers)
    try:
        yield engine
    finally:
        engine.close()


# ---------------------------------------------------------------------------------------------
# The search


@dataclass(frozen=True)
class TrialTracking:
    """Where trials are recorded: child runs of `parent_run_id`."""

    tracking_uri: str
    parent_run_id: str


@dataclass(frozen=True)
class TrialRecord:
    number: int
    params: dict[str, Any]
    state: TrialState
    worker: str
    started: float
    ended: float
    holdout_rmse: float | None = None
    best_iteration: int | None = None
    error: str | None = None
    mlflow_run_id: str | None = None

    @property
    def duration_seconds(self) -> float:
        return self.ended - self.started


@dataclass(frozen=True)
class SearchResult:
    study_name: str
    seed: int
    engine: str
    trials: list[TrialRecord]
    study: optuna.Study = field(repr=False)

    @property
    def finished(self) -> list[TrialRecord]:
        return [trial for trial in self.trials if trial.state == "FINISHED"]

    @property
    def best(self) -> TrialRecord:
        if not self.finished:
            raise TuningError(f"every one of the {len(self.trials)} trials of study {self.study_name} failed")
        return min(self.finished, key=lambda trial: (trial.holdout_rmse, trial.number))

    @property
    def recipe(self) -> TrialRecord:
        """The first trial: the recipe's own values."""
        return self.trials[0]

    def best_params(self) -> dict[str, Any]:
        return dict(self.best.params)

    def table(self) -> pd.DataFrame:
        """One row per trial, in trial order: the report's trials table."""
        return pd.DataFrame(
            [
                {
                    "trial": t.number,
                    "state": t.state,
                    "holdout_rmse": t.holdout_rmse,
                    **t.params,
                    "best_iteration": t.best_iteration,
                    "seconds": round(t.duration_seconds, 2),
                    "worker": t.worker,
                    "error": t.error,
                }
                for t in self.trials
            ]
        )


def parameter_importances(result: SearchResult) -> pd.Series | None:
    """Each searched parameter's share of the hold-out RMSE's variation (Optuna's fANOVA, seeded), largest first.

    None with fewer than two finished trials that differ: nothing to attribute.
    """
    import optuna

    finished = [t for t in result.study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if len({t.value for t in finished}) < 2:
        return None
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=result.seed)
    importances = optuna.importance.get_param_importances(result.study, evaluator=evaluator)
    return pd.Series(importances, name="importance", dtype="float64").sort_values(ascending=False)


def run_search(
    data: SearchData,
    n_trials: int,
    *,
    seed: int = DEFAULT_SEED,
    workers: int | None = None,
    dask: bool = False,
    dask_address: str | None = None,
    study_name: str | None = None,
    trials_tracking: TrialTracking | None = None,
    first_trials: Sequence[dict[str, Any]] = (),
    trial_function: TrialFunction = run_trial,
) -> SearchResult:
    """Run `n_trials` trials, `workers` at a time (default: the cores), the recipe's values first.

    `first_trials` are tried right after the recipe (a previous search's best, or the same trials
    again elsewhere, as bench/tuning.py does). Each trial is told to the study as it ends, and recorded as an MLflow child run when
    `trials_tracking` is given; the parent run gets the best parameters afterwards. A trial
    that fails or whose worker dies is FAILED and the search goes on; a lost Dask scheduler
    raises DaskSchedulerLostError after recording the trials it took with it.
    """
    import optuna

    if n_trials < 1:
        raise ValueError(f"n_trials must be at least 1, got {n_trials}")
    workers = workers or local_cores()
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=study_name or f"taxi-tuning-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}",
        direction="minimize",
        # constant_liar: trials still running count as bad guesses, so parallel asks spread out.
        sampler=optuna.samplers.TPESampler(seed=seed, constant_liar=True),
    )
    for values in (recipe_values(), *first_trials):
        study.enqueue_trial(values)
    records: dict[int, TrialRecord] = {}
    asked: dict[int, optuna.Trial] = {}

    def finish(number: int, outcome: TrialOutcome) -> None:
        trial = asked.pop(number)
        state: TrialState = "FAILED" if outcome.error is not None else "FINISHED"
        if state == "FINISHED":
            study.tell(trial, outcome.holdout_rmse)
        else:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        record = TrialRecord(
            number=number,
            params=dict(trial.params),
            state=state,
            worker=outcome.worker,
            started=outcome.started,
            ended=outcome.ended,
            holdout_rmse=outcome.holdout_rmse,
            best_iteration=outcome.best_iteration,
            error=outcome.error,
        )
        if trials_tracking is not None:
            record = _replace_run_id(record, log_trial(trials_tracking, study.study_name, record))
        records[number] = record

    with _engine(data, trial_function, workers, dask, dask_address) as engine:
        engine_description = engine.description
        try:
            while len(records) < n_trials:
                while len(asked) < engine.capacity and len(records) + len(asked) < n_trials:
                    trial = study.ask()
                    params = suggest(trial)
                    asked[trial.number] = trial
                    engine.submit(trial.number, params)
                finish(*engine.next_done())
        except DaskSchedulerLostError as lost:
            now = time.time()
            for number in list(asked):
                finish(number, TrialOutcome("?", now, now, error=str(lost).split(".")[0]))
            raise
    result = SearchResult(
        study_name=study.study_name,
        seed=seed,
        engine=engine_description,
        trials=[records[number] for number in sorted(records)],
        study=study,
    )
    if trials_tracking is not None:
        log_search(trials_tracking, result)
    return result


def _replace_run_id(record: TrialRecord, run_id: str) -> TrialRecord:
    from dataclasses import replace

    return replace(record, mlflow_run_id=run_id)


# ---------------------------------------------------------------------------------------------
# MLflow: a child run per trial, the best on the parent


def log_trial(where: TrialTracking, study_name: str, record: TrialRecord) -> str:
    """Record one trial as a child run of the parent run (state, params, hold-out RMSE, worker); its id."""
    from mlflow.entities import Metric, Param, RunTag

    client = mlflow_runs.mlflow_client(where.tracking_uri)
    experiment_id = client.get_run(where.parent_run_id).info.experiment_id
    tags = {
        "mlflow.parentRunId": where.parent_run_id,
        "taxi.trial_worker": record.worker,
        "taxi.trial_number": str(record.number),
        "taxi.tune_study": study_name,
    }
    if record.error:
        tags["taxi.trial_error"] = record.error[:5000]
    run = client.create_run(
        experiment_id, start_time=int(record.started * 1000), tags=tags, run_name=f"trial-{record.number:03d}"
    )
    now = int(record.ended * 1000)
    metrics = {"duration_seconds": record.duration_seconds}
    if record.holdout_rmse is not None:
        metrics["holdout_rmse"] = record.holdout_rmse
    if record.best_iteration is not None:
        metrics["best_iteration"] = float(record.best_iteration)
    client.log_batch(
        run.info.run_id,
        metrics=[Metric(key, float(value), now, 0) for key, value in metrics.items()],
        params=[Param(key, str(value)) for key, value in record.params.items()],
        tags=[RunTag(key, value) for key, value in tags.items() if key == "taxi.trial_worker"],
    )
    client.set_terminated(run.info.run_id, status=record.state, end_time=now)
    return str(run.info.run_id)


def log_search(where: TrialTracking, result: SearchResult) -> None:
    """The parent run's record of the search: study, number of trials, the best parameters and scores."""
    params, metrics = search_record(result)
    mlflow_runs.log_params(where.tracking_uri, where.parent_run_id, params)
    mlflow_runs.log_metrics(where.tracking_uri, where.parent_run_id, metrics)


def search_record(result: SearchResult) -> tuple[dict[str, Any], dict[str, float]]:
    """The params and metrics `log_search` logs on the parent run (a run reusing the search logs them too)."""
    params: dict[str, Any] = {
        "tune.study": result.study_name,
        "tune.trials": len(result.trials),
        "tune.seed": result.seed,
    }
    metrics = {"tune.failed_trials": float(len(result.trials) - len(result.finished))}
    if result.finished:
        params.update({f"tune.best.{name}": value for name, value in result.best_params().items()})
        metrics["tune.best_holdout_rmse"] = float(result.best.holdout_rmse or math.nan)
    if result.recipe.holdout_rmse is not None:
        metrics["tune.recipe_holdout_rmse"] = result.recipe.holdout_rmse
    return params, metrics
