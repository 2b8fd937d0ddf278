#!/usr/bin/env bash
# Set up .venv and run the checks: lint, format, types, then the test suite.
# Extra arguments go to pytest (e.g. `scripts/test.sh -m "not slow"`); the tests run on
# FLEXMOE_TEST_WORKERS pytest-xdist workers (2 by default; 0 runs them in this process),
# each module on one worker (its module-scoped fixtures are built once).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
bash scripts/ci-deps.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
.venv/bin/python -m pytest -n "${FLEXMOE_TEST_WORKERS:-2}" --dist loadscope "$@"
