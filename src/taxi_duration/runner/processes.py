"""Stopping a runner's child process and reaping what is left of its kernel."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

from taxi_duration.runner.records import read_json

log = logging.getLogger("taxi_duration.runner")

STOP_GRACE_SECONDS = 20
REAP_WAIT_SECONDS = 5


class RunnersStopping(RuntimeError):
    """No runner may start: this process is being stopped (SIGTERM or Ctrl-C)."""


# The runner children alive in this process, each with its kernel's record, so that a stop can
# reach them all at once from any thread, whatever the threads that wait on them are doing.
_live: dict[int, tuple[subprocess.Popen, Path]] = {}
_live_lock = threading.Lock()
_stopping = False  # set without the lock: a signal handler may set it while its thread holds the lock


def start_runner_process(command: list[str], log_path: Path, kernel_record: Path) -> subprocess.Popen:
    """Start a runner child in a session of its own and register it; RunnersStopping once stopping."""
    with _live_lock:
        if _stopping:
            raise RunnersStopping("this process is being stopped: no notebook starts now")
        # The child's output goes to a file, not a pipe: a kernel (or a process it started)
        # inherits the child's stdout/stderr, and reading a pipe until EOF would then wait
        # for those processes as well as for the child.
        with open(log_path, "wb") as runner_log:
            child = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=runner_log, stderr=subprocess.STDOUT, start_new_session=True
            )
        _live[child.pid] = (child, kernel_record)
    return child


def forget_runner_process(child: subprocess.Popen) -> None:
    """The child is stopped and reaped: a stop no longer needs to reach it."""
    with _live_lock:
        _live.pop(child.pid, None)


def stopping() -> bool:
    """Whether this process is being stopped: its runners are being killed and no new one starts."""
    return _stopping


def refuse_new_runners() -> None:
    """From now on no runner starts in this process. Safe in a signal handler (no lock, no I/O)."""
    global _stopping
    _stopping = True


def stop_all_runners(grace_seconds: float) -> list[int]:
    """Stop every registered runner and its kernel now; the pids of the runners it found.

    SIGTERM to each runner's process group (the runner then shuts its kernel down), SIGKILL
    to what is left after `grace_seconds`, and the kernels' groups killed. Runs in its own
    thread, never inside a signal handler (it takes the registry's lock).
    """
    refuse_new_runners()
    with _live_lock:
        found = list(_live.values())
    for child, _ in found:
        _signal_group(child, signal.SIGTERM)
    deadline = time.monotonic() + grace_seconds
    while time.monotonic() < deadline and any(_running(child) for child, _ in found):
        time.sleep(0.1)
    for child, kernel_record in found:
        # The kernel first: whoever waits on the runner may go on (and the process end) once it dies.
        try:
            reap_kernel(kernel_record)
        except Exception as problem:  # noqa: BLE001 - the runner's own close reaps it too
            log.warning("could not reap the kernel of runner %d: %r", child.pid, problem)
        if _running(child):
            _signal_group(child, signal.SIGKILL)
    return [child.pid for child, _ in found]


def _running(child: subprocess.Popen) -> bool:
    """Whether the child still runs: not reaped by its waiting thread, and not a zombie."""
    import psutil

    if child.returncode is not None:
        return False
    try:
        return psutil.Process(child.pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _signal_group(child: subprocess.Popen, signum: int) -> None:
    # Only while the child is unreaped: until then its pid, and so its group id, cannot be reused.
    if child.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.pid, signum)


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
            if (
                os.getpgid(process.pid) == kernel["pid"]
                and process.create_time() >= kernel["create_time"]
                and process.status() != psutil.STATUS_ZOMBIE
            ):
                survivors.append(process)
        except (OSError, psutil.Error):
            continue  # gone meanwhile, or not ours to look at
    for process in survivors:
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(survivors, timeout=REAP_WAIT_SECONDS)
    if survivors:
        log.warning(
            "killed %d process(es) left by notebook kernel %d: %s",
            len(survivors),
            kernel["pid"],
            ", ".join(str(process.pid) for process in survivors),
        )
    return [process.pid for process in survivors]


def create_time(pid: int) -> float:
    """When process `pid` started, as psutil counts it (to tell it from a later one with its pid)."""
    import psutil

    return psutil.Process(pid).create_time()
