#!/usr/bin/env bash
# Main job (README, Quick start): set up .venv, then fine-tune the bundled SmolLM2-135M-Instruct with LoRA on
# the bundled sample set (CPU, offline) and show the base and tuned answers side by side and the held-out scores.
# Extra arguments go to `deltatune train`, e.g. ./quickstart.sh --method prefix-tuning
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh
deltatune=.venv/bin/deltatune
run=runs/quickstart
prompt=$'把日期改写成 YYYY-MM-DD 格式。\n2031年7月4日'
start=$SECONDS
"$deltatune" train --output "$run" --overwrite "$@"
"$deltatune" chat --adapter "$run" --compare-base --prompt "$prompt" --max-new-tokens 32
"$deltatune" eval --adapter "$run" --compare-base
echo "main job done in $((SECONDS - start)) s; adapter, run.yaml and loss_history.json in $run"
