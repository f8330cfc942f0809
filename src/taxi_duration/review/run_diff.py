"""What changed between two pipeline runs: code, data, model and figures, read from their folders.

Every figure comes from what the runs recorded (run.json, the stages' manifests, the executed
notebooks), never from re-reading the trip files. The one computation is cross-scoring: each
run's servable model on the other run's validation trips, which both folders keep. Rendering
is taxi_duration.review.compare's job.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TypeGuard

from taxi_duration import manifests, runfiles
from taxi_duration.data import zones
from taxi_duration.manifests import ExploreManifest, FeaturesManifest, StageManifest, TrainingManifest
from taxi_duration.orchestration import declarations
from taxi_duration.review.past_runs import PastRun

Value = float | int | str | None


@dataclass(frozen=True)
class Figure:
    """One figure (label and value) of both runs."""

    label: str
    older: Value
    newer: Value

    @property
    def delta(self) -> float | None:
        """newer − older, when both are numbers."""
        if _is_number(self.older) and _is_number(self.newer):
            return float(self.newer) - float(self.older)
        return None


@dataclass(frozen=True)
class CellChange:
    """A notebook cell whose source differs: 'changed' (with a unified diff), 'added' or 'removed'."""

    kind: str
    older_cell: int | None  # position among the notebook's cells (the injected parameters left out)
    newer_cell: int | None
    diff: tuple[str, ...]  # unified diff lines of the cell's source


@dataclass(frozen=True)
class NotebookChange:
    stage: str
    older_sha256: str | None  # of the notebook file each run executed, as run.json recorded it
    newer_sha256: str | None
    cells: tuple[CellChange, ...]  # empty: the sources are the same


@dataclass(frozen=True)
class FigurePair:
    """The same plot of both runs (base64 PNGs; None when a run has no such plot)."""

    stage: str
    alt: str
    older_png: str | None
    newer_png: str | None


@dataclass(frozen=True)
class CrossScore:
    """RMSE of one run's model on a run's validation month (None, with why, when it could not be scored)."""

    model_run: str
    validation_month: str
    rmse: float | None
    note: str = ""


@dataclass(frozen=True)
class Comparison:
    older: PastRun
    newer: PastRun
    parameters: tuple[Figure, ...]
    data: tuple[Figure, ...]
    busiest_zones: dict[str, tuple[Figure, ...]]  # pickup / dropoff: rank -> "74 East Harlem North (Manhattan) (trips)"
    model: tuple[Figure, ...]
    error_by_distance: tuple[Figure, ...]
    cross_scores: tuple[CrossScore, ...]
    notebooks: tuple[NotebookChange, ...]
    figures: tuple[FigurePair, ...]


def _is_number(value: Value) -> TypeGuard[int | float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))


def ordered(a: PastRun, b: PastRun) -> tuple[PastRun, PastRun]:
    """(older, newer): by training month, then by when the run started."""

    def key(run: PastRun) -> tuple[str, str]:
        return run.month, str(run.record.get("started", ""))

    return (a, b) if key(a) <= key(b) else (b, a)


def compare_runs(a: PastRun, b: PastRun, cross_score: bool = True) -> Comparison:
    """Everything the comparison report shows of runs `a` and `b` (in either order)."""
    older, newer = ordered(a, b)
    for run in (older, newer):
        if run.kind != "train":
            raise ValueError(f"{run.label} is a scoring run; a comparison is of two pipeline (training) runs")
    names = compared_stages(older, newer)
    before, after = (_RunManifests([_manifest(run, stage) for stage in names]) for run in (older, newer))
    return Comparison(
        older=older,
        newer=newer,
        parameters=_parameter_figures(older, newer, names),
        data=_data_figures(before, after),
        busiest_zones={side: _zone_figures(before.explore, after.explore, side) for side in ("pickup", "dropoff")},
        model=_model_figures(older, newer, before.training, after.training),
        error_by_distance=_distance_figures(before.training, after.training),
        cross_scores=_cross_scores((older, before.training), (newer, after.training)) if cross_score else (),
        notebooks=tuple(notebook_change(stage, older, newer) for stage in names),
        figures=tuple(pair for stage in names for pair in figure_pairs(stage, older, newer)),
    )


def compared_stages(older: PastRun, newer: PastRun) -> tuple[str, ...]:
    """The training pipeline's declared stages, then any other stage either run recorded (in name order).

    A stage declared with `when` (in a run only when asked for) counts only if either run recorded it.
    """
    recorded = {name for run in (older, newer) for name in run.record.get("notebooks") or {}}
    declared = [
        stage.name for stage in declarations.pipeline("training") if stage.when is None or stage.name in recorded
    ]
    return (*declared, *sorted(recorded - set(declared)))


@dataclass(frozen=True)
class _RunManifests:
    """One run's manifests, and those the comparison reads figures from, picked by kind."""

    records: list[StageManifest | None]

    @property
    def explore(self) -> ExploreManifest | None:
        return manifests.of_kind(self.records, ExploreManifest)

    @property
    def features(self) -> FeaturesManifest | None:
        return manifests.of_kind(self.records, FeaturesManifest)

    @property
    def training(self) -> TrainingManifest | None:
        return manifests.of_kind(self.records, TrainingManifest)


