#!/usr/bin/env bash
# Issue 8 in one GPU call: fine-tune SmolLM2-135M-Instruct on three tasks, then bench/quality.py per task
# (base, fine-tune and every compression setting), all inside a hard 9.5-minute limit.
#
#   BASE=/tmp/dz/base DATA=.xfer/data OUT=$OUT bash scripts/gpu_quality.sh
#
# BASE: the converted HF folder of the base; DATA: made by scripts/make_datasets.py (arith, python, english).
# Writes to $OUT (7 files at most, none nested): quality-<task>.json (rows so far, rewritten after every
# setting), quality-<device>-<date>.json (merged), quality-<device>-<date>.png (if matplotlib is present),
# finetune.json (loss curves), run.log. Fine-tuned checkpoints and artifacts stay in $WORK.
#
# Expected on one H100 (estimates, not measured): fine-tunes ~45 s each alone, run concurrently ~60-140 s;
# per task ~15 s load + base/fine-tune scores; an OBS setting (ΔCompress, SparseGPT on W_ft) ~4.7M small
# torch ops (counted on CPU for SmolLM2's shapes) at ~5 us each ≈ 25 s + ~4 s restore/zstd/score; magnitude+RTN
# and BitDelta ~6 s. The three tasks run as concurrent processes, each stopping at the deadline, so the last
# settings of bench/quality.py's list are the ones skipped if the GPU is slower than this.
set -uo pipefail
: "${BASE:?converted HF folder of the base}" "${DATA:?folder made by scripts/make_datasets.py}" "${OUT:?output folder}"
STEPS=${STEPS:-300}
TASKS=${TASKS:-"arith python english"}
WORK=${WORK:-/tmp/dz-quality}
BUDGET_S=${BUDGET_S:-515}        # no setting starts that would end after this (seconds since start)
HARD_S=${HARD_S:-545}            # quality processes are killed here; merge + plot follow (limit 570)
FT_LIMIT_S=${FT_LIMIT_S:-300}    # a fine-tune still running then is killed and its task skipped
ROWS=${ROWS:-100}
SETTINGS=${SETTINGS:-}           # comma-separated names from bench/quality.py; empty = all, in its order
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} TOKENIZERS_PARALLELISM=false
START=$(date +%s)
mkdir -p "$WORK" "$OUT"
exec > >(tee -a "$OUT/run.log") 2>&1
log() { echo "[$(date +%T) +$(( $(date +%s) - START ))s] $*"; }

log "preflight"
python3 -c "import torch, triton, safetensors, tokenizers, structlog, tqdm, jinja2; print(torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')" \
  || { log "missing a dependency"; exit 1; }
python3 -c "import zstandard" 2>/dev/null || log "no zstandard: ratio_zstd will be null"
for task in $TASKS; do [ -f "$DATA/$task/train.jsonl" ] || { log "no $DATA/$task/train.jsonl"; exit 1; }; done

# The three fine-tunes run at once: each is launch-bound at this size, so they overlap on one GPU.
pids=()
for task in $TASKS; do
  timeout --signal=KILL "$FT_LIMIT_S" python3 scripts/finetune.py --base "$BASE" --data "$DATA/$task" -o "$WORK/ft-$task" --steps "$STEPS" --eval-rows 0 \
    > "$WORK/finetune-$task.log" 2>&1 &
  pids+=($!)
done
log "fine-tuning $TASKS (pids ${pids[*]})"
for pid in "${pids[@]}"; do wait "$pid" || log "a fine-tune failed (pid $pid)"; done
for task in $TASKS; do
  log "finetune $task: $(grep '"step"' "$WORK/finetune-$task.log" | tail -1)"
  [ -f "$WORK/ft-$task/finetune.json" ] || tail -5 "$WORK/finetune-$task.log"
done
python3 - "$OUT/finetune.json" $(for t in $TASKS; do echo "$WORK/ft-$t/finetune.json"; done) <<'EOF'
import json, sys
from pathlib import Path
reports = {}
for p in map(Path, sys.argv[2:]):
    if p.exists():
        r = json.loads(p.read_text())
        reports[r["task"]] = r
Path(sys.argv[1]).write_text(json.dumps(reports, indent=1))
EOF

deadline=$(( START + BUDGET_S ))
pids=()
for task in $TASKS; do
  [ -f "$WORK/ft-$task/finetune.json" ] || continue
  left=$(( START + HARD_S - $(date +%s) )); [ "$left" -gt 5 ] || left=5
  timeout --signal=KILL "$left" python3 bench/quality.py --base "$BASE" --ft "$WORK/ft-$task" \
    --data "$DATA/$task" --out "$OUT/quality-$task.json" --rows "$ROWS" --deadline "$deadline" \
    --first-setting-s 45 --work "$WORK/art" ${SETTINGS:+--settings "$SETTINGS"} 2> "$WORK/quality-$task.err" &
  pids+=($!)
done
log "quality runs started (deadline +${BUDGET_S}s, killed at +${HARD_S}s)"
for pid in "${pids[@]}"; do wait "$pid" || log "a quality run ended with an error (pid $pid)"; done
for task in $TASKS; do
  [ -s "$WORK/quality-$task.err" ] && grep -v '^{' "$WORK/quality-$task.err" | grep -iE "error|traceback" -A3 | tail -8
done

log "merge"
merged=$(python3 bench/quality.py --merge $(for t in $TASKS; do echo "$OUT/quality-$t.json"; done) --out "$OUT" | tail -1)
merged=${merged#wrote }
if [ -f "$merged" ] && python3 -c "import matplotlib" 2>/dev/null; then
  python3 bench/plot_quality.py "$merged" -o "${merged%.json}.png" || log "plot failed"
fi
rm -rf "$WORK/art"
log "done; $OUT: $(ls "$OUT" | tr '\n' ' ')"
