"""The code's shape: imports point one way, and no file or class grows past what one reads in a sitting.

The graph is read from the source (every `import`, at the top of a file or inside a
function: a lazy import is still an arrow), one node per module. In milliseconds.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = {"fl_server", "fl_client", "fl_simulate", "demo"}  # what users run; nothing imports them
MAX_LINES = 250


def project_modules() -> dict[str, Path]:
    modules = {path.stem: path for path in ROOT.glob("*.py")}
    for path in (ROOT / "fedsock").glob("*.py"):
        modules["fedsock" if path.stem == "__init__" else f"fedsock.{path.stem}"] = path
    return modules


def import_graph() -> dict[str, set[str]]:
    """module -> the project's modules it imports."""
    modules = project_modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from fedsock import secagg` imports the module fedsock.secagg; `from fedsock import DATA_DIR`
                # the package itself
                targets = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                           for alias in node.names]
            else:
                continue
            graph[name] |= {target for target in targets if target in modules and target != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_nothing_in_the_package_imports_a_script():
    graph = import_graph()
    wrong = {name: sorted(targets & SCRIPTS) for name, targets in graph.items()
             if (name == "fedsock" or name.startswith("fedsock.")) and targets & SCRIPTS}
    assert wrong == {}


def test_there_is_no_import_cycle():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    # the check above is only as good as this
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_server_script_is_its_command_line_and_no_class_is_over_250_lines():
    assert len((ROOT / "fl_server.py").read_text().splitlines()) <= MAX_LINES
    long = []
    for path in [*project_modules().values(), *(ROOT / "bench").glob("*.py"), *(ROOT / "tests").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > MAX_LINES:
                long.append(f"{path.relative_to(ROOT)}: {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert long == []
