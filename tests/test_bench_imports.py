"""Every benchmark module imports: a benchmark that rots when the code under it moves is
caught here (bench_group_round imported a class the one-core refactor had removed)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

BENCH = sorted(p.stem for p in (Path(__file__).resolve().parent.parent / "bench").glob("*.py"))


@pytest.mark.parametrize("name", [n for n in BENCH if n != "__init__"])
def test_benchmark_module_imports(name: str) -> None:
    module = importlib.import_module(f"bench.{name}")
    assert module.__doc__, f"bench.{name} says nothing of what it measures"
