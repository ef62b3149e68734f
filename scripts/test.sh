#!/usr/bin/env bash
# The test command: set up everything (scripts/setup.sh), then lint, format check and pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest "$@"
