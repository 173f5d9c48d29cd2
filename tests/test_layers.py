"""Imports go one way (STYLE.md §3, rule 2): each module imports only from modules listed above it in ``LAYERS``.

The rule, as this test reads every module of ``keydiff/`` with ``ast``:

- **Module-level imports** (including ``try``/``if`` blocks at module level) go only to a module listed above.
- **Function-level imports** go to a module listed above too (deferred only so that ``--help`` and header-only
  diffs start fast), with two exceptions that are not part of the flow: a **presenter** in ``keydiff._render``
  (results present themselves through a one-line lazy import: ``Diff.to_markdown``, ``ValueDiff.__rich_console__``),
  and ``from keydiff import __version__`` (the package is imported before any of its modules' functions can run).
- **Imports under ``if TYPE_CHECKING:``** name types for annotations and never run: not checked.
- Relative imports are not used.

A new module fails the test until it is given its place in ``LAYERS``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "keydiff"

LAYERS = [
    # leaf values and vocabularies: nothing internal
    "keydiff._errors",
    "keydiff._keys",
    "keydiff._conventions",
    "keydiff._ops",
    "keydiff._plain",
    # key structure and the mapping value
    "keydiff._patterns",
    "keydiff._mapping",
    "keydiff._normalize",
    "keydiff._account",
    "keydiff._diagnose",
    "keydiff._match",
    "keydiff._fold",
    "keydiff._ties",
    "keydiff._weightnorm",
    "keydiff._stacking",
    # reading inputs
    "keydiff._hub",
    "keydiff._parallel",
    "keydiff._sources",
    "keydiff._background",
    "keydiff._cache",
    "keydiff._dataflow",
    "keydiff._layouts",
    "keydiff._model",
    # writing and running
    "keydiff._writer",
    "keydiff._convert",
    "keydiff._verify",
    # tensor statistics, then the engine, then value comparison (which runs the engine)
    "keydiff._stats",
    "keydiff._diff",
    "keydiff._values",
    # proving a mapping by running both models (runs the engine's values)
    "keydiff._repair",
    # which model a checkpoint is: the timm index, then the search (runs the engine)
    "keydiff._index",
    "keydiff._find",
    # presenters: imported by the values above only inside their presenting methods
    "keydiff._render",
    "keydiff._render._keytext",
    "keydiff._render._blocks",
    "keydiff._render._html",
    "keydiff._render._markdown",
    "keydiff._render._group",
    "keydiff._render._python",
    "keydiff._render._transformers",
    "keydiff._render._rich",
    "keydiff._render._frame",
    "keydiff._render._values",
    "keydiff._render._find",
    # entry points
    "keydiff.cli",
    "keydiff",
    "keydiff.__main__",
]
"""Lowest first: a module may import any module listed before it."""

PRESENTERS = "keydiff._render"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, ast.Module]:
    return {_module_name(p): ast.parse(p.read_text(), filename=str(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def _targets(node: ast.stmt, known: set[str]) -> list[tuple[str, str]]:
    """The keydiff modules an import statement loads, each with the imported name (``from keydiff import x``)."""
    if isinstance(node, ast.Import):
        return [(a.name, "") for a in node.names if a.name.split(".")[0] == "keydiff"]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:
        return [(f"relative import from {node.module}", "")]
    if node.module is None or node.module.split(".")[0] != "keydiff":
        return []
    # ``from keydiff._render import _rich`` loads the submodule; ``from keydiff._keys import KeySet`` a name
    return [(f"{node.module}.{a.name}", "") if f"{node.module}.{a.name}" in known else (node.module, a.name)
            for a in node.names]


def _is_type_checking(node: ast.stmt) -> bool:
    return isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")


def imports(tree: ast.Module, known: set[str]) -> list[tuple[int, str, str, bool]]:
    """Every keydiff import of a module: ``(line, target module, imported name, inside a function)``."""
    found: list[tuple[int, str, str, bool]] = []

    def walk(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if _is_type_checking(child):
                continue  # annotations only: never executed
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.stmt):
                found.extend((child.lineno, t, name, inner) for t, name in _targets(child, known))
            walk(child, inner)

    walk(tree, False)
    return found


def violations(modules: dict[str, ast.Module], layers: list[str]) -> list[str]:
    """Every import that breaks the rule in the module docstring, as ``module:line imports target (why)``."""
    rank = {m: i for i, m in enumerate(layers)}
    out = []
    for module, tree in modules.items():
        for line, target, name, in_function in imports(tree, set(modules)):
            where = f"{module}:{line} imports {target}"
            if target not in rank:
                out.append(f"{where}: not a listed module")
            elif rank[target] < rank[module]:
                continue
            elif not in_function:
                out.append(f"{where} at module level: a higher layer")
            elif not (target.startswith(PRESENTERS) or (target == "keydiff" and name == "__version__")):
                out.append(f"{where} in a function: a higher layer, and not a presenter")
    return sorted(out)


def test_every_module_has_a_layer():
    modules = _modules()
    assert sorted(set(modules) - set(LAYERS)) == [], "give each new module its place in LAYERS"
    assert sorted(set(LAYERS) - set(modules)) == [], "LAYERS names a module that no longer exists"
    assert len(LAYERS) == len(set(LAYERS))


def test_imports_go_one_way():
    assert violations(_modules(), LAYERS) == []


@pytest.mark.parametrize(("source", "expected"), [
    ("from keydiff._diff import Diff", ["keydiff._keys:1 imports keydiff._diff at module level: a higher layer"]),
    ("def f():\n    from keydiff._diff import diff",
     ["keydiff._keys:2 imports keydiff._diff in a function: a higher layer, and not a presenter"]),
    ("def f():\n    from keydiff._render import _rich", []),
    ("def f():\n    from keydiff import __version__", []),
    ("from keydiff import __version__", ["keydiff._keys:1 imports keydiff at module level: a higher layer"]),
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from keydiff._diff import Diff", []),
    ("import keydiff._errors", []),
    ("from . import _errors", ["keydiff._keys:1 imports relative import from None: not a listed module"]),
])
def test_the_rule_itself(source, expected):
    modules = {m: ast.parse("") for m in LAYERS}
    modules["keydiff._keys"] = ast.parse(source)
    assert violations(modules, LAYERS) == expected
