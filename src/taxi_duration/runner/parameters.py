"""What a notebook's `parameters` cell declares, and which values may be passed to it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Values a `parameters` cell can take and papermill can write back as Python literals.
PLAIN_TYPES = (str, int, float, bool, type(None))


class NotebookParameterError(ValueError):
    """Parameters a notebook does not declare, or values that are not plain literals."""


def declared_parameters(notebook: Path) -> dict[str, Any]:
    """Names declared in the notebook's cell tagged `parameters` (via papermill)."""
    import papermill

    return papermill.inspect_notebook(str(notebook))


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
