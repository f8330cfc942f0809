"""taxi_duration.runner.fast_start: the collector pause, the skipped final collection and the TAXI_FAST_START switch."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap

import pytest

from taxi_duration.runner import fast_start
from taxi_duration.runner.fast_start import imports_without_gc


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
        from taxi_duration.runner.fast_start import exit_without_final_collection

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
    assert _garbage_cycle_finalized_at_exit(freeze_before_exit=True, switch=value)


def test_the_speed_ups_are_on_unless_switched_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(fast_start.SWITCH, raising=False)
    assert fast_start.enabled()
    with imports_without_gc():
        assert not gc.isenabled()
