#!/usr/bin/env bash
# Set up a virtual environment in .venv with Murmur and its dev tools. Idempotent: when
# pyproject.toml and constraints.txt have not changed since the last set-up, it does nothing.
# torch is pinned through constraints.txt so that pip takes the CPU build of 2.13.0
# rather than resolving an open range to a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
stamp=.venv/.murmur-setup
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && .venv/bin/python -c "import murmur" 2>/dev/null; then
    exit 0
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q -c constraints.txt -e ".[dev]"
echo "$want" > "$stamp"
