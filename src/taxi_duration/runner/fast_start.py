"""Every speed-up that leans on the internals of CPython or a dependency, in one place.

`TAXI_FAST_START=0` switches them all off, so a problem can be tried without them; the suite
passes either way. `make bench` times a cold run with them and without (docs/performance.md);
one that saves less than 3 % of a cold run is removed (the quick kernel readiness was, in
December 2026). One is left:

* The cyclic garbage collector is paused during the big imports (Prefect, MLflow, pandas:
  about a million objects that live as long as the process) and what they made is frozen
  (`gc.freeze`: moved to a generation it never scans). In the flow process, on 2 cores, the
  imports took 2.0 s instead of 1.4 s with the collector on, and the interpreter's exit 0.7 s
  instead of 0.07 s, because it scans everything once more. Garbage made afterwards is still
  collected as usual.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from contextlib import contextmanager

SWITCH = "TAXI_FAST_START"


def enabled() -> bool:
    """False when TAXI_FAST_START is 0 (or false/no/off); on otherwise."""
    return os.environ.get(SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


@contextmanager
def imports_without_gc() -> Iterator[None]:
    """Pause the collector for a block of imports, then freeze what they created."""
    if not enabled():
        yield
        return
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if was_enabled:
            gc.enable()


def exit_without_final_collection() -> None:
    """Call last thing before a script's process exits: its final full scan is skipped.

    Everything still alive is frozen, so the interpreter's shutdown collection has nothing to
    scan; the operating system takes the memory back. Atexit handlers still run. Not for a
    process that goes on working (a test calling `main()`): frozen garbage is never freed.
    """
    if enabled():
        gc.freeze()
