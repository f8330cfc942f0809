"""The pipelines' notebook stages, as `notebooks/pipeline.yaml` declares them; what code a run executed;
and runners started ahead of a stage's turn.

The declarations live in one small file beside the notebooks they declare, so that adding a
stage is a notebook plus its entry there, with no change to the package (docs/adding-a-stage.md).
`pipeline(name)` reads and checks them: a bad entry fails with a message naming the file and
the entry. The engine (taxi_duration.orchestration) iterates over the `Stage` values and
names no stage itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from taxi_duration import runner, settings
from taxi_duration.orchestration import stage_cache

DECLARATIONS = "pipeline.yaml"
# The trip months each pipeline fetches, by role: a stage `reads` some of them and gets `<role>_file`.
MONTH_ROLES = {"training": ("train", "validation"), "scoring": ("scored",)}
_FIELDS = {"notebook", "needs", "reads", "produces", "preload", "report_only", "parameters", "when"}


class DeclarationError(ValueError):
    """`notebooks/pipeline.yaml` declares something the engine cannot run; the message names the entry."""


@dataclass(frozen=True)
class Stage:
    """One notebook stage of a pipeline, as declared."""

    name: str
    notebook: Path
    needs: tuple[str, ...] = ()  # upstream stages: run after them, keyed by their keys
    reads: tuple[str, ...] = ()  # trip months, by role (MONTH_ROLES)
    produces: tuple[str, ...] = ()  # run-folder paths it writes besides notebook, reports and manifest
    preload: tuple[str, ...] = ()  # modules its kernel imports ahead
    report_only: bool = False  # writes nothing another stage reads: may run beside the next stage
    parameters: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))  # fixed values
    when: str | None = None  # a run value: the stage is in a run only when that value is truthy (None: always)


def declarations_path() -> Path:
    """The declarations file: beside the notebooks (settings.notebooks_dir, which honours TAXI_PROJECT_DIR)."""
    return settings.notebooks_dir() / DECLARATIONS


def pipeline(name: str) -> tuple[Stage, ...]:
    """The stages of pipeline `name`, each after its upstream, otherwise in declaration order.

    DeclarationError names the file and the entry: an unknown pipeline, field, upstream or
    month role, a missing notebook, a value of the wrong kind, or a cycle.
    """
    import yaml

    path = declarations_path()
    try:
        document = yaml.safe_load(path.read_text())
    except OSError as error:
        raise DeclarationError(f"cannot read the stage declarations {path}: {error}") from None
    except yaml.YAMLError as error:
        raise DeclarationError(f"{path} is not valid YAML: {error}") from None
    pipelines = document.get("pipelines") if isinstance(document, dict) else None
    if not isinstance(pipelines, dict):
        raise DeclarationError(f"{path}: expected a mapping `pipelines:` of pipeline names to their stages")
    if name not in pipelines:
        raise DeclarationError(f"{path}: no pipeline {name!r}; it declares: {', '.join(map(str, pipelines))}")
    if name not in MONTH_ROLES:
        raise DeclarationError(f"{path}: pipelines.{name}: the engine runs only {', '.join(MONTH_ROLES)}")
    entries = pipelines[name]
    if not isinstance(entries, dict) or not entries:
        raise DeclarationError(f"{path}: pipelines.{name}: expected a mapping of stage names to their declarations")
    declared = [_stage(path, name, str(stage), entry) for stage, entry in entries.items()]
    return _in_order(path, name, declared)


def _stage(path: Path, pipeline_name: str, name: str, entry: Any) -> Stage:
    where = f"{path}: pipelines.{pipeline_name}.{name}"
    if not isinstance(entry, dict):
        raise DeclarationError(f"{where}: expected a mapping with at least `notebook:`")
    unknown = sorted(set(map(str, entry)) - _FIELDS)
    if unknown:
        raise DeclarationError(f"{where}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(_FIELDS))}")
    notebook_name = entry.get("notebook")
    if not isinstance(notebook_name, str) or not notebook_name:
        raise DeclarationError(f"{where}: `notebook:` must name the notebook file, e.g. {name}.ipynb")
    notebook = path.parent / notebook_name
    if not notebook.is_file():
        raise DeclarationError(f"{where}: notebook {notebook} does not exist")
    reads = _names(where, "reads", entry.get("reads"))
    roles = MONTH_ROLES[pipeline_name]
    unknown_roles = [role for role in reads if role not in roles]
    if unknown_roles:
        raise DeclarationError(
            f"{where}: unknown month role(s) {', '.join(unknown_roles)} in `reads`; "
            f"the {pipeline_name} pipeline has: {', '.join(roles)}"
        )
    report_only = entry.get("report_only", False)
    if not isinstance(report_only, bool):
        raise DeclarationError(f"{where}: `report_only:` must be true or false, not {report_only!r}")
    when = entry.get("when")
    if when is not None and (not isinstance(when, str) or not when.isidentifier()):
        raise DeclarationError(f"{where}: `when:` must name a run value, e.g. tune_trials, not {when!r}")
    parameters = entry.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise DeclarationError(f"{where}: `parameters:` must be a mapping of parameter names to values")
    return Stage(
        name=name,
        notebook=notebook,
        needs=_names(where, "needs", entry.get("needs")),
        reads=reads,
        produces=_names(where, "produces", entry.get("produces")),
        preload=_names(where, "preload", entry.get("preload")),
        report_only=report_only,
        parameters=MappingProxyType({str(key): value for key, value in parameters.items()}),
        when=when,
    )


def _names(where: str, field_name: str, value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
        raise DeclarationError(f"{where}: `{field_name}:` must be a list of names, e.g. [a, b], not {value!r}")
    return tuple(value)


def _in_order(path: Path, pipeline_name: str, declared: list[Stage]) -> tuple[Stage, ...]:
    """Each stage after its upstream; among the stages ready to go, the one declared first."""
    names = {stage.name for stage in declared}
    for stage in declared:
        unknown = [upstream for upstream in stage.needs if upstream not in names]
        if unknown:
            raise DeclarationError(
                f"{path}: pipelines.{pipeline_name}.{stage.name}: unknown upstream stage(s) {', '.join(unknown)} "
                f"in `needs`; the {pipeline_name} pipeline has: {', '.join(sorted(names))}"
            )
    ordered: list[Stage] = []
    placed: set[str] = set()
    waiting = list(declared)
    while waiting:
        ready = next((stage for stage in waiting if set(stage.needs) <= placed), None)
        if ready is None:
            cycle = ", ".join(stage.name for stage in waiting)
            raise DeclarationError(f"{path}: pipelines.{pipeline_name}: the `needs` of {cycle} form a cycle")
        ordered.append(ready)
        placed.add(ready.name)
        waiting.remove(ready)
    return tuple(ordered)


def in_run(pipeline: tuple[Stage, ...], values: Mapping[str, Any]) -> tuple[Stage, ...]:
    """The stages a run offering `values` has: those whose `when` value is truthy, or that have none.

    A stage left out is absent from the run: the stages that need it wait for, and are keyed by,
    the others only, so a run without it is the run the pipeline would be had it never been
    declared. A `when` that names no run value is refused (a typo would leave the stage off for good).
    """
    unknown = sorted({stage.when for stage in pipeline if stage.when is not None and stage.when not in values})
    if unknown:
        raise DeclarationError(
            f"{declarations_path()}: `when:` names {', '.join(unknown)}, which the run does not offer; "
            f"it offers: {', '.join(sorted(values))}"
        )
    kept = [stage for stage in pipeline if stage.when is None or values[stage.when]]
    names = {stage.name for stage in kept}
    return tuple(replace(stage, needs=tuple(name for name in stage.needs if name in names)) for stage in kept)


def find(name: str) -> Stage:
    """The stage called `name`, in whichever pipeline declares it."""
    known: list[str] = []
    for pipeline_name in MONTH_ROLES:
        for stage in pipeline(pipeline_name):
            if stage.name == name:
                return stage
            known.append(stage.name)
    raise DeclarationError(f"{declarations_path()} declares no stage {name!r}; it declares: {', '.join(known)}")


def provenance(stages: Iterable[Stage]) -> dict[str, Any]:
    """What code a run executes: the checkout's git commit and each stage notebook's sha256.

    Recorded in run.json, so a comparison can show what changed and a reopened notebook can
    say when the checkout is no longer the code the run ran.
    """
    from taxi_duration.tracking import mlflow_runs

    return {
        "git_commit": mlflow_runs.git_commit(),
        "notebooks": {stage.name: stage_cache.file_sha256(stage.notebook) for stage in stages},
    }


def trip_digests(trip_files: Mapping[str, str]) -> dict[str, str]:
    """sha256 of each month's file (role -> digest): what the stage keys and the MLflow datasets name."""
    return {role: stage_cache.file_sha256(Path(path)) for role, path in trip_files.items()}


Runners = dict[str, runner.PreparedRunner]


def start_runners(to_execute: Iterable[Stage]) -> Runners:
    """Runners for the stages that will execute, started now: their kernels boot and import meanwhile.

    The flow starts them only for a month whose files are local and small enough for its
    kernels to run side by side (taxi_duration.orchestration.request); otherwise each stage
    starts its own when its turn comes.
    """
    runners: Runners = {}
    try:
        for stage in to_execute:
            runners[stage.name] = runner.PreparedRunner(stage.notebook, preload=stage.preload)
    except BaseException:
        close_runners(runners)
        raise
    return runners


def close_runners(runners: Runners) -> None:
    """Close every runner (stopping its child and kernel if they still run)."""
    for prepared in runners.values():
        prepared.close()
