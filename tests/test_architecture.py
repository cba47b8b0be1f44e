"""The shape of the code (docs/architecture.md): Prefect only in flows/, steps that import no other step, the
library beneath both, no import circle, modules of one concern and functions of a screen."""
import ast
import re
from pathlib import Path

import pytest

from tests.conftest import PROJECT

pytestmark = pytest.mark.fast

LAYERS = {"quantgate": 0, "tasks": 1, "flows": 2}  # each may import only from layers at or below its own
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 60


def sources(*packages: str) -> list[Path]:
    return sorted(p for package in packages for p in (PROJECT / package).rglob("*.py"))


def imports(path: Path) -> set[str]:
    """Every module a file imports, at its top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def module_name(path: Path) -> str:
    parts = path.relative_to(PROJECT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_prefect_is_imported_only_in_flows():
    outside = [str(p.relative_to(PROJECT)) for p in sources("quantgate", "tasks", "docs")
               if any(m == "prefect" or m.startswith("prefect.") for m in imports(p))]
    assert outside == []


def test_layers_import_downward_and_no_step_imports_another():
    wrong = []
    for path in sources(*LAYERS):
        mine = module_name(path)
        for imported in imports(path):
            top = imported.split(".")[0]
            if top in LAYERS and LAYERS[top] > LAYERS[mine.split(".")[0]] and mine != "quantgate.cli":
                wrong.append(f"{mine} imports {imported} (a layer above)")
            if mine.startswith("tasks.") and top == "tasks" and imported.split(".")[:2] != mine.split(".")[:2]:
                wrong.append(f"{mine} imports {imported} (another step)")
    assert wrong == []


def test_no_import_circle():
    names = {module_name(p): p for p in sources(*LAYERS)}
    graph = {name: {m for m in imports(path) if m in names and m != name} for name, path in names.items()}
    cycles, seen = [], set()

    def visit(node, stack):
        if node in stack:
            cycles.append(stack[stack.index(node):] + [node])
            return
        if node in seen:
            return
        seen.add(node)
        for nxt in sorted(graph[node]):
            visit(nxt, stack + [node])

    for name in sorted(graph):
        visit(name, [])
    # A package importing its own plugin modules (backends, evaluations) is how they register: not a circle of
    # concerns, and each plugin imports the package's interface only.
    cycles = [c for c in cycles if not any(re.fullmatch(r"quantgate\.(backends|evaluations)", m) for m in c)]
    assert cycles == []


def test_modules_and_functions_stay_short():
    long_modules, long_functions = [], []
    for path in sources("quantgate", "tasks", "flows"):
        text = path.read_text()
        if text.count("\n") > MAX_MODULE_LINES:
            long_modules.append(f"{path.relative_to(PROJECT)}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long_functions.append(f"{path.relative_to(PROJECT)}:{node.lineno} {node.name}: {length} lines")
    assert long_modules == [] and long_functions == []
