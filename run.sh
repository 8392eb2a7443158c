#!/usr/bin/env bash
# Train (and evaluate) SASRec. No arguments: the embedded synthetic dataset.
#   ./run.sh                                  synthetic default
#   ./run.sh configs/beauty.toml              a shipped config (real data in ../shared/data)
#   ./run.sh configs/beauty.toml --use_infonce --data /my/Beauty.txt    extra flags override
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
args=()
if [[ $# -gt 0 && "$1" == *.toml ]]; then
  args=(--config "$1")
  shift
fi
exec "$PYTHON" main.py "${args[@]}" "$@"
