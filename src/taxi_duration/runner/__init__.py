"""The notebook runner: execute one parameterized notebook with papermill, render it, report.

Each notebook runs in a child process (`python -m taxi_duration.runner.child ...`): papermill
changes the process-wide working directory and Jupyter clients dislike worker threads, so a
Prefect task must not run it in-process. The child starts the kernel and has it import what
the notebook imports before the parameters arrive; a caller can start it ahead of time
(PreparedRunner) so that this overlaps other work. The executed notebook is kept whether the
run passed or failed, and rendered to HTML (full and review) either way.

What counts as a failure, and how it is found (papermill 2.7, nbclient 0.11, IPython 9,
ipykernel 7 behave as described here; the tests in tests/faults pin it down):

* A cell raises: papermill raises PapermillExecutionError; reported as "cell N raised ...",
  N being the execution count shown in the executed copy.
* A cell calls `sys.exit(0)` (or `sys.exit()`, `raise SystemExit`): papermill treats this as
  a deliberate, *successful* early stop, leaving the later cells unexecuted. The pipeline
  needs every cell's outputs, so after a run papermill calls successful every non-empty code
  cell must have run; if not, it is reported as "stopped early at cell N". `sys.exit(3)` is
  already a papermill failure and is reported the same way.
* `exit()` / `quit()` in a kernel only ask the frontend to close it; papermill ignores the
  request and the notebook runs on, so there is nothing to report.
* A shell command exits non-zero: `%%bash` / `%%sh` / `%%script` raise CalledProcessError in
  IPython 9, but `!cmd` only sets `_exit_code`, and `x = !cmd` / `%sx` not even that. The
  kernel is started with `InteractiveShell.system_raise_on_error=True`, so they raise too.
  Write `!cmd || true` where a failure is expected. Not detectable: `os.system` or
  `subprocess.run` without `check=True`, `!false | cat` (a pipeline's status is its last
  command's), and anything a cell merely prints or logs without raising.
* The kernel dies (the out-of-memory killer's SIGKILL, `os._exit`, a crash in native code):
  nbclient raises DeadKernelError. The notebook is run again from the start, at most
  `retries_on_kernel_death` times, within the same wall-clock limit.
* The wall-clock limit expires: the child gets SIGTERM (nbclient then shuts its kernel down)
  and SIGKILL if it is still there after STOP_GRACE_SECONDS. The child records its kernel's
  pid; once the child is gone, whatever is left of the kernel's process group is killed
  (jupyter_client starts the kernel in a session of its own, and what the kernel starts
  stays in its group unless it makes its own session). So neither the kernel nor what it
  started outlives the run, whatever the outcome, even if the child had to be SIGKILLed.
* The caller dies (the flow process SIGKILLed): the child notices that its parent is gone
  and stops as on a timeout, so the kernel does not run on unobserved.

Modules: `parent` (execute_notebook, PreparedRunner: start, wait, stop, reap, report), `child`
(the process that drives the kernel), `records` (the files the two share), `processes`
(stopping and reaping), `cells` and `messages` (reading the executed copy, wording the
failure), `parameters`, `preload`.
"""

from taxi_duration.runner.parameters import (
    PLAIN_TYPES,
    NotebookParameterError,
    check_parameters,
    declared_parameters,
    stage_parameters,
)
from taxi_duration.runner.parent import (
    NotebookExecutionError,
    NotebookResult,
    NotebookStopped,
    PreparedRunner,
    Progress,
    execute_notebook,
)
from taxi_duration.runner.preload import notebook_imports
from taxi_duration.runner.processes import STOP_GRACE_SECONDS

__all__ = [
    "PLAIN_TYPES",
    "STOP_GRACE_SECONDS",
    "NotebookExecutionError",
    "NotebookParameterError",
    "NotebookResult",
    "NotebookStopped",
    "PreparedRunner",
    "Progress",
    "check_parameters",
    "declared_parameters",
    "execute_notebook",
    "notebook_imports",
    "stage_parameters",
]
