#!/usr/bin/env bash
# Makes the demo fine-tunes on a GPU machine: convert the base GGUF, full-parameter fine-tune one
# model per task, compress each delta, evaluate base / fine-tune / compressed on held-out data.
#
#   GGUF=path/to.gguf DATA=data OUT=out STEPS=300 bash scripts/gpu_finetune.sh
#
# Writes to $OUT: finetune-<task>.json (loss curve + metrics), results.jsonl (one line per
# evaluated setting), demo-deltas.tar.part-* (the demo artifacts, split to fit transfer limits).
set -euo pipefail
: "${GGUF:?path to the base GGUF}" "${DATA:?folder made by scripts/make_datasets.py}" "${OUT:?output folder}"
STEPS=${STEPS:-300}
WORK=${WORK:-/tmp/dz-work}
BUDGET_S=${BUDGET_S:-540}            # stop starting optional work after this many seconds
DEMO_BITS=${DEMO_BITS:-2}
DEMO_GROUP=${DEMO_GROUP:-96}         # SmolLM2's 576/1536 dims are not multiples of 128
TASKS=${TASKS:-"arith python"}
mkdir -p "$WORK" "$OUT"
log() { echo "[$(date +%T) +${SECONDS}s] $*"; }

log "convert base"
[ -d "$WORK/base" ] || python3 -m deltazip.convert --gguf "$GGUF" -o "$WORK/base"

for task in $TASKS; do
  log "finetune $task"
  python3 scripts/finetune.py --base "$WORK/base" --data "$DATA/$task" -o "$WORK/ft-$task" --steps "$STEPS" \
    --eval-rows 0 2>&1 | grep -v '"step"' | tail -n 5
  cp "$WORK/ft-$task/finetune.json" "$OUT/finetune-$task.json"
done

compress_one() {  # task bits group sparsity name
  local task=$1 bits=$2 group=$3 sparsity=$4 name=$5
  log "compress $name"
  python3 -m deltazip compress "$WORK/base" "$WORK/ft-$task" -o "$WORK/art/$name" --bits "$bits" --group-size "$group" \
    --sparsity "$sparsity" --calib "$DATA/$task/train.jsonl" --nsamples 128 --seq-len 256 --no-progress --overwrite \
    > "$WORK/compress-$name.log" 2>&1 || { tail -5 "$WORK/compress-$name.log"; return 1; }
  python3 -m deltazip inspect "$WORK/art/$name" --json > "$OUT/inspect-$name.json"
}

evaluate() {  # task model_dir tag
  python3 scripts/evaluate.py "$2" --data "$DATA/$1" --rows "${EVAL_ROWS:-100}" --tag "$3" --out "$OUT/results.jsonl" 2>/dev/null | tail -1
}

evaluate_compressed() {  # task name
  python3 -m deltazip restore "$WORK/base" "$WORK/art/$2" -o "$WORK/restored-$2" --overwrite > /dev/null 2>&1
  evaluate "$1" "$WORK/restored-$2" "$2"
  rm -rf "$WORK/restored-$2"
}

for task in $TASKS; do
  compress_one "$task" "$DEMO_BITS" "$DEMO_GROUP" 2:4 "smollm2-$task"
done
log "pack demo artifacts"
tar -C "$WORK/art" -cf "$WORK/demo-deltas.tar" $(for t in $TASKS; do echo "smollm2-$t"; done)
split -b 15000000 -d "$WORK/demo-deltas.tar" "$OUT/demo-deltas.tar.part-"
sha256sum "$WORK/demo-deltas.tar" > "$OUT/demo-deltas.sha256"

for task in $TASKS; do
  log "evaluate $task: base, fine-tune, demo delta"
  evaluate "$task" "$WORK/base" base
  evaluate "$task" "$WORK/ft-$task" finetune
  evaluate_compressed "$task" "smollm2-$task"
done

for setting in "4 64 2:4" "2 0 2:4" "4 64 0"; do
  for task in $TASKS; do
    if [ "$SECONDS" -gt "$BUDGET_S" ]; then log "budget reached; skipping the rest"; exit 0; fi
    set -- $setting
    name="extra-$task-$1b-g$2-s${3/:/of}"
    compress_one "$task" "$1" "$2" "$3" "$name" && evaluate_compressed "$task" "$name"
  done
done
log "done"
