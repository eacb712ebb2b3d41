#!/usr/bin/env bash
# Set up .venv with the test extras (the locked versions in constraints.txt), lint, then run the test suite
# (CI runs exactly this).
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh --test
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
