"""What a notebook's `parameters` cell declares, and which values may be passed to it.

The cell is the notebook's contract: `stage_parameters` hands a stage the run values whose
names its cell declares, plus its declaration's fixed values, and refuses a value of a type
the cell does not allow. A parameter's type is its default's (`month = 3`: int), or its
annotation where the default says nothing (`train_file: str | None = None`).
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Values a `parameters` cell can take and papermill can write back as Python literals.
PLAIN_TYPES = (str, int, float, bool, type(None))
# The names an annotation may use: the plain types, spelled as in a parameters cell.
_TYPE_NAMES: dict[str, type] = {"str": str, "int": int, "float": float, "bool": bool, "None": type(None)}


class NotebookParameterError(ValueError):
    """Parameters a notebook does not declare, or values that are not plain literals or not of the declared type."""


@dataclass(frozen=True)
class DeclaredParameter:
    """One name of a `parameters` cell: the types it allows (empty: none usable) and its default's text."""

    name: str
    types: tuple[type, ...]
    default: str

    def allowed(self) -> str:
        """The types as a parameters cell writes them, e.g. 'str | None'."""
        return " | ".join("None" if kind is type(None) else kind.__name__ for kind in self.types)

    def accepts(self, value: Any) -> bool:
        """Whether `value` fits: an int where a float is declared, never a bool for an int."""
        if isinstance(value, bool):
            return bool in self.types
        if isinstance(value, int):
            return int in self.types or float in self.types
        return any(isinstance(value, kind) for kind in self.types if kind is not bool)


@functools.cache
def read_union_annotations() -> None:
    """Have papermill see `name: str | None = None` as a parameter.

    papermill 2.7's pattern for an annotation stops at `|`, so such a line is no parameter
    to it: inspect_notebook omits it and execute_notebook logs "Passed unknown parameter"
    (nteract/papermill#695). Its translator registry is the extension point: this registers
    a Python translator whose pattern also takes `|` and dotted names. Called before any
    inspection (here and in the runner's child, which runs papermill).
    """
    import re

    from papermill.translators import PythonTranslator, papermill_translators

    class UnionAnnotationsTranslator(PythonTranslator):
        PARAMETER_PATTERN = re.compile(
            PythonTranslator.PARAMETER_PATTERN.pattern.replace(r"\w[\w_\[\],\s]*", r"\w[\w_\[\],\s|.]*")
        )

    if UnionAnnotationsTranslator.PARAMETER_PATTERN.pattern == PythonTranslator.PARAMETER_PATTERN.pattern:
        raise RuntimeError("papermill's parameter pattern changed: update runner.parameters.read_union_annotations")
    papermill_translators.register("python", UnionAnnotationsTranslator)


def declared_parameters(notebook: Path) -> dict[str, Any]:
    """Names declared in the notebook's cell tagged `parameters` (via papermill)."""
    import papermill

    read_union_annotations()
    return papermill.inspect_notebook(str(notebook))


def typed_parameters(notebook: Path) -> dict[str, DeclaredParameter]:
    """The `parameters` cell's names with their types; raises naming a name that has no usable type."""
    declared = declared_parameters(notebook)
    if not declared:
        raise NotebookParameterError(f"{notebook.name} has no cell tagged 'parameters'")
    typed = {name: _typed(name, found["inferred_type_name"], found["default"]) for name, found in declared.items()}
    for parameter in typed.values():
        if not parameter.types:
            raise NotebookParameterError(
                f"{notebook.name}: parameter {parameter.name} = {parameter.default} has no type a value can be "
                f"checked against; annotate it in the parameters cell with str, int, float or bool, "
                f"e.g. `{parameter.name}: str | None = None`"
            )
    return typed


