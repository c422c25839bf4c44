"""The package's import graph: imports flow one way (no cycle) and no module uses another module's private names.

Read from the source with `ast`, function-level imports included (they are still dependencies), imports under
`if TYPE_CHECKING:` left out (annotations only, never executed).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "uipe"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def _imports(name: str) -> list[tuple[str, list[str]]]:
    """(imported uipe module, names taken from it) for every executed import in module `name`."""
    path = MODULES[name]
    tree = ast.parse(path.read_text())
    skip = _type_checking_lines(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
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
                out.append((sub, []) if sub in MODULES else (base, [alias.name]))
    return out


def _graph() -> dict[str, set[str]]:
    return {m: {target for target, _ in _imports(m) if target in MODULES and target != m} for m in MODULES}


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
