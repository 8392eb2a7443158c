#!/usr/bin/env bash
# Train and evaluate SASRec, then retrieve top-k for every user with the best checkpoint.
#   ./run.sh                                  embedded synthetic dataset
#   ./run.sh configs/beauty.toml              a shipped config (real data in ../shared/data)
#   ./run.sh configs/beauty.toml --use_infonce --data /my/Beauty.txt    extra flags override
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
args=()
if [[ $# -eq 0 ]]; then
  args=(--config configs/synthetic.toml)
elif [[ "$1" == *.toml ]]; then
  args=(--config "$1")
  shift
fi
run_dir="runs/run_$(date +%Y%m%d-%H%M%S)"
prev=""
for a in "$@"; do  # a --run_dir given by the user wins
  [[ "$prev" == "--run_dir" ]] && run_dir="$a"
  [[ "$a" == --run_dir=* ]] && run_dir="${a#--run_dir=}"
  prev="$a"
done
"$PYTHON" main.py "${args[@]}" --run_dir "$run_dir" "$@"
if [[ " $* " != *" --inference_only "* ]]; then
  "$PYTHON" eval/infer.py --ckpt "${TRAIN_CKPT_PATH:-$run_dir/ckpt}" --out "$run_dir/infer"
fi
