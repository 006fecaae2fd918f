"""The package's import graph: no cycles, and the compiler core never imports the evaluation side.

Read from the source with ``ast`` (every ``import``, also those inside functions), so the test
sees imports that a lazy import would hide at run time.
"""

import ast
from pathlib import Path

import atedm_compile

PACKAGE = Path(atedm_compile.__file__).parent
# The evaluation side: the captioned-shapes kit and the `evaluate` command. It may import the core.
EVALUATION = ("atedm_compile.shapes", "atedm_compile.evaluate")
# The command line puts every command, the evaluation side's too, under one program.
APPLICATION = ("atedm_compile.cli",)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The package modules that ``path`` imports (a package's ``__init__`` counts as the package)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            base = f"{base}.{node.module}" if node.level and node.module else (base if node.level else node.module)
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imports_of(p, modules) for p in paths}


def in_group(name: str, group: tuple[str, ...]) -> bool:
    return any(name == g or name.startswith(g + ".") for g in group)


def test_the_graph_reader_sees_relative_and_lazy_imports():
    graph = import_graph()
    assert "atedm_compile.runner" in graph["atedm_compile.flops"]  # from .runner import ...
    assert "atedm_compile.sizes" in graph["atedm_compile.export.runtime"]  # inside plan_run()
    assert "atedm_compile.models" in graph["atedm_compile.evaluate.run"]  # from ..models, inside a function


def test_no_import_cycles():
    graph = import_graph()
    # A package importing its own submodules (``__init__`` re-exports) is no cycle of design:
    # leave those edges out, then look for any path back to where it started.
    edges = {m: {t for t in targets if not (t.startswith(m + ".") and graph.get(m) is not None
                                            and (PACKAGE.parent / (m.replace(".", "/") + "/__init__.py")).exists())}
             for m, targets in graph.items()}
    cycles = []
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(edges.get(module, ())):
            if state.get(target) == 1:
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert not cycles, cycles


def test_the_core_never_imports_the_evaluation_side():
    graph = import_graph()
    offenders = {module: sorted(t for t in targets if in_group(t, EVALUATION))
                 for module, targets in graph.items()
                 if not in_group(module, EVALUATION + APPLICATION)}
    assert {m: t for m, t in offenders.items() if t} == {}
