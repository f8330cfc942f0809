"""Stopping a command on SIGTERM or Ctrl-C, whatever its main thread is doing when the signal comes.

Python runs a signal handler in the main thread between two bytecodes, wherever that thread
is: inside a weakref callback or a finalizer too (SQLAlchemy's registry has them), where the
exception the handler raises is printed as ignored and the thread carries on. During a flow
run the handler is Prefect's, which does nothing but raise. So the stop does not rely on an
exception reaching the flow:

* `install` gives the signal module a wakeup socket: the interpreter's C-level handler writes
  the signal's number to it before any Python handler runs, whichever handler that is. A
  watcher thread reads it, kills every notebook runner of the process and its kernel at once
  (taxi_duration.runner.processes), and refuses new ones. A notebook whose runner dies this
  way raises NotebookStopped, so the flow ends the run KILLED with its notebooks archived,
  whether or not its own exception arrived.
* The watcher then gives the process until STOP_DEADLINE_SECONDS after the signal to end.
  If it has not, it prints where each thread is, the last-resort callbacks (`at_last_resort`)
  mark what is still RUNNING KILLED, and the process exits with 128 + the signal's number. Should even that be held
  back (a C call that keeps the interpreter's lock), an alarm the watcher set as it woke has
  the kernel end the process at HARD_EXIT_SECONDS (SIGALRM's default action needs no Python).

Our own SIGTERM handler (installed here; Prefect's replaces it while a flow runs and hands the
signal back to it at the end) raises SystemExit(128 + signum), so the usual way out is still
an unwinding exception; Ctrl-C keeps Python's KeyboardInterrupt.
"""

from __future__ import annotations

import atexit
import contextlib
import faulthandler
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from types import FrameType

from taxi_duration.runner import processes

log = logging.getLogger("taxi_duration.orchestration")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
RUNNER_GRACE_SECONDS = 5  # for a runner to shut its kernel down after SIGTERM, before SIGKILL
STOP_DEADLINE_SECONDS = 20  # after the signal, the normal way out has had its chance
LAST_RESORT_SECONDS = 5  # then the last-resort callbacks have this long before the process exits
HARD_EXIT_SECONDS = 28  # whatever happens, the process is gone this long after the signal

_signum: int | None = None
_runners_stopped = threading.Event()
_last_resort: list[Callable[[], None]] = []
_wakeup: socket.socket | None = None  # the write end, kept open for the process's life


def install() -> None:
    """Stop this process cleanly and surely on SIGTERM or Ctrl-C. Call first thing, from the main thread."""
    global _wakeup
    if _wakeup is not None or threading.current_thread() is not threading.main_thread():
        return
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    _wakeup = writer
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    threading.Thread(target=_watch, args=(reader,), name="stop-watcher", daemon=True).start()
    atexit.register(_let_the_runners_stop)


def _let_the_runners_stop() -> None:
    # The watcher is a daemon thread: a process ending in the middle of a stop would leave the
    # runners it has not killed yet to notice their parent's death on their own.
    if _signum is not None:
        _runners_stopped.wait(RUNNER_GRACE_SECONDS + processes.REAP_WAIT_SECONDS + 1)


def requested() -> int | None:
    """The number of the signal that asked this process to stop, or None."""
    return _signum


def stopped_by(error: BaseException | None) -> bool:
    """Whether `error` ended a run because the process is being stopped (so the run is KILLED, not FAILED)."""
    from taxi_duration.runner import NotebookStopped

    return (
        _signum is not None
        or processes.stopping()
        or isinstance(error, NotebookStopped)
        or (error is not None and not isinstance(error, Exception))
    )


def signal_name() -> str:
    """The stop signal's name (SIGTERM, SIGINT): for the line a stopped command prints."""
    return signal.Signals(_signum or signal.SIGTERM).name


def exit_code() -> int:
    """What a stopped command exits with: 128 + the signal's number, as a shell reports it."""
    return 128 + (_signum or signal.SIGTERM)


@contextlib.contextmanager
def at_last_resort(callback: Callable[[], None]) -> Iterator[None]:
    """While in this block, `callback` runs if a stop has not ended the process in time (best effort)."""
    _last_resort.append(callback)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            _last_resort.remove(callback)


def _note(signum: int) -> None:
    """Remember the first stop signal. No lock and no blocking call: a signal handler calls it."""
    global _signum
    if _signum is None:
        _signum = signum
    processes.refuse_new_runners()


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    # Python's default would end the process on the spot, skipping atexit and the run's
    # records; a SystemExit unwinds. The interpreter has woken the watcher already, unless
    # a library took the wakeup socket's place: then this wakes it.
    _note(signum)
    if _wakeup is not None:
        with contextlib.suppress(OSError):
            _wakeup.send(bytes([signum]))
    raise SystemExit(128 + signum)


def _watch(reader: socket.socket) -> None:
    """Wait for a stop signal's byte on the wakeup socket, then stop the process (see module docstring)."""
    while True:
        received = reader.recv(64)
        if not received:
            return  # the write end is closed: no signal can come this way any more
        stops = [number for number in received if number in STOP_SIGNALS]
        if stops:
            break
    signalled = time.monotonic()
    signal.alarm(HARD_EXIT_SECONDS)  # nothing in these processes handles SIGALRM: it ends them
    _note(stops[0])
    try:
        stopped = processes.stop_all_runners(RUNNER_GRACE_SECONDS)
        if stopped:
            log.info("stopped %d notebook runner(s) on %s", len(stopped), signal.Signals(stops[0]).name)
    except Exception as problem:  # noqa: BLE001 - the deadline below still holds
        log.warning("could not stop every notebook runner: %r", problem)
    _runners_stopped.set()
    time.sleep(max(signalled + STOP_DEADLINE_SECONDS - time.monotonic(), 0))
    # Still here: the normal way out is stuck. The last resort runs in a thread of its own, so
    # that nothing it waits on (a server, a lock on stderr) can hold the exit back.
    last_words = threading.Thread(target=_run_last_resort, args=(stops[0],), name="stop-last-resort", daemon=True)
    last_words.start()
    last_words.join(LAST_RESORT_SECONDS)
    os._exit(exit_code())


def _run_last_resort(signum: int) -> None:
    print(
        f"warning: still running {STOP_DEADLINE_SECONDS} s after {signal.Signals(signum).name}; "
        "marking the run KILLED and exiting. Where each thread was:",
        file=sys.stderr,
        flush=True,
    )
    faulthandler.dump_traceback(all_threads=True)  # to stderr: what held the normal way out back
    for callback in list(_last_resort):
        try:
            callback()
        except Exception as problem:  # noqa: BLE001 - best effort, on the way out
            print(f"warning: {problem!r}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
