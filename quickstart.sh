#!/usr/bin/env bash
# Main job: set up .venv, then fine-tune and compare answers (see README, Quick start).
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh
exec .venv/bin/python examples/05_lora.py "$@"
