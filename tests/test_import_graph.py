"""Imports run one way: the module-level imports among deltatune's modules form no cycle.

A cycle works only while the modules happen to be imported in one order (a name read from a half-loaded module is
missing otherwise), and it hides which module is the foundation. The graph is read from the source with `ast`, so
it also covers modules no test imports. Imports inside functions are not edges: they run later, once the package
has loaded (deltatune keeps those only to defer a slow optional import, such as triton or transformers' Trainer).
"""

from __future__ import annotations

import ast
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[1] / "src"
# The public roots: `deltatune/__init__.py` re-exports the whole API (every module reaches it through its package
# parent, which is not an edge here), and `moved_modules.py` aliases the old import paths to every module.
ROOTS = {"deltatune", "deltatune.moved_modules"}


def module_files() -> dict[str, Path]:
    """{dotted module name: file} for every module under src/deltatune (a package is its `__init__.py`)."""
    files = {}
    for path in sorted((SOURCE / "deltatune").rglob("*.py")):
        parts = path.relative_to(SOURCE).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def is_type_checking_block(node: ast.stmt) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(test)


def module_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """The import statements that run when the module is imported: not in a function, not under TYPE_CHECKING
    (class bodies, `if` and `try` blocks at module level do run)."""
    found, pending = [], list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or is_type_checking_block(node):
            continue
        else:
            pending.extend(child for child in ast.iter_child_nodes(node) if isinstance(child, ast.stmt))
    return found


def imported_modules(node: ast.Import | ast.ImportFrom, importer: str, known: set[str]) -> set[str]:
    """The deltatune modules one import statement loads; `from a.b import c` is module a.b.c when c is one."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names if alias.name in known}
    base = node.module or ""
    if node.level:  # relative: resolved against the importer's package
        package = importer if importer in PACKAGES else importer.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{base}" if base else package
    if base not in known:
        return set()
    children = {f"{base}.{alias.name}" for alias in node.names} & known
    plain = [alias for alias in node.names if f"{base}.{alias.name}" not in known]
    return children | ({base} if plain else set())


FILES = module_files()
PACKAGES = {name for name, path in FILES.items() if path.name == "__init__.py"}


def import_graph() -> dict[str, set[str]]:
    """{module: the deltatune modules its module-level imports load}, the public roots left out."""
    known = set(FILES)
    graph = {}
    for name, path in FILES.items():
        if name in ROOTS:
            continue
        edges = set()
        for node in module_level_imports(ast.parse(path.read_text(), str(path))):
            edges |= imported_modules(node, name, known)
        graph[name] = edges - ROOTS - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (depth-first search keeping the current path)."""
    finished: set[str] = set()

    def visit(module: str, path: list[str]) -> list[str] | None:
        if module in path:
            return path[path.index(module) :] + [module]
        if module in finished:
            return None
        for dependency in sorted(graph.get(module, ())):
            cycle = visit(dependency, [*path, module])
            if cycle:
                return cycle
        finished.add(module)
        return None

    for module in sorted(graph):
        cycle = visit(module, [])
        if cycle:
            return cycle
    return None


def test_the_graph_is_read():
    graph = import_graph()
    # a few edges every layout of deltatune has, so a parser that finds nothing fails here
    assert "deltatune.core.registry" in graph["deltatune.core.config"]
    assert "deltatune.core.config" not in graph["deltatune.core.registry"]  # only under TYPE_CHECKING there
    assert "deltatune.core.registry" in graph["deltatune.methods"]
    assert "deltatune.methods.lora.lora" in graph["deltatune.methods"]  # the package re-exports its children
    assert "deltatune.methods" not in graph["deltatune.methods"]


def test_find_cycle_reports_the_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_core_imports_no_method():
    """The core knows methods only through the registry's hooks."""
    graph = import_graph()
    leaks = [
        f"{name} -> {dependency}"
        for name, dependencies in graph.items()
        if name.startswith("deltatune.core")
        for dependency in dependencies
        if dependency.startswith("deltatune.methods")
    ]
    assert leaks == []


def test_module_level_imports_have_no_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_core_tests_no_peft_type():
    """The core asks the registry's hooks, never `config.peft_type == PeftType.X`."""
    named = [
        f"{name}:{node.lineno} PeftType.{node.attr}"
        for name, path in FILES.items()
        if name.startswith("deltatune.core")
        for node in ast.walk(ast.parse(path.read_text(), str(path)))
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "PeftType"
    ]
    assert named == []
