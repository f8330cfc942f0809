"""What a running notebook stage shows while it runs: in the Prefect UI and in the terminal.

- a progress artifact on the stage's task run: cells done out of the cells the kernel runs;
- a markdown artifact naming the running cell (number, first line, time spent in it), a new
  version when another cell starts, and every RUNNING_CELL_REFRESH_SECONDS while one runs long;
- one INFO log line per finished cell: `<stage>: cell 4/6 done in 0.8 s`.

Once the Prefect server is found lost, the log lines go on and the artifacts stop
(taxi_duration.orchestration.lost_server).

The runner reads the child's progress record at most once a second (taxi_duration.runner).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, cast

from taxi_duration import runner
from taxi_duration.orchestration import lost_server

if TYPE_CHECKING:
    from uuid import UUID

RUNNING_CELL_REFRESH_SECONDS = 30.0


def running_cell_key(stage: str) -> str:
    """The markdown artifact's key (Prefect keys: lowercase letters, digits and dashes)."""
    return f"running-cell-{stage.replace('_', '-').lower()}"


class StageProgress:
    """The `on_progress` callback of one stage's notebook run (call it from the stage's task)."""

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self._artifact_id: UUID | None = None
        self._logged = 0  # finished cells already logged
        self._shown: tuple[int | None, float] = (None, 0.0)  # running cell last shown, and when

    def __call__(self, progress: runner.Progress) -> None:
        from prefect import get_run_logger

        total = progress.total
        if not total:
            return
        logger = get_run_logger()
        if len(progress.finished) < self._logged:
            self._logged = 0  # the notebook is being run again from the start (its kernel died)
        for cell in progress.finished[self._logged :]:
            logger.info("%s: cell %d/%d done in %.1f s", self.stage, cell["position"], total, cell["seconds"])
        self._logged = len(progress.finished)
        lost_server.unless_lost(lambda: self._publish(progress, total))

    def _publish(self, progress: runner.Progress, total: int) -> None:
        """The progress artifact and, when it changed, the running cell's."""
        from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact

        percent = min(100.0, 100.0 * len(progress.finished) / total)
        if self._artifact_id is None:
            # Called from sync code, Prefect's async_dispatch returns the id itself (not a coroutine).
            self._artifact_id = cast(
                "UUID",
                create_progress_artifact(progress=percent, description=f"{self.stage}: cells done out of {total}"),
            )
        else:
            update_progress_artifact(self._artifact_id, progress=percent)
        markdown = self._running_cell_markdown(progress)
        if markdown is not None:
            create_markdown_artifact(
                markdown=markdown, key=running_cell_key(self.stage), description=f"{self.stage}: the cell running now"
            )

    def _running_cell_markdown(self, progress: runner.Progress) -> str | None:
        """The running cell's account, when it is worth a new version; None otherwise."""
        running, now = progress.running, time.time()
        if running is None:
            if len(progress.finished) < (progress.total or 0) or self._shown[0] == -1:
                return None
            self._shown = (-1, now)
            seconds = sum(cell["seconds"] for cell in progress.finished)
            return f"**{self.stage}**: all {progress.total} cells done ({seconds:.1f} s in cells)."
        if running["index"] == self._shown[0] and now - self._shown[1] < RUNNING_CELL_REFRESH_SECONDS:
            return None
        self._shown = (running["index"], now)
        first_line = (running.get("first_line") or "(empty first line)").replace("`", "'")
        return (
            f"**{self.stage}**: running cell {running['position']} of {progress.total} "
            f"for {now - running['started']:.0f} s\n\n```python\n{first_line}\n```\n"
        )
