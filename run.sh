#!/usr/bin/env bash
# Train and evaluate SASRec, then retrieve top-k for every user with the best checkpoint.
#   ./run.sh                                  embedded synthetic dataset
#   ./run.sh configs/beauty.toml              a shipped config (real data in ../shared/data)
#   ./run.sh configs/beauty.toml --use_infonce --data /my/Beauty.txt    extra flags override
#   ./run.sh configs/taac.toml                competition layout (synthetic data/taac written if absent);
#                                             inference is then eval/competition.py on data/taac/eval
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
if [[ "${args[1]:-}" == configs/taac.toml && " $* " != *" --data "* && ! -d data/taac/train ]]; then
  "$PYTHON" taac_synthetic.py --out data/taac --users 20000 --items 10000
fi
run_dir="runs/run_$(date +%Y%m%d-%H%M%S)"
prev=""
for a in "$@"; do  # a --run_dir given by the user wins
  [[ "$prev" == "--run_dir" ]] && run_dir="$a"
  [[ "$a" == --run_dir=* ]] && run_dir="${a#--run_dir=}"
  prev="$a"
done
"$PYTHON" main.py "${args[@]}" --run_dir "$run_dir" "$@"
[[ " $* " == *" --inference_only "* ]] && exit 0
ckpt="${TRAIN_CKPT_PATH:-$run_dir/ckpt}"
data=$("$PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1]))["data"])' "$ckpt/config.json")
if [[ -d "$data" ]]; then  # a competition folder: its evaluation folder sits beside it
  if [[ -d "$(dirname "$data")/eval" ]]; then
    "$PYTHON" eval/competition.py --ckpt "$ckpt" --eval_data "$(dirname "$data")/eval" --out "$run_dir/competition"
  fi
else
  "$PYTHON" eval/infer.py --ckpt "$ckpt" --out "$run_dir/infer"
fi
