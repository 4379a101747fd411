"""The import rules of docs/architecture.md, read from the source with ``ast``.

1. The modules of the ``gunn`` package import each other without a cycle. Every
   ``import``/``from ... import`` of a gunn module counts, wherever it stands: at module
   level, inside a function, under ``if TYPE_CHECKING:`` or in a ``try``.
2. Each module imports only from its own floor or the floors below it (layers, then models,
   then data and train, then the orchestration packages on top).
3. ``gunn.layers.fastpath`` imports only ``gradual``, ``fused`` and ``cpu_kernels``.
4. submitit is imported only by the orchestration packages, Ray only by the sweeps.
5. The package imports no script or test, and the scripts in ``jobs/`` and ``pipelines/``
   import from gunn and libraries only: no script imports another one, and none puts a
   folder on ``sys.path``.

The package is walked as it is on disk, so new modules and packages are covered as they appear.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "gunn"
SCRIPT_FOLDERS = ("jobs", "pipelines")

# docs/architecture.md: the floors, lowest first. A module may import its own floor and the
# floors below it. Modules not named here (``gunn`` itself) sit on the top floor.
FLOORS: tuple[tuple[str, ...], ...] = (
    ("gunn.layers",),
    ("gunn.models",),
    ("gunn.config", "gunn.presets", "gunn.data", "gunn.diagnostics"),
    ("gunn.train",),
    ("gunn.bench", "gunn.cluster"),
    ("gunn.sweeps",),
)

# docs/architecture.md: third-party libraries that only these packages may import.
LIBRARIES = {
    "submitit": ("gunn.cluster", "gunn.sweeps"),
    "ray": ("gunn.sweeps",),
}


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    line: int

    def __str__(self) -> str:
        return f"{self.source} imports {self.target} (line {self.line})"


def module_files(package: Path = PACKAGE) -> dict[str, Path]:
    """Every module of the package by dotted name; a package by its ``__init__``."""
    modules = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The module ``name`` or, for a name inside a module (a class, a function), its
    longest prefix that is a module; None outside the package."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> list[Edge]:
    """The gunn modules ``module`` imports, anywhere in its file.

    ``import a.b`` imports ``a.b``; ``from a import b`` imports ``a.b`` where that is a module
    and ``a`` otherwise (b is then a name defined in a). Relative imports are resolved
    against the module's package. A package's ``__init__`` that runs on the way to one of
    its submodules is not an edge: every submodule import would otherwise lead back to the
    package that re-exports it.
    """
    is_package = path.name == "__init__.py"
    package_parts = module.split(".") if is_package else module.split(".")[:-1]
    edges = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package_parts[: len(package_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for name in targets:
            target = _resolve(name, modules)
            if target is not None and target != module:
                edges.append(Edge(module, target, node.lineno))
    return edges


def import_graph(package: Path = PACKAGE) -> dict[str, list[Edge]]:
    modules = module_files(package)
    return {module: imports_of(module, path, modules) for module, path in modules.items()}


def find_cycle(graph: dict[str, list[Edge]]) -> list[Edge] | None:
    """One import cycle as its edges, or None (depth-first search, modules in sorted order)."""
    state: dict[str, str] = {}  # "open" while on the search path, "done" after
    path: list[Edge] = []

    def visit(module: str) -> list[Edge] | None:
        state[module] = "open"
        for edge in sorted(graph.get(module, []), key=lambda e: (e.target, e.line)):
            if state.get(edge.target) == "open":
                start = next(i for i, e in enumerate(path) if e.source == edge.target) if path else 0
                return path[start:] + [edge]
            if edge.target not in state:
                path.append(edge)
                found = visit(edge.target)
                if found:
                    return found
                path.pop()
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state:
            found = visit(module)
            if found:
                return found
    return None


def describe(cycle: list[Edge]) -> str:
    chain = " -> ".join([cycle[0].source] + [edge.target for edge in cycle])
    return chain + "\n" + "\n".join(f"  {edge}" for edge in cycle)


def floor_of(module: str) -> int:
    for level, names in enumerate(FLOORS):
        if any(module == name or module.startswith(name + ".") for name in names):
            return level
    return len(FLOORS)


# -- the package ------------------------------------------------------------------------------


def test_the_graph_sees_function_level_relative_and_type_checking_imports(tmp_path):
    package = tmp_path / "gunn"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from gunn.sub.a import A\n")
    (package / "sub" / "a.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import B\nclass A: ...\n"
    )
    (package / "sub" / "b.py").write_text("def f():\n    from gunn.sub import a\n    return a\n")
    (package / "top.py").write_text("from .sub import A\nimport gunn.sub.b\n")
    graph = import_graph(package)
    assert {str(e.target) for e in graph["gunn.top"]} == {"gunn.sub", "gunn.sub.b"}
    assert [e.target for e in graph["gunn.sub.a"]] == ["gunn.sub.b"]
    assert [e.target for e in graph["gunn.sub.b"]] == ["gunn.sub.a"]
    cycle = find_cycle(graph)
    assert cycle is not None
    assert describe(cycle).splitlines()[0] == "gunn.sub.a -> gunn.sub.b -> gunn.sub.a"


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert "gunn.layers.fastpath" in graph and "gunn.train.engine" in graph  # the walk found the package
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle in the gunn package:\n" + describe(cycle)


def test_the_fast_path_depends_on_the_kernels_not_on_the_layer():
    targets = {edge.target for edge in import_graph()["gunn.layers.fastpath"]}
    assert targets <= {"gunn.layers.gradual", "gunn.layers.fused", "gunn.layers.cpu_kernels"}, targets


def test_every_module_imports_its_own_floor_or_the_floors_below():
    upward = [
        f"{edge} [floor {floor_of(edge.source)} -> {floor_of(edge.target)}]"
        for edges in import_graph().values()
        for edge in edges
        if floor_of(edge.target) > floor_of(edge.source)
    ]
    assert not upward, "imports that go up a floor (docs/architecture.md):\n" + "\n".join(upward)


def absolute_imports() -> list[tuple[str, str, int]]:
    """(module, imported name, line) for every absolute import in the package."""
    found = []
    for module, path in module_files().items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names = [node.module]
            found += [(module, name, node.lineno) for name in names]
    return found


def test_libraries_are_imported_where_they_belong():
    found = []
    for module, name, line in absolute_imports():
        allowed = LIBRARIES.get(name.split(".")[0])
        if allowed is not None and not any(module == a or module.startswith(a + ".") for a in allowed):
            found.append(f"{module} imports {name} (line {line}); allowed in {', '.join(allowed)}")
    assert not found, "\n".join(found)


def test_the_package_imports_no_script_or_test():
    local = {"jobs", "pipelines", "tests"}
    found = [f"{module} imports {name} (line {line})" for module, name, line in absolute_imports()
             if name.split(".")[0] in local]
    assert not found, "\n".join(found)


# -- the scripts ------------------------------------------------------------------------------


def script_files() -> list[Path]:
    return sorted(path for folder in SCRIPT_FOLDERS for path in (REPO / folder).glob("*.py"))


def script_problems(path: Path, scripts: set[str], root: Path = REPO) -> list[str]:
    """What in a script breaks rule 3: imports of other scripts, relative imports, sys.path."""
    local = scripts | set(SCRIPT_FOLDERS) | {"tests"}
    problems = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        where = f"{path.relative_to(root)}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            problems += [f"{where} imports {a.name}" for a in node.names if a.name.split(".")[0] in local]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                problems.append(f"{where} has a relative import")
            elif node.module and node.module.split(".")[0] in local:
                problems.append(f"{where} imports from {node.module}")
        elif isinstance(node, ast.Attribute) and node.attr == "path" and getattr(node.value, "id", None) == "sys":
            problems.append(f"{where} uses sys.path")
    return problems


def test_the_script_check_sees_script_imports_and_sys_path(tmp_path):
    script = tmp_path / "sweep.py"
    script.write_text("import sys\nsys.path.insert(0, 'jobs')\nimport launch\nfrom gunn import config\n")
    problems = script_problems(script, {"launch", "sweep"}, tmp_path)
    assert sorted(problems) == ["sweep.py:2 uses sys.path", "sweep.py:3 imports launch"]


def test_scripts_import_from_gunn_and_libraries_only():
    # Rule 5: the scripts are thin; their code lives in gunn/cluster and gunn/sweeps.
    files = script_files()
    scripts = {path.stem for path in files}
    problems = [problem for path in files for problem in script_problems(path, scripts)]
    assert not problems, "scripts that import other scripts or change sys.path:\n" + "\n".join(problems)
