"""Benchmarks: ``python -m bench.bench_<area>``; results go to ``bench/results/<area>.md``."""
