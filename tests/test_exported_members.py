"""Every package lists its public API in ``__all__``: nothing missing, nothing extra, documented.

Like httpx's ``tests/test_exported_members.py``: a public name reachable on a package must be in
its ``__all__``, every name in ``__all__`` must resolve (lazy exports included), and every
exported class and function carries a docstring. Packages whose modules are imported by name
(``floor``, ``p2p``) keep ``__init__`` light, so that their command-line tools answer fast.
"""

from __future__ import annotations

import importlib
import inspect
import subprocess
import sys
import types

import pytest

PACKAGES = (
    "murmur",
    "murmur.errors",
    "floor",
    "floor.errors",
    "floor.transport",
    "dp",
    "mpc",
    "gossip",
    "p2p",
    "p2p.transport",
    "simulator",
)
# Names that a package's own code uses (typing), never part of the API.
_PLUMBING = {"annotations", "Any"}


def _public_attributes(module: types.ModuleType) -> set[str]:
    return {
        name
        for name in dir(module)
        if not name.startswith("_")
        and name not in _PLUMBING
        and not isinstance(getattr(module, name), types.ModuleType)
    }


@pytest.mark.parametrize("package", PACKAGES)
def test_all_resolves_and_is_unique(package: str) -> None:
    module = importlib.import_module(package)
    exported = list(module.__all__)
    assert len(exported) == len(set(exported)), f"{package}.__all__ lists a name twice"
    for name in exported:
        assert getattr(module, name, None) is not None or name == "__version__", name


@pytest.mark.parametrize("package", PACKAGES)
def test_public_names_are_exactly_all(package: str) -> None:
    module = importlib.import_module(package)
    for name in module.__all__:  # resolve lazy exports first, so they appear in dir()
        getattr(module, name)
    public = _public_attributes(module)
    exported = {n for n in module.__all__ if not n.startswith("_")}
    assert public - exported == set(), f"{package}: public but not in __all__"
    assert exported - public == set(), f"{package}: in __all__ but not reachable"


@pytest.mark.parametrize("package", PACKAGES)
def test_exported_classes_and_functions_are_documented(package: str) -> None:
    module = importlib.import_module(package)
    undocumented = []
    for name in module.__all__:
        value = getattr(module, name)
        if (inspect.isclass(value) or inspect.isfunction(value)) and not (
            value.__doc__ and value.__doc__.strip()
        ):
            undocumented.append(name)
    assert undocumented == [], f"{package}: no docstring on {undocumented}"


@pytest.mark.parametrize(
    ("statement", "absent"),
    [
        ("import floor.errors", ("torch", "aiohttp", "murmur")),
        ("import p2p", ("torch", "aiohttp", "p2p.daemon")),
        ("import p2p.cmd_daemon", ("torch", "p2p.daemon")),
        ("import gossip", ("aiohttp", "p2p", "simulator")),
    ],
)
def test_light_entry_points_stay_light(statement: str, absent: tuple[str, ...]) -> None:
    code = f"{statement}; import sys; print(' '.join(m for m in {absent!r} if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == ""


def test_murmur_errors_is_the_floor_tree() -> None:
    import floor.errors
    import murmur.errors

    assert murmur.errors.__all__ == floor.errors.__all__
    for name in floor.errors.__all__:
        assert getattr(murmur.errors, name) is getattr(floor.errors, name)
