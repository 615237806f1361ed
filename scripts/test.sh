#!/usr/bin/env bash
# Install (scripts/setup.sh), lint, type-check and run the test suite.  Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff format --check robkit tests benchmarks
.venv/bin/ruff check robkit tests benchmarks
.venv/bin/mypy robkit
.venv/bin/python -m pytest "$@"
