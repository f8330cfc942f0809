"""Stopping a runner's child process and reaping what is left of its kernel."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
from pathlib import Path

from taxi_duration.runner.records import read_json

log = logging.getLogger("taxi_duration.runner")

STOP_GRACE_SECONDS = 20
REAP_WAIT_SECONDS = 5


def stop_child(child: subprocess.Popen) -> None:
    """Ask the child to stop (nbclient then shuts its kernel down), then kill its process group."""
    try:
        os.killpg(child.pid, signal.SIGTERM)
        child.wait(timeout=STOP_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    except ProcessLookupError:
        child.wait()


def reap_kernel(record: Path) -> list[int]:
    """Kill what is left of the kernel's process group; the pids killed (normally none).

    jupyter_client starts the kernel as the leader of a new session, so its process group
    holds the kernel and the processes it started. Only members started no earlier than the
    kernel are killed, so a recycled pid cannot make us kill an unrelated process.
    """
    kernel = read_json(record)
    if not kernel:
        return []  # the kernel never started
    import psutil  # an ipykernel dependency, so present wherever notebooks run

    survivors = []
    for process in psutil.process_iter():
        try:
            if (os.getpgid(process.pid) == kernel["pid"] and process.create_time() >= kernel["create_time"]
                    and process.status() != psutil.STATUS_ZOMBIE):
                survivors.append(process)
        except (OSError, psutil.Error):
            continue  # gone meanwhile, or not ours to look at
    for process in survivors:
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(survivors, timeout=REAP_WAIT_SECONDS)
    if survivors:
        log.warning("killed %d process(es) left by notebook kernel %d: %s", len(survivors), kernel["pid"],
                    ", ".join(str(process.pid) for process in survivors))
    return [process.pid for process in survivors]


def create_time(pid: int) -> float:
    """When process `pid` started, as psutil counts it (to tell it from a later one with its pid)."""
    import psutil

    return psutil.Process(pid).create_time()

