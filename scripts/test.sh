#!/usr/bin/env bash
# The test command: set up everything (scripts/setup.sh), then lint, format check and pytest.
#   --with-image   then also build the CPU image and run, inside it, the test suite and
#                  `reproduce lenet5-mnist --quick` (scripts/docker.sh test; CI does this)
# Other arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
with_image=0
if [ "${1:-}" = --with-image ]; then
  with_image=1
  shift
fi
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m pytest "$@"
if [ "$with_image" = 1 ]; then
  bash scripts/docker.sh test "$@"
fi
