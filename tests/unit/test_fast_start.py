"""taxi_duration.fast_start: the collector pause, the skipped final collection, the quick kernel
readiness, the TAXI_FAST_START switch, and the private jupyter_client API the readiness relies on."""

from __future__ import annotations

import gc
import inspect
import os
import subprocess
import sys
import textwrap

import pytest
from jupyter_client.asynchronous import AsyncKernelClient

from taxi_duration import fast_start
from taxi_duration.fast_start import imports_without_gc


@pytest.fixture(autouse=True)
def speed_ups_on(monkeypatch):
    """Each test says whether it wants the switch off; the default is on, whatever `make test` ran with."""
    monkeypatch.setenv(fast_start.SWITCH, "1")


def test_the_collector_is_paused_inside_and_what_was_made_is_frozen_after():
    frozen_before = gc.get_freeze_count()
    with imports_without_gc():
        assert not gc.isenabled()
        kept = [[index] for index in range(1000)]  # tracked containers, as imports create
    assert gc.isenabled()
    assert gc.get_freeze_count() >= frozen_before + len(kept)


def test_a_collector_the_caller_had_disabled_stays_disabled():
    gc.disable()
    try:
        with imports_without_gc():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def _garbage_cycle_finalized_at_exit(freeze_before_exit: bool, switch: str = "1") -> bool:
    """Whether a garbage reference cycle's finalizer ran when the interpreter shut down."""
    script = textwrap.dedent(f"""
        import gc, sys
        from taxi_duration.fast_start import exit_without_final_collection

        class Node:
            def __del__(self):
                sys.stdout.write("finalized\\n")

        gc.disable()  # keep the cycle until exit
        node = Node()
        node.self = node
        del node
        gc.enable()
        if {freeze_before_exit}:
            exit_without_final_collection()
    """)
    completed = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env={**os.environ, fast_start.SWITCH: switch},
    )
    return "finalized" in completed.stdout


def test_the_final_collection_is_skipped_after_exit_without_final_collection():
    assert _garbage_cycle_finalized_at_exit(freeze_before_exit=False)  # the control: CPython collects at exit
    assert not _garbage_cycle_finalized_at_exit(freeze_before_exit=True)


@pytest.mark.parametrize("value", ["0", "false", "off", " No "])
def test_the_switch_turns_every_speed_up_off(value, monkeypatch):
    monkeypatch.setenv(fast_start.SWITCH, value)
    assert not fast_start.enabled()
    frozen_before = gc.get_freeze_count()
    with imports_without_gc():
        assert gc.isenabled()
        kept = [[index] for index in range(1000)]
    # Nothing was frozen (the count only drops when frozen objects elsewhere are freed meanwhile).
    assert gc.get_freeze_count() <= frozen_before and kept
    assert fast_start.kernel_client_class(AsyncKernelClient) is AsyncKernelClient
    assert _garbage_cycle_finalized_at_exit(freeze_before_exit=True, switch=value)


def test_the_speed_ups_are_on_unless_switched_off(monkeypatch):
    monkeypatch.delenv(fast_start.SWITCH, raising=False)
    assert fast_start.enabled()
    monkeypatch.setenv(fast_start.SWITCH, "1")
    client_class = fast_start.kernel_client_class(AsyncKernelClient)
    assert issubclass(client_class, AsyncKernelClient) and client_class is not AsyncKernelClient


def test_the_private_jupyter_client_api_the_quick_readiness_calls_is_still_there():
    # fast_start._wait_for_ready calls these; an upgrade that renames or reshapes them must fail
    # here, not as a hang in a notebook run (TAXI_FAST_START=0 is the way around until fixed).
    handler = getattr(AsyncKernelClient, "_handle_kernel_info_reply", None)
    assert callable(handler), "jupyter_client no longer has KernelClient._handle_kernel_info_reply"
    assert list(inspect.signature(handler).parameters) == ["self", "msg"]
    is_alive = getattr(AsyncKernelClient, "_async_is_alive", None)
    assert is_alive is not None and inspect.iscoroutinefunction(is_alive), "KernelClient._async_is_alive is gone"


def test_a_real_kernel_is_ready_through_the_quick_client_and_runs_code():
    from jupyter_client.manager import AsyncKernelManager
    from jupyter_core.utils import run_sync

    async def ready_and_run() -> str:
        manager = AsyncKernelManager(kernel_name="python3")
        manager.client_class = "jupyter_client.asynchronous.AsyncKernelClient"
        await manager.start_kernel()
        # With the manager as parent, as nbclient makes its clients: "alive" then means the kernel
        # process runs. A parentless client goes by heartbeats, and a busy machine can miss the
        # first one, which reads as a dead kernel.
        client = fast_start.kernel_client_class(AsyncKernelClient)(
            connection_file=manager.connection_file, parent=manager
        )
        client.load_connection_file()
        client.start_channels()
        try:
            await client.wait_for_ready(timeout=60)
            reply = await client.execute_interactive("print(6 * 7)", timeout=60, output_hook=outputs.append)
            return reply["content"]["status"]
        finally:
            client.stop_channels()
            await manager.shutdown_kernel(now=True)

    outputs: list[dict] = []
    assert run_sync(ready_and_run)() == "ok"
    assert any(message["content"].get("text") == "42\n" for message in outputs if message["msg_type"] == "stream")
