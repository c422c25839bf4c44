"""The package's import graph: imports flow one way (no cycle) and no module uses another module's private names.

Read from the source with `ast`, function-level imports and imports under `if TYPE_CHECKING:` included: neither
runs at import time, but both are dependencies of the design, and a cycle hidden behind either is still a cycle.
"""

from __future__ import annotations

import ast
from collections.abc import Collection, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "uipe"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _imports_in(source: str, name: str, is_package: bool, modules: Collection[str]) -> list[tuple[str, list[str]]]:
    """(imported uipe module, names taken from it) for every import in the source of module `name`."""
    package = name if is_package else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name.startswith("uipe")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if not base.startswith("uipe"):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.append((sub, []) if sub in modules else (base, [alias.name]))
    return out


def _imports(name: str) -> list[tuple[str, list[str]]]:
    path = MODULES[name]
    return _imports_in(path.read_text(), name, path.name == "__init__.py", MODULES)


def _graph_of(sources: Mapping[str, str], packages: Collection[str] = ()) -> dict[str, set[str]]:
    """module -> the modules it imports, from each module's source text (`packages`: the names that are __init__)."""
    return {m: {t for t, _ in _imports_in(src, m, m in packages, sources) if t in sources and t != m}
            for m, src in sources.items()}


def _graph() -> dict[str, set[str]]:
    sources = {m: p.read_text() for m, p in MODULES.items()}
    return _graph_of(sources, {m for m, p in MODULES.items() if p.name == "__init__.py"})


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_the_import_graph_has_no_cycle() -> None:
    graph = _graph()
    assert len(graph) > 30  # the walk found the package
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_a_cycle_behind_type_checking_is_a_cycle() -> None:
    hidden = "from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from uipe.b import B\n"
    lazy = "def f():\n    from uipe import a\n"
    graph = _graph_of({"uipe.a": hidden, "uipe.b": lazy})
    assert graph == {"uipe.a": {"uipe.b"}, "uipe.b": {"uipe.a"}}
    assert _cycle(graph) == ["uipe.a", "uipe.b", "uipe.a"]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_imports_another_modules_private_names(module: str) -> None:
    private = [f"{target}.{n}" for target, names in _imports(module) for n in names
               if n.startswith("_") and not n.startswith("__") and target != module]
    assert not private, f"{module} imports private names: {', '.join(private)}"


def test_every_imported_name_exists() -> None:
    """Function-level imports run only when their function does: check each named import resolves now."""
    import importlib

    missing = []
    for module in MODULES:
        for target, names in _imports(module):
            mod = importlib.import_module(target)
            missing += [f"{module}: {target}.{n}" for n in names if n != "*" and not hasattr(mod, n)]
    assert not missing, "\n".join(missing)


# The layers, lowest first (ARCHITECTURE.md): a module imports only from its own layer or a lower one. A new module
# must be placed here, which is the point: where it sits is a decision, not an accident.
LAYERS = (
    ("foundation", ("uipe", "uipe.errors", "uipe.schema", "uipe.paths", "uipe.io", "uipe.stages", "uipe.progress",
                    "uipe.console", "uipe.faults", "uipe.metrics", "uipe.ray_session", "uipe.signals",
                    "uipe.safetensors_io", "uipe.shard_pipeline", "uipe.coefficients", "uipe.extrapolate", "uipe.update_vector",
                    "uipe.checkpoint", "uipe.prompts", "uipe.models")),
    ("domain", ("uipe.config", "uipe.data", "uipe.methods", "uipe.eval", "uipe.tiny_model", "uipe.gate")),
    ("benchmarks", ("uipe.benchmarks",)),
    ("results", ("uipe.results", "uipe.decisions", "uipe.report", "uipe.tracking", "uipe.model_registry",
                 "uipe.tables")),
    ("stages", ("uipe.train", "uipe.search")),
    ("recipes", ("uipe.pipeline", "uipe.study", "uipe.evaluation")),
    ("cli", ("uipe.cli",)),
)


def _layer(module: str) -> int:
    """The layer of the longest prefix naming the module (a package's entry covers its modules)."""
    best = (-1, -1)
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".") and p != "uipe") and len(p) > best[1]:
                best = (i, len(p))
    return best[0]


def test_every_module_has_a_layer() -> None:
    unplaced = [m for m in MODULES if _layer(m) < 0]
    assert not unplaced, f"place these modules in LAYERS: {', '.join(unplaced)}"


def test_no_module_imports_from_a_higher_layer() -> None:
    graph = _graph()
    upward = [f"{m} ({LAYERS[_layer(m)][0]}) -> {t} ({LAYERS[_layer(t)][0]})"
              for m, targets in sorted(graph.items()) for t in sorted(targets) if _layer(t) > _layer(m)]
    assert not upward, "imports that climb a layer:\n" + "\n".join(upward)


def test_the_layer_check_sees_an_upward_import() -> None:
    assert _layer("uipe.search.driver") > _layer("uipe.report") > _layer("uipe.config")
    assert _layer("uipe.report.extra") == _layer("uipe.report") and _layer("uipe") == 0