def _manifest(run: PastRun, stage: str) -> StageManifest | None:
    try:
        return manifests.read(run.folder, stage)
    except runfiles.MissingRunFileError:
        return None  # the stage did not finish in that run: its figures show as absent


def _parameter_figures(older: PastRun, newer: PastRun, names: tuple[str, ...]) -> tuple[Figure, ...]:
    rows = [
        Figure(label, older.record.get(key), newer.record.get(key))
        for label, key in (
            ("colour", "color"),
            ("training month", "train_month"),
            ("validation month", "validation_month"),
            ("MLflow run", "mlflow_run_id"),
            ("git commit", "git_commit"),
            ("status", "status"),
        )
    ]
    for stage in names:
        rows.append(
            Figure(
                f"{stage}.ipynb sha256",
                *(_short((run.record.get("notebooks") or {}).get(stage)) for run in (older, newer)),
            )
        )
    return tuple(rows)


def _short(digest: str | None) -> str | None:
    return digest[:12] if digest else None


def _data_figures(older: _RunManifests, newer: _RunManifests) -> tuple[Figure, ...]:
    def explore(run: _RunManifests) -> dict[str, Value]:
        explored, features = run.explore, run.features
        values: dict[str, Value] = {"trips in the month": explored.metrics.get("rows") if explored else None}
        for key, label in (
            ("kept", "trips kept by the 1–60 min filter"),
            ("too_short_share", "share dropped: under 1 min"),
            ("too_long_share", "share dropped: over 60 min"),
            ("dropped_share", "share dropped in all"),
        ):
            values[label] = explored.duration_filter.get(key) if explored else None
        for quantile, minutes in (explored.duration_quantiles if explored else {}).items():
            values[f"duration {quantile} (min)"] = minutes
        for column, count in (explored.nulls if explored else {}).items():
            values[f"nulls: {column}"] = count
        for key, label in (
            ("train_rows", "training trips (after cleaning)"),
            ("val_rows", "validation trips"),
            ("pu_do_vocabulary", "PU_DO vocabulary"),
            ("n_features", "features"),
            ("unseen_pu_do_share", "validation trips with an unseen PU_DO"),
        ):
            values[label] = features.metrics.get(key) if features else None
        return values

    before, after = explore(older), explore(newer)
    labels = list(before) + [label for label in after if label not in before]

    def value(values: dict[str, Value], label: str) -> Value:
        return values.get(label, 0 if label.startswith("nulls") else None)  # manifests list only non-zero nulls

    return tuple(Figure(label, value(before, label), value(after, label)) for label in labels)


def _zone_figures(older: ExploreManifest | None, newer: ExploreManifest | None, side: str) -> tuple[Figure, ...]:
    def ranked(explored: ExploreManifest | None) -> list[str]:
        busiest = explored.busiest_zones.get(side, ()) if explored else ()
        return [f"{zones.zone_label(zone.zone)} ({zone.trips:,} trips)" for zone in busiest]

    before, after = ranked(older), ranked(newer)
    return tuple(
        Figure(f"#{rank + 1}", before[rank] if rank < len(before) else None, after[rank] if rank < len(after) else None)
        for rank in range(max(len(before), len(after)))
    )


def _model_figures(
    older_run: PastRun, newer_run: PastRun, older: TrainingManifest | None, newer: TrainingManifest | None
) -> tuple[Figure, ...]:
    rows = [
        Figure(label, older.metrics.get(key) if older else None, newer.metrics.get(key) if newer else None)
        for label, key in (
            ("validation RMSE (min)", "rmse"),
            ("baseline RMSE: training mean (min)", "baseline_rmse"),
            ("best iteration", "best_iteration"),
        )
    ]
    for label, key in (
        ("registry decision", "decision"),
        ("registered version", "registered_version"),
        ("compared with champion version", "champion_version"),
        ("reason", "reason"),
    ):
        rows.append(Figure(label, _promotion(older_run, older, key), _promotion(newer_run, newer, key)))
    return tuple(rows)


def _promotion(run: PastRun, training: TrainingManifest | None, key: str) -> Value:
    """A registry figure of the run; a reused training registered nothing itself, as run.json says."""
    if key == "decision" and run.record.get("promotion"):
        return run.record["promotion"]
    return ((training.promotion if training else None) or {}).get(f"taxi.promotion.{key}")


def _distance_figures(older: TrainingManifest | None, newer: TrainingManifest | None) -> tuple[Figure, ...]:
    def by_bucket(training: TrainingManifest | None) -> dict[str, float]:
        return {row.miles: row.rmse for row in training.error_by_distance} if training else {}

    before, after = by_bucket(older), by_bucket(newer)
    buckets = list(before) + [bucket for bucket in after if bucket not in before]
    return tuple(Figure(f"RMSE, {bucket} miles", before.get(bucket), after.get(bucket)) for bucket in buckets)


