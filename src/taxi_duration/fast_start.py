"""Every speed-up that leans on the internals of CPython or a dependency, in one place.

`TAXI_FAST_START=0` switches them all off, so a problem can be tried without them; the suite
passes either way. Measured on the flow process (2 cores) when each was added:

* The cyclic garbage collector is paused during the big imports (Prefect, MLflow, pandas:
  about a million objects that live as long as the process) and what they made is frozen
  (`gc.freeze`: moved to a generation it never scans). The imports took 2.0 s instead of
  1.4 s with the collector on, and the interpreter's exit 0.7 s instead of 0.07 s, because
  it scans everything once more. Garbage made afterwards is still collected as usual.
* A notebook kernel counts as ready without jupyter_client's 0.2 s wait for a quiet IOPub
  channel (twice per notebook). That calls two private methods of jupyter_client's client;
  tests/unit/test_fast_start.py fails when an upgrade renames them.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

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


def kernel_client_class(base: type) -> type:
    """jupyter_client's AsyncKernelClient (`base`), or a subclass that is ready sooner."""
    if not enabled():
        return base
    return type("PromptKernelClient", (base,), {"wait_for_ready": _wait_for_ready})


async def _wait_for_ready(client: Any, timeout: float | None = None) -> None:
    """jupyter_client's KernelClient.wait_for_ready, without its 0.2 s wait for a quiet IOPub.

    Ready means, as there: the kernel answered kernel_info on the shell channel, and a message
    arrived on IOPub (so the subscription is live and no output of the first cell is lost).
    jupyter_client then also drains IOPub until it has been quiet for 0.2 s. That only
    discards the status messages of the kernel_info request, which nbclient ignores anyway
    (it keeps only messages whose parent is the cell's request), and it cost 0.2 s twice per
    notebook: once for the runner's liveness check and once for nbclient's own.
    The error messages are jupyter_client's (the runner classifies by them).
    """
    import queue

    deadline = time.monotonic() + (float("inf") if timeout is None else timeout)
    while True:
        client.kernel_info()
        try:
            reply = await client.get_shell_msg(timeout=1)
        except queue.Empty:
            reply = None
        if reply is not None and reply["msg_type"] == "kernel_info_reply":
            try:
                await client.get_iopub_msg(timeout=0.2)
            except queue.Empty:
                pass  # IOPub not connected yet: ask again
            else:
                client._handle_kernel_info_reply(reply)
                return
        if not await client._async_is_alive():
            raise RuntimeError("Kernel died before replying to kernel_info")
        if time.monotonic() > deadline:
            raise RuntimeError(f"Kernel didn't respond in {timeout:g} seconds")
