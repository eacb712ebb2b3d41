#!/usr/bin/env bash
# Set up .venv with the test extras, then run the test suite (CI runs exactly this).
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh --test
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
