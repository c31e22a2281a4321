"""The layer rules of ARCHITECTURE.md, checked on the source: arrows only point down."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# package -> top-level names it must never import
FORBIDDEN: dict[str, set[str]] = {
    "murmur": {"p2p", "gossip", "mpc", "dp", "simulator", "aiohttp", "torch"},
    "dp": {"p2p", "gossip", "mpc", "simulator", "aiohttp", "asyncio"},
    "mpc": {"p2p", "gossip", "dp", "simulator", "aiohttp", "asyncio"},
    "gossip": {"simulator", "aiohttp"},
    "p2p": {"simulator"},
}

# murmur/api*.py (the Python API) sits above every layer; the rest of murmur/ is the bottom.
TOP_OF_MURMUR = ("api",)

# p2p modules gossip may use: the bottom of p2p (identity, wire format, transport interface).
GOSSIP_MAY_IMPORT_FROM_P2P = {
    "p2p.identity",
    "p2p.codec",
    "p2p.messages",
    "p2p.envelope",
    "p2p.transport.base",
    "p2p.transport.memory",
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


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_arrows_point_down(package: str) -> None:
    bad: list[str] = []
    for path in sorted((ROOT / package).rglob("*.py")):
        if package == "murmur" and path.stem.startswith(TOP_OF_MURMUR):
            continue
        for name in _imports(path):
            top = name.split(".")[0]
            if top in FORBIDDEN[package]:
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
            if (
                package == "gossip"
                and top == "p2p"
                and not any(
                    name == m or name.startswith(m + ".") for m in GOSSIP_MAY_IMPORT_FROM_P2P
                )
            ):
                bad.append(f"{path.relative_to(ROOT)} imports {name} (above p2p's bottom)")
    assert not bad, "\n".join(bad)
