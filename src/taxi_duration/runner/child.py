"""The child's side of a notebook run: `python -m taxi_duration.runner.child NOTEBOOK ...`.

Starts the kernel and warms it up, waits for the parent's go, runs the notebook with
papermill, writes how it ended. See taxi_duration.runner for what counts as a failure.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from taxi_duration.runner import fast_start
from taxi_duration.runner.parameters import read_union_annotations
from taxi_duration.runner.preload import preload_code
from taxi_duration.runner.processes import STOP_GRACE_SECONDS, create_time, reap_kernel
from taxi_duration.runner.records import CURRENT_CELL, GO, KERNEL_RECORD, OUTCOME, PROGRESS, read_json, write_json

log = logging.getLogger("taxi_duration.runner")

# Make `!cmd`, `x = !cmd` and %sx fail the cell on a non-zero exit, as %%bash already does.
KERNEL_ARGUMENTS = ["--InteractiveShell.system_raise_on_error=True"]


def main(argv: list[str] | None = None) -> int:
    """Execute one notebook (the child side of PreparedRunner); write how it ended to --records.

    Starts the kernel and warms it up, waits for the parent's go (the executed notebook's
    path and the parameters, in --records), runs the notebook with papermill, shuts the
    kernel down.
    """
    parser = argparse.ArgumentParser(description="Execute one notebook with papermill (used by the pipeline).")
    parser.add_argument("notebook")
    parser.add_argument("--cwd")
    parser.add_argument("--records", required=True, help="folder for the go, the kernel's pid and the outcome")
    parser.add_argument("--parent-pid", type=int, help="stop, as on a timeout, when this process is gone")
    parser.add_argument("--preload", default="", help="comma-separated modules the kernel imports while it waits")
    args = parser.parse_args(argv)
    records = Path(args.records)

    # SIGTERM (a timeout, or the flow being stopped) becomes SystemExit so the clean-up below
    # and papermill's shut the kernel down instead of leaving it orphaned. While cells run,
    # nbclient's own SIGTERM handler does the same.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if args.parent_pid:
        threading.Thread(target=_stop_when_orphaned, args=(args.parent_pid, records), daemon=True).start()

    with fast_start.imports_without_gc():
        from jupyter_client.manager import AsyncKernelManager
        from jupyter_core.utils import run_sync

    class RecordingKernelManager(AsyncKernelManager):
        """Notes the kernel's pid as soon as it exists, for the parent to reap if need be."""

        # jupyter_client types the async manager's start_kernel as its sync parent's; it is a coroutine.
        async def start_kernel(self, **kwargs: Any) -> None:  # type: ignore[override]
            await super().start_kernel(**kwargs)
            pid = getattr(self.provisioner, "pid", None)
            if pid is not None:
                write_json(records / KERNEL_RECORD, {"pid": pid, "create_time": create_time(pid)})

    progress: dict[str, Any] = {"total": None, "running": None, "finished": []}

    def note_running_cell(cell: Any, cell_index: int) -> None:
        """Record which cell runs, for the parent to name if the kernel dies or time runs out,
        and to show while it runs."""
        write_json(records / CURRENT_CELL, {"index": cell_index})
        first_line = next((line.strip() for line in cell.source.splitlines() if line.strip()), "")
        progress["running"] = {
            "index": cell_index,
            "position": len(progress["finished"]) + 1,
            "first_line": first_line[:120],
            "started": time.time(),
        }
        write_json(records / PROGRESS, progress)

    def note_finished_cell(cell: Any, cell_index: int, **_: Any) -> None:
        running = progress["running"] or {
            "index": cell_index,
            "position": len(progress["finished"]) + 1,
            "first_line": "",
            "started": time.time(),
        }
        progress["finished"].append({**running, "seconds": round(time.time() - running["started"], 3)})
        progress["running"] = None
        write_json(records / PROGRESS, progress)

    def prepare_failed(kernel: Any, error: BaseException) -> None:
        # Not fatal: papermill starts a kernel of its own, and reports if that fails too.
        log.warning("could not prepare a kernel ahead (%r); papermill starts one", error)
        _discard_kernel(kernel)

    # The kernel is launched before papermill is imported, so it boots meanwhile.
    kernel: Any = RecordingKernelManager(kernel_name="python3")
    try:
        run_sync(kernel.start_kernel)(extra_arguments=list(KERNEL_ARGUMENTS), cwd=args.cwd)
    except Exception as error:  # noqa: BLE001 - any failure: papermill starts a kernel of its own
        prepare_failed(kernel, error)
        kernel = None
    try:
        with fast_start.imports_without_gc():
            import papermill
            from nbclient.exceptions import DeadKernelError
            from papermill.exceptions import PapermillExecutionError

            read_union_annotations()  # `name: str | None = None` is a parameter, not an unknown one
        _write_notebooks_whole()
    except BaseException:
        _discard_kernel(kernel)
        raise

    try:
        if kernel is not None:
            try:
                run_sync(_warm_up)(kernel, preload_code(Path(args.notebook), [m for m in args.preload.split(",") if m]))
            except Exception as error:  # noqa: BLE001 - any failure: papermill starts a kernel of its own
                prepare_failed(kernel, error)
                kernel = None
        go = _wait_for_go(records)
        progress["total"] = executable_cells(Path(args.notebook), bool(go["parameters"]))
        write_json(records / PROGRESS, progress)
        if kernel is not None and not run_sync(_answers)(kernel):
            _discard_kernel(kernel)  # died while waiting: papermill starts a fresh one
            kernel = None
        papermill.execute_notebook(
            args.notebook,
            go["executed_notebook"],
            parameters=go["parameters"],
            cwd=args.cwd,
            kernel_name="python3",
            progress_bar=False,
            log_output=False,
            request_save_on_cell_execute=True,
            km=kernel,
            kernel_manager_class=RecordingKernelManager,
            on_cell_start=note_running_cell,
            on_cell_executed=note_finished_cell,
            extra_arguments=list(KERNEL_ARGUMENTS),
            # Every result is on disk once the last cell has run; a graceful shutdown would
            # only wait for the kernel's exit handlers (docs/performance.md).
            shutdown_kernel="immediate",
        )
        outcome: dict[str, Any] = {"kind": "completed"}
    except PapermillExecutionError as error:
        outcome = {"kind": "cell_error", "cell": error.exec_count or None, "ename": error.ename, "evalue": error.evalue}
    except DeadKernelError as error:
        outcome = {"kind": "kernel_died", "detail": str(error)}
    except RuntimeError as error:
        # jupyter_client's words for a kernel that died before it could take the first cell
        # (killed, or out of memory while starting): a death like any other, retried as such.
        kind = "kernel_died" if "Kernel died before replying" in str(error) else "runner_error"
        outcome = {"kind": kind, "detail": f"{type(error).__name__}: {error}"}
    except Exception as error:  # noqa: BLE001 - the kernel would not start, the notebook would not load...: told to the parent
        outcome = {"kind": "runner_error", "detail": f"{type(error).__name__}: {error}"}
    finally:
        # papermill shuts down only kernels it started itself.
        _discard_kernel(kernel)
    write_json(records / OUTCOME, outcome)
    if outcome["kind"] != "completed":
        print(f"notebook {Path(args.notebook).name}: {outcome}", file=sys.stderr)
        return 1
    return 0


