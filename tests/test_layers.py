"""The layer rules of ARCHITECTURE.md, checked on the source: arrows only point down.

Every package of ours may import only the packages listed under it in ``MAY_IMPORT`` (and the
third-party libraries it is not denied); the allowed imports form a DAG, so there can be no
package cycle. There are no exceptions and no special modules: a rule holds for every file of
its package.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

OURS = {"floor", "dp", "mpc", "gossip", "p2p", "simulator", "murmur"}

# package -> the packages of ours it may import (itself always)
MAY_IMPORT: dict[str, set[str]] = {
    "floor": set(),
    "dp": {"floor"},
    "mpc": {"floor"},
    "gossip": {"floor", "dp", "mpc"},
    "p2p": {"floor", "dp", "mpc", "gossip"},
    "simulator": {"floor", "dp", "mpc", "gossip"},
    "murmur": {"floor", "dp", "mpc", "gossip", "p2p", "simulator"},
}

# package -> third-party or stdlib names it must never import
DENIED: dict[str, set[str]] = {
    "floor": {"aiohttp"},
    "dp": {"aiohttp", "asyncio"},
    "mpc": {"aiohttp", "asyncio"},
    "gossip": {"aiohttp"},
    "simulator": {"aiohttp"},
}


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


@pytest.mark.parametrize("package", sorted(MAY_IMPORT))
def test_arrows_point_down(package: str) -> None:
    allowed = MAY_IMPORT[package] | {package}
    denied = DENIED.get(package, set())
    bad: list[str] = []
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no package {package}"
    for path in files:
        for name in _imports(path):
            top = name.split(".")[0]
            if (top in OURS and top not in allowed) or top in denied:
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, "\n".join(bad)


def test_the_allowed_imports_have_no_cycle() -> None:
    seen: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(package: str, path: tuple[str, ...]) -> None:
        state = seen.get(package)
        assert state != 1, "cycle: " + " -> ".join((*path, package))
        if state == 2:
            return
        seen[package] = 1
        for below in sorted(MAY_IMPORT[package]):
            visit(below, (*path, package))
        seen[package] = 2

    for package in sorted(MAY_IMPORT):
        visit(package, ())


@pytest.mark.parametrize("package", sorted(MAY_IMPORT))
def test_no_lazy_import_machinery(package: str) -> None:
    """No module-level ``__getattr__`` and no imports hidden behind ``TYPE_CHECKING``."""
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name == "__getattr__":
                bad.append(f"{path.relative_to(ROOT)}: module __getattr__")
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                bad.append(f"{path.relative_to(ROOT)}: imports under TYPE_CHECKING")
            if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Tuple) and "__getattr__" in ast.unparse(t) for t in node.targets
            ):
                bad.append(f"{path.relative_to(ROOT)}: module __getattr__")
    assert not bad, "\n".join(bad)
