"""The engine's model package imports one way: no module of ``engine_core.model`` reaches
itself through its imports, deferred (in-function) imports included; imports for type
checking only (``if TYPE_CHECKING:``) never run and do not count."""

from __future__ import annotations

import ast
from pathlib import Path

MODEL = Path(__file__).resolve().parents[2] / "engine_core" / "model"
PACKAGE = "engine_core.model"


def _nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node but those under ``if TYPE_CHECKING:``."""
    out: list[ast.AST] = []
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            continue
        out += [node, *_nodes(node)]
    return out


def _imports(path: Path) -> set[str]:
    found = set()
    for node in _nodes(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == PACKAGE:  # from engine_core.model import x
                found |= {f"{PACKAGE}.{alias.name}" for alias in node.names}
            elif node.module.startswith(PACKAGE + "."):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith(PACKAGE + ".")}
    return found


def test_no_import_circle_in_the_model_package() -> None:
    modules = {f"{PACKAGE}.{p.stem}" for p in MODEL.glob("*.py") if p.stem != "__init__"}
    graph = {f"{PACKAGE}.{p.stem}": _imports(p) & modules for p in MODEL.glob("*.py")}
    assert len(graph) > 10  # the package was read

    def reaches(start: str, target: str, seen: set[str]) -> bool:
        for nxt in graph.get(start, ()):
            if nxt == target or (nxt not in seen and reaches(nxt, target, seen | {nxt})):
                return True
        return False

    circles = sorted(m for m in modules if reaches(m, m, {m}))
    assert circles == []
