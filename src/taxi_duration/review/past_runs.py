"""A past run, found from what a reviewer types: its MLflow run id, a prefix of it, or its folder.

The comparison report and `make reopen` both start from a run folder under outputs/ (its
run.json, manifests and executed notebooks); this is the one place that finds it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from taxi_duration.data.periods import parse_month
from taxi_duration.review import gallery

MIN_PREFIX = 4


class RunNotFoundError(LookupError):
    """No run folder, or more than one, answers to the reference given; the message says which."""


@dataclass(frozen=True)
class PastRun:
    """A finished or failed run's folder and its run.json record."""

    folder: Path
    record: dict[str, Any]

    @property
    def run_id(self) -> str:
        return str(self.record.get("mlflow_run_id", ""))

    @property
    def short_id(self) -> str:
        return self.run_id[:8]

    @property
    def kind(self) -> str:
        return str(self.record.get("kind", "train"))

    @property
    def month(self) -> str:
        """The training month of a pipeline run, the scored month of a scoring run."""
        return str(self.record.get("scored_month" if self.kind == "score" else "train_month", ""))

    @property
    def label(self) -> str:
        return f"{self.record.get('color', '')} {self.month} (run {self.short_id})"


def find_run(reference: str, outputs_dir: Path) -> PastRun:
    """The run `reference` names: a run folder (absolute, or relative to here or to `outputs_dir`),
    or an MLflow run id or a prefix of one (at least MIN_PREFIX characters) matching one folder."""
    outputs_dir = Path(outputs_dir)
    for candidate in (Path(reference), outputs_dir / reference):
        if (candidate / gallery.RUN_RECORD).is_file():
            return PastRun(candidate.resolve(), gallery.read_run_record(candidate))
    text = reference.strip().lower()
    if len(text) < MIN_PREFIX:
        raise RunNotFoundError(
            f"{reference!r} is neither a run folder nor an MLflow run id (give at least {MIN_PREFIX} characters)"
        )
    records = gallery.read_run_records(outputs_dir)
    matches = [record for record in records if str(record.get("mlflow_run_id", "")).lower().startswith(text)]
    if not matches:
        known = ", ".join(f"{str(record.get('mlflow_run_id', ''))[:8]} ({record['folder']})" for record in records[:5])
        raise RunNotFoundError(
            f"no run folder under {outputs_dir} belongs to MLflow run {reference!r}"
            + (f"; newest runs there: {known}" if known else "; no run has been recorded there yet")
        )
    if len(matches) > 1:
        raise RunNotFoundError(
            f"{reference!r} matches {len(matches)} runs: "
            + ", ".join(str(record["mlflow_run_id"]) for record in matches)
            + "; give more characters"
        )
    (record,) = matches
    return PastRun((outputs_dir / record["folder"]).resolve(), record)


def previous_month_run(run: PastRun, outputs_dir: Path) -> PastRun | None:
    """The newest finished pipeline run of the training month before `run`'s, same colour; None if none."""
    if run.kind != "train" or not run.month:
        return None
    previous = parse_month(run.month).previous().label()
    for record in gallery.read_run_records(outputs_dir):  # newest first
        if (
            record.get("kind", "train") == "train"
            and record.get("status") == "FINISHED"
            and record.get("color") == run.record.get("color")
            and record.get("train_month") == previous
        ):
            return PastRun((Path(outputs_dir) / record["folder"]).resolve(), record)
    return None
