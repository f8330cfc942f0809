"""The shape the code keeps: flows/ holds thin entry points, the package's modules import each
other without cycles, and the notebooks use only the package's public names."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT_DIR = Path(__file__).resolve().parents[2]
FLOW_SCRIPTS = sorted((PROJECT_DIR / "flows").glob("*.py"))
PACKAGE_DIR = PROJECT_DIR / "src" / "taxi_duration"
MAX_PIPELINE_SCRIPT_LINES = 250


def _is_main_guard(node: ast.stmt) -> bool:
    return (
        isinstance(node, ast.If)
        and isinstance(node.test, ast.Compare)
        and isinstance(node.test.left, ast.Name)
        and node.test.left.id == "__name__"
    )


@pytest.mark.parametrize("script", FLOW_SCRIPTS, ids=lambda path: path.name)
def test_flow_scripts_are_imports_then_a_main_guard_at_the_end(script):
    body = ast.parse(script.read_text()).body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # the docstring
    if body and _is_main_guard(body[-1]):
        body = body[:-1]
    allowed = (ast.Import, ast.ImportFrom)
    for node in body:
        is_all = isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["__all__"]
        assert isinstance(node, allowed) or is_all, (
            f"{script.name} line {node.lineno}: only imports before the main guard"
        )
    assert not any(_is_main_guard(node) for node in body), f"{script.name}: the main guard comes last"


def test_the_flows_import_without_path_edits_and_load_as_prefect_loads_the_entrypoint():
    # In a fresh process: the package's flows import as any module does (a Dask worker needs
    # no PYTHONPATH), and the entrypoint loads as a Prefect worker loads it.
    code = (
        "import sys\n"
        "before = list(sys.path)\n"
        "from taxi_duration.orchestration.backfill import backfill\n"
        "from taxi_duration.orchestration.pipeline import taxi_duration_pipeline\n"
        "assert sys.path == before, set(sys.path) ^ set(before)\n"
        "from prefect.flows import load_flow_from_entrypoint\n"
        "flow = load_flow_from_entrypoint('flows/pipeline.py:taxi_duration_pipeline', use_placeholder_flow=False)\n"
        "print(flow.name, backfill.name, flow.fn is taxi_duration_pipeline.fn)\n"
    )
    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    completed = subprocess.run(
        [sys.executable, "-c", code], cwd=PROJECT_DIR, env=env, capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.split("\n")[-2] == "nyc-taxi-duration nyc-taxi-duration-backfill True"


def test_flow_scripts_stay_thin():
    for script in FLOW_SCRIPTS:
        assert len(script.read_text().splitlines()) <= MAX_PIPELINE_SCRIPT_LINES, script.name


def _module_name(path: Path) -> str:
    parts = path.relative_to(PROJECT_DIR / "src").with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_import_graph() -> dict[str, set[str]]:
    """Each module of the package and the package modules it imports at module level.

    Imports inside functions (deferred for start-up time) and under `if TYPE_CHECKING:` run
    after every module has loaded, so they cannot make an import cycle.
    """
    paths = {_module_name(path): path for path in PACKAGE_DIR.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        imported: set[str] = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names if alias.name in paths)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, *([node.module] if node.module else [])])
                for alias in node.names:
                    target = f"{base}.{alias.name}"
                    imported.add(target if target in paths else base)
        graph[name] = {module for module in imported if module in paths and module != name}
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    lowest: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = lowest[module] = len(index)
        stack.append(module)
        for imported in sorted(graph[module]):
            if imported not in index:
                visit(imported)
                lowest[module] = min(lowest[module], lowest[imported])
            elif imported in stack:
                lowest[module] = min(lowest[module], index[imported])
        if lowest[module] == index[module]:
            group = [stack.pop()]
            while group[-1] != module:
                group.append(stack.pop())
            if len(group) > 1:
                cycles.append(sorted(group))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return cycles


def test_the_package_has_no_import_cycle():
    graph = package_import_graph()
    assert len(graph) > 30 and graph["taxi_duration.data.tripfiles"] >= {"taxi_duration.settings"}, "the graph is read"
    assert import_cycles(graph) == []


def test_an_import_cycle_is_found():
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _notebook_code(notebook: Path) -> ast.Module:
    cells = [cell for cell in json.loads(notebook.read_text())["cells"] if cell["cell_type"] == "code"]
    lines = [line for cell in cells for line in "".join(cell["source"]).splitlines() if not line.startswith(("%", "!"))]
    return ast.parse("\n".join(lines))


@pytest.mark.parametrize("notebook", sorted((PROJECT_DIR / "notebooks").glob("*.ipynb")), ids=lambda path: path.name)
def test_notebooks_use_only_the_package_public_names(notebook):
    code = _notebook_code(notebook)
    modules: set[str] = set()
    private: list[str] = []
    for node in ast.walk(code):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("taxi_duration"):
            private += [f"{node.module}.{alias.name}" for alias in node.names if alias.name.startswith("_")]
            if any(part.startswith("_") for part in node.module.split(".")):
                private.append(node.module)
            modules.update(alias.asname or alias.name for alias in node.names)
    for node in ast.walk(code):
        is_package_name = (
            isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules
        )
        if is_package_name and node.attr.startswith("_"):
            private.append(f"{node.value.id}.{node.attr}")
    assert modules, "the notebook imports the package"
    assert private == [], f"{notebook.name} reaches into private names: {private}"


def test_no_module_reaches_into_another_modules_private_names():
    modules = {_module_name(path).rpartition(".")[2] for path in PACKAGE_DIR.rglob("*.py")}
    reaches = []
    for path in [*PACKAGE_DIR.rglob("*.py"), *FLOW_SCRIPTS]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("taxi_duration"):
                reaches += [f"{path.name}: {alias.name}" for alias in node.names if alias.name.startswith("_")]
            is_module_attribute = (
                isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules
            )
            if is_module_attribute and node.attr.startswith("_") and not node.attr.startswith("__"):
                reaches.append(f"{path.name}: {node.value.id}.{node.attr}")
    assert reaches == []


def _module_stems() -> list[str]:
    return sorted(path.stem for path in PACKAGE_DIR.rglob("*.py") if path.stem != "__init__")


def test_the_top_folder_holds_fifteen_modules_at_most_the_rest_in_subpackages():
    top = sorted(path.stem for path in PACKAGE_DIR.glob("*.py") if path.stem != "__init__")
    subpackages = sorted(path.name for path in PACKAGE_DIR.iterdir() if (path / "__init__.py").is_file())
    assert len(top) <= 15, top
    assert len(subpackages) >= 5 and len(_module_stems()) > 3 * len(top), (top, subpackages)


def test_no_two_modules_share_a_name_or_differ_only_by_a_suffix():
    stems = _module_stems()
    assert sorted(set(stems)) == stems, [stem for stem in stems if stems.count(stem) > 1]
    assert [(short, long) for short in stems for long in stems if short != long and long.startswith(short)] == []


def test_stage_names_appear_in_the_package_nowhere_the_declarations_file_names_them():
    import yaml

    declarations = yaml.safe_load((PROJECT_DIR / "notebooks" / "pipeline.yaml").read_text())
    names = {stage for stages in declarations["pipelines"].values() for stage in stages}
    assert len(names) >= 4, "the declarations are read"
    found = [
        f"{path.relative_to(PROJECT_DIR)}:{number}: {line.strip()}"
        for path in sorted(PACKAGE_DIR.rglob("*"))
        if path.suffix in (".py", ".j2", ".json", ".csv")
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if any(name in line for name in names)
    ]
    assert found == []