def _cross_scores(*runs: tuple[PastRun, TrainingManifest | None]) -> tuple[CrossScore, ...]:
    """Each run's model (with its training manifest) on both validation months: its own, as
    recorded, and the other run's, scored now."""
    scores = []
    for model_run, training in runs:
        for month_run, _ in runs:
            month = str(month_run.record.get("validation_month", ""))
            if month_run is model_run:
                rmse = training.metrics.get("rmse") if training else None
                scores.append(CrossScore(model_run.label, month, rmse, "recorded by the run"))
                continue
            own_training = month == model_run.record.get("train_month")
            try:
                rmse = _score(model_run, training.model_uri if training else None, month_run)
                scores.append(
                    CrossScore(
                        model_run.label,
                        month,
                        rmse,
                        "scored for this comparison"
                        + ("; the model's own training month, so not a fair test" if own_training else ""),
                    )
                )
            except Exception as problem:  # noqa: BLE001 - a model gone or unreadable: say so, keep the rest
                scores.append(CrossScore(model_run.label, month, None, f"not scored: {problem}"))
    return tuple(scores)


def _score(model_run: PastRun, model_uri: str | None, month_run: PastRun) -> float:
    import numpy as np

    from taxi_duration.tracking import registry

    if not model_uri:
        raise ValueError("the run recorded no model")
    servable, _ = registry.load_servable_uri(str(model_run.record.get("tracking_uri")), model_uri)
    trips = runfiles.load_validation_records(month_run.folder)
    actual = np.load(Path(month_run.folder) / "features" / "y_val.npy")
    return registry.servable_rmse(servable, trips, actual)


def _source_cells(path: Path) -> list[tuple[str, str]]:
    """(cell type, source) of an executed notebook's cells, without papermill's injected parameters."""
    import nbformat

    if not path.is_file():
        return []
    notebook = nbformat.read(path, as_version=4)
    return [
        (cell.cell_type, cell.source)
        for cell in notebook.cells
        if "injected-parameters" not in cell.get("metadata", {}).get("tags", [])
    ]


def notebook_change(stage: str, older: PastRun, newer: PastRun) -> NotebookChange:
    """The cell-by-cell source diff of a stage's notebook between two runs (outputs ignored)."""
    before, after = (_source_cells(run.folder / f"{stage}.ipynb") for run in (older, newer))
    changes: list[CellChange] = []
    matcher = difflib.SequenceMatcher(a=before, b=after, autojunk=False)
    for tag, a_start, a_end, b_start, b_end in matcher.get_opcodes():
        if tag == "equal":
            continue
        pairs = min(a_end - a_start, b_end - b_start) if tag == "replace" else 0
        for offset in range(pairs):
            a_cell, b_cell = a_start + offset, b_start + offset
            changes.append(
                CellChange("changed", a_cell, b_cell, _diff(before[a_cell][1], after[b_cell][1], a_cell, b_cell))
            )
        for a_cell in range(a_start + pairs, a_end):
            changes.append(CellChange("removed", a_cell, None, _diff(before[a_cell][1], "", a_cell, None)))
        for b_cell in range(b_start + pairs, b_end):
            changes.append(CellChange("added", None, b_cell, _diff("", after[b_cell][1], None, b_cell)))
    digests = [(run.record.get("notebooks") or {}).get(stage) for run in (older, newer)]
    return NotebookChange(stage, digests[0], digests[1], tuple(changes))


def _diff(before: str, after: str, a_cell: int | None, b_cell: int | None) -> tuple[str, ...]:
    lines = difflib.unified_diff(
        before.splitlines(),
        after.splitlines(),
        lineterm="",
        fromfile=f"older cell {a_cell}" if a_cell is not None else "(no cell)",
        tofile=f"newer cell {b_cell}" if b_cell is not None else "(no cell)",
    )
    return tuple(lines)


def _png_outputs(path: Path) -> list[tuple[str, str]]:
    """(alt text, base64 PNG) of every image an executed notebook shows, in order."""
    import nbformat

    if not path.is_file():
        return []
    found = []
    for cell in nbformat.read(path, as_version=4).cells:
        for output in cell.get("outputs", []):
            png = (output.get("data") or {}).get("image/png")
            if png:
                alt = ((output.get("metadata") or {}).get("image/png") or {}).get("alt", "")
                found.append((str(alt), "".join(png) if isinstance(png, list) else str(png)))
    return found


def figure_pairs(stage: str, older: PastRun, newer: PastRun) -> list[FigurePair]:
    """A stage's plots of both runs, paired in the order the notebook shows them."""
    before, after = (_png_outputs(run.folder / f"{stage}.ipynb") for run in (older, newer))
    pairs = []
    for index in range(max(len(before), len(after))):
        old = before[index] if index < len(before) else None
        new = after[index] if index < len(after) else None
        shown = new if new is not None else old
        alt = (shown[0] if shown else "") or f"{stage} figure {index + 1}"
        pairs.append(FigurePair(stage, alt, old[1] if old else None, new[1] if new else None))
    return pairs
