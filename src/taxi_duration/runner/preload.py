"""What a prepared kernel imports while it waits: the modules its notebook imports."""

from __future__ import annotations

from pathlib import Path

from taxi_duration.runner.cells import code_cells, read_notebook


def preload_code(notebook: Path, extra_modules: list[str]) -> str:
    """Code that imports, with the collector paused and binding no name, what the notebook imports.

    The modules: those of the notebook's top-level `import` / `from ... import` statements
    (for `from a import b`, also `a.b` in case b is a module), then `extra_modules`, for
    libraries the notebook's code imports lazily. A module that fails to import is skipped:
    the notebook's own cell raises the error where the user sees it.
    """
    modules = [*notebook_imports(notebook), *extra_modules]
    return (
        "def _taxi_preload(names):\n"
        "    import importlib\n"
        "    from taxi_duration.runner.fast_start import imports_without_gc\n"
        "    with imports_without_gc():\n"
        "        for name in names:\n"
        "            try:\n"
        "                importlib.import_module(name)\n"
        "            except Exception:\n"
        "                pass\n"
        f"_taxi_preload({list(dict.fromkeys(modules))!r})\n"
        "del _taxi_preload\n"
    )


def notebook_imports(notebook: Path) -> list[str]:
    """Modules named by the top-level import statements of a notebook's code cells, in order."""
    import ast

    parsed = read_notebook(notebook)
    modules: list[str] = []
    for cell in code_cells(parsed) if parsed is not None else []:
        if cell.source.lstrip().startswith("%%"):
            continue  # a cell magic: not Python
        # Line magics and shell escapes (%matplotlib, !pip) are not Python either.
        source = "\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in cell.source.splitlines())
        try:
            statements = ast.parse(source).body
        except SyntaxError:
            continue
        for statement in statements:
            if isinstance(statement, ast.Import):
                modules += [alias.name for alias in statement.names]
            elif isinstance(statement, ast.ImportFrom) and statement.level == 0 and statement.module != "__future__":
                modules.append(str(statement.module))
                modules += [f"{statement.module}.{alias.name}" for alias in statement.names if alias.name != "*"]
    return modules
