#!/usr/bin/env bash
# Creates .venv (idempotent) with the CPU build of torch and imagic installed editable,
# with what the tests and benchmarks need.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.imagic-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    python -m pip install -q --upgrade pip
    # Installed first and on its own: anything that merely requires `torch` would
    # otherwise fetch a multi-GB CUDA build.
    python -m pip list 2>/dev/null | grep -q '^torch ' || python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
    python -m pip install -q -e ".[test,bench,ui,ray,quant]"
    touch "$stamp"
fi
