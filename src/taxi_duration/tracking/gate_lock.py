"""The champion gate's lock: one gate at a time per registered model, across processes and machines.

Registering a version, re-scoring the champion and moving the alias is a read-decide-write on
shared state. Two gates interleaving can both read the same champion and both move the alias,
the later one possibly to the worse model (a backfill with --max-parallel 2, or two machines).
So the whole sequence runs under one lock:

- with a Prefect server (PREFECT_API_URL set, as for every run that reports to one: the local
  server, `make services`, a team's server), a Prefect global concurrency limit with one slot,
  named after the registered model. Every process and machine sharing the server shares it;
  it shows (and can be inspected) in the UI's Concurrency page and `prefect gcl inspect`.
- without one (Prefect's ephemeral server, a notebook run by hand), a file lock on this
  machine, named after the tracking store and the registered model.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

LIMIT_PREFIX = "taxi-champion-gate-"
# Longer than any gate takes (loading and re-scoring one model: seconds), short enough that a
# stuck holder is reported rather than waited on forever.
WAIT_SECONDS = 600


class GateLockError(RuntimeError):
    """The gate's lock could not be taken; nothing was registered."""


def limit_name(registered_model: str) -> str:
    """The global concurrency limit of `registered_model`'s gate (Prefect allows no / % & > < in names)."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "-", registered_model)
    if safe != registered_model:  # two names that differ only in such characters stay apart
        safe += "-" + hashlib.sha256(registered_model.encode()).hexdigest()[:8]
    return LIMIT_PREFIX + safe


def lock_file(tracking_uri: str, registered_model: str) -> Path:
    """The file lock of one tracking store's registered model, in this machine's temporary folder."""
    key = hashlib.sha256(f"{tracking_uri}\n{registered_model}".encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"{LIMIT_PREFIX}{key}.lock"


@contextlib.contextmanager
def champion_gate(tracking_uri: str, registered_model: str) -> Iterator[str]:
    """Hold the gate's lock for `registered_model` in this block; yields what the lock is, for messages."""
    prefect_api = os.environ.get("PREFECT_API_URL")
    if prefect_api:
        with _global_concurrency_slot(prefect_api, limit_name(registered_model)) as held:
            yield held
    else:
        with _file_lock(lock_file(tracking_uri, registered_model)) as held:
            yield held


@contextlib.contextmanager
def _global_concurrency_slot(prefect_api: str, name: str) -> Iterator[str]:
    from prefect.concurrency.sync import concurrency

    _ensure_one_slot_limit(prefect_api, name)
    held = f"Prefect global concurrency limit {name!r} at {prefect_api}"
    # strict: a limit deleted meanwhile is an error, not a pass without a lock. A lease renewal
    # that fails mid-gate does not interrupt it (a gate takes seconds; the lease, 300 s).
    slot = concurrency(name, occupy=1, timeout_seconds=WAIT_SECONDS, strict=True, raise_on_lease_renewal_failure=False)
    try:
        slot.__enter__()
    except TimeoutError as error:
        raise GateLockError(
            f"waited {WAIT_SECONDS} s for the {held}: another gate holds it "
            f"(`prefect gcl inspect {name}` shows its active slots)"
        ) from error
    try:
        yield held
    finally:
        try:
            slot.__exit__(None, None, None)
        except Exception as error:  # noqa: BLE001 - the server went away after the gate decided
            # The decision is made and written: failing now would fail a run whose champion has
            # already moved. The slot's lease runs out on the server by itself.
            logger.warning(
                "could not release the %s (%s); its lease expires on the server within 300 s",
                held,
                str(error) or type(error).__name__,
            )


def _ensure_one_slot_limit(prefect_api: str, name: str) -> None:
    """Create the limit with one slot if it does not exist; refuse one that would not exclude."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            limit = client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            with contextlib.suppress(ObjectAlreadyExists):  # another gate created it first
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
            limit = client.read_global_concurrency_limit_by_name(name)
    if limit.limit != 1 or not limit.active:
        raise GateLockError(
            f"the Prefect global concurrency limit {name!r} at {prefect_api} has {limit.limit} slot(s) and is "
            f"{'active' if limit.active else 'inactive'}: the champion gate needs it active with one slot "
            f"(`prefect gcl update {name} --limit 1 --enable`)"
        )


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[str]:
    held = f"file lock {path}"
    with open(path, "a+b") as handle:
        deadline = time.monotonic() + WAIT_SECONDS
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise GateLockError(f"waited {WAIT_SECONDS} s for the {held}: another gate holds it") from None
                time.sleep(0.05)
        try:
            yield held
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