def _write_notebooks_whole() -> None:
    """Have papermill replace a notebook it saves whole, never rewrite it in place.

    This child is stopped with SIGTERM (a timeout, the pipeline stopped), which can land while
    papermill saves the executed copy after a cell; written in place, the copy was then left
    empty, and the notebook as far as it got was lost. The handler takes absolute paths (the
    executed notebook's always is), ahead of papermill's own local one.
    """
    from papermill.iorw import LocalHandler, papermill_io

    from taxi_duration.runfiles import atomic_path

    class WholeFileHandler(LocalHandler):
        def write(self, buf: str, path: str) -> None:
            with atomic_path(Path(path)) as temporary:
                temporary.write_text(buf, encoding="utf-8")

    papermill_io.register("/", WholeFileHandler())


def executable_cells(notebook: Path, parameterized: bool) -> int:
    """How many cells the kernel will run: the notebook's code cells, plus papermill's injected
    parameters cell when parameters are given."""
    import nbformat

    from taxi_duration.runner.cells import code_cells

    return len(code_cells(nbformat.read(notebook, as_version=4))) + (1 if parameterized else 0)


def _discard_kernel(kernel: Any) -> None:
    """Shut a kernel we started down at once (if there is one)."""
    from jupyter_core.utils import run_sync

    if kernel is not None and kernel.has_kernel:
        try:
            run_sync(kernel.shutdown_kernel)(now=True)
        except Exception as error:  # noqa: BLE001 - the parent reaps what is left
            log.warning("could not shut the prepared kernel down: %r", error)


def _wait_for_go(records: Path, poll_seconds: float = 0.01) -> dict[str, Any]:
    """Block until the parent writes the go file; return it."""
    while True:
        go = read_json(records / GO)
        if go:
            return go
        time.sleep(poll_seconds)


@contextlib.asynccontextmanager
async def _ready_client(kernel: Any, timeout_seconds: float) -> AsyncIterator[Any]:
    """A client of `kernel` once the kernel has answered kernel_info; RuntimeError if it does not."""
    client = kernel.client()
    client.start_channels()
    try:
        await client.wait_for_ready(timeout=timeout_seconds)  # "Kernel died before replying", ...
        yield client
    finally:
        client.stop_channels()


async def _answers(kernel: Any, timeout_seconds: float = 10) -> bool:
    """Whether the kernel is alive and answers a kernel_info request within `timeout_seconds`."""
    if not await kernel.is_alive():
        return False
    try:
        async with _ready_client(kernel, timeout_seconds):
            return True
    except RuntimeError:
        return False


async def _warm_up(kernel: Any, code: str, timeout_seconds: float = 120) -> None:
    """Run `code` in the kernel without a trace in the notebook: silent, not in its history.

    Gives up (RuntimeError) when the kernel dies meanwhile or after `timeout_seconds`.
    """
    import queue

    deadline = time.monotonic() + timeout_seconds
    async with _ready_client(kernel, timeout_seconds) as client:
        msg_id = client.execute(code, silent=True, store_history=False)
        while time.monotonic() < deadline:
            try:
                reply = await client.get_shell_msg(timeout=1)
            except queue.Empty:
                if not await kernel.is_alive():
                    raise RuntimeError("the kernel died while importing the notebook's modules") from None
                continue
            if reply["parent_header"].get("msg_id") == msg_id:
                return
        raise RuntimeError(f"the kernel's imports took longer than {timeout_seconds:g} s")


def _stop_when_orphaned(parent_pid: int, records: Path) -> None:
    """Stop this child, as on a timeout, once the process that started it is gone.

    The child runs in a session of its own (so that stopping it cannot hit the caller), which
    also means nothing stops it when the caller is SIGKILLed or OOM-killed: without this
    watch, the child and its kernel would run the notebook to its end, or forever, unobserved.
    """
    while os.getppid() == parent_pid:
        time.sleep(1)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(STOP_GRACE_SECONDS)
    # The clean-up hung: do what the caller would have done, then go.
    reap_kernel(records / KERNEL_RECORD)
    os._exit(1)


if __name__ == "__main__":
    exit_code = main()
    fast_start.exit_without_final_collection()
    sys.exit(exit_code)