def _typed(name: str, annotation: str, default: str) -> DeclaredParameter:
    """Types from the annotation if there is one (papermill writes 'None' for none), else from the default."""
    if annotation != "None":
        return DeclaredParameter(name, _annotation_types(annotation), default)
    try:
        value = ast.literal_eval(default)
    except (ValueError, SyntaxError):
        return DeclaredParameter(name, (), default)  # not a literal: only an annotation can say
    kind = type(value)
    return DeclaredParameter(name, (kind,) if kind in PLAIN_TYPES and value is not None else (), default)


def _annotation_types(annotation: str) -> tuple[type, ...]:
    """`str | None` or `Optional[str]` -> (str, NoneType); () for anything but the plain types."""
    text = annotation.strip().strip("\"'").replace(" ", "")
    if text.startswith("Optional[") and text.endswith("]"):
        text = f"{text[len('Optional[') : -1]}|None"
    names = text.split("|")
    if not all(part in _TYPE_NAMES for part in names):
        return ()
    return tuple(_TYPE_NAMES[part] for part in names)


def stage_parameters(notebook: Path, run_values: Mapping[str, Any], fixed: Mapping[str, Any]) -> dict[str, Any]:
    """The run values whose names the notebook's `parameters` cell declares, plus the stage's fixed ones.

    Refuses, naming the notebook and the parameter: a fixed value the cell does not declare,
    a declared name with no usable type, and any value (run or fixed) of a type the cell does
    not allow. A fixed value replaces a run value of the same name. No kernel is involved.
    """
    declared = typed_parameters(notebook)
    undeclared = sorted(set(fixed) - set(declared))
    if undeclared:
        raise NotebookParameterError(
            f"{notebook.name}: fixed parameter(s) {', '.join(undeclared)} not declared by its parameters cell; "
            f"it declares: {', '.join(sorted(declared))}"
        )
    chosen = {
        name: fixed[name] if name in fixed else run_values[name] for name in declared if name in {*run_values, *fixed}
    }
    for name, value in chosen.items():
        _check_plain(notebook, name, value)
        parameter = declared[name]
        if not parameter.accepts(value):
            what = "None" if value is None else f"{_article(type(value).__name__)} {type(value).__name__}"
            raise NotebookParameterError(
                f"{notebook.name}: parameter {name}={value!r} is {what}; its parameters cell allows {parameter.allowed()}"
            )
    return chosen


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def check_parameters(notebook: Path, parameters: dict[str, Any]) -> None:
    """Reject names the `parameters` cell does not declare and values that are not plain."""
    declared = declared_parameters(notebook)
    if not declared:
        raise NotebookParameterError(f"{notebook.name} has no cell tagged 'parameters'")
    unknown = sorted(set(parameters) - set(declared))
    if unknown:
        raise NotebookParameterError(
            f"{notebook.name} does not declare parameter(s) {', '.join(unknown)}; "
            f"it declares: {', '.join(sorted(declared))}"
        )
    for name, value in parameters.items():
        _check_plain(notebook, name, value)


def _check_plain(notebook: Path, name: str, value: Any) -> None:
    """A value papermill can write into the notebook: a plain literal, and valid Unicode if text."""
    if not isinstance(value, PLAIN_TYPES):
        raise NotebookParameterError(
            f"parameter {name}={value!r} for {notebook.name} is a {type(value).__name__}; "
            "pass a plain string, number, boolean or None"
        )
    if isinstance(value, str) and not _utf8_encodable(value):
        # papermill copies parameters into the executed notebook's metadata verbatim, and
        # a notebook is UTF-8 JSON: writing it would fail and leave an empty file.
        raise NotebookParameterError(
            f"parameter {name}={value!r} for {notebook.name} contains a lone surrogate (U+D800 to U+DFFF), "
            "which a notebook (UTF-8 JSON) cannot hold; pass valid Unicode text, e.g. bytes decoded with "
            "errors='replace'"
        )


def _utf8_encodable(text: str) -> bool:
    """False for text holding lone surrogates (from errors='surrogateescape' decoding, say)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
