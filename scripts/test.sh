#!/usr/bin/env bash
# Install (scripts/setup.sh), lint, type-check and run the test suite.  Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "machine: $(.venv/bin/python -c 'from robkit.utils.machine import machine_line; print(machine_line())')"
.venv/bin/ruff format --check robkit tests benchmarks
.venv/bin/ruff check robkit tests benchmarks
.venv/bin/mypy robkit
.venv/bin/python -m pytest "$@"
