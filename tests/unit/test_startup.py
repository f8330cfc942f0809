"""The collector pause around imports and the skipped final collection (taxi_duration.startup)."""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap

from taxi_duration.startup import imports_without_gc


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


def _garbage_cycle_finalized_at_exit(freeze_before_exit: bool) -> bool:
    """Whether a garbage reference cycle's finalizer ran when the interpreter shut down."""
    script = textwrap.dedent(f"""
        import gc, sys
        from taxi_duration.startup import exit_without_final_collection

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
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    return "finalized" in completed.stdout


def test_the_final_collection_is_skipped_after_exit_without_final_collection():
    assert _garbage_cycle_finalized_at_exit(freeze_before_exit=False)  # the control: CPython collects at exit
    assert not _garbage_cycle_finalized_at_exit(freeze_before_exit=True)
