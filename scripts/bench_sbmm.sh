#!/usr/bin/env bash
# The SBMM kernel work on a GPU box, one command (`make bench-sbmm`): the kernels' GPU tests, then the full
# benchmark (bench/sbmm.py: Llama-2-7B layer shapes, 1-64 deltas x 1/4/16 rows, the worker's CUDA layouts sp4 and
# sp2, against dense per-segment matmuls, torch.bmm, dequantize-then-matmul and the base GEMM, with the HBM copy
# limit measured in the same run), then its plot. Writes bench/results/sbmm-<gpu>-<date>[-LABEL].json / .png and
# the tests' log beside them. Knobs (env): VARIANTS (default 4sp,2sp), LABEL, BASELINE (a config table to time
# in the same run, e.g. an older kernels/sbmm_configs.json), TESTS=0 to skip the tests, OUT.
#
# Needs: torch with CUDA and triton (an sm_80+ GPU; the sparse-MMA kernels' PDL option needs sm_90), pytest,
# numpy; matplotlib for the plot (else plot elsewhere: python bench/plot_sbmm.py <json>).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -z "${PY:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=$(command -v python3); fi
fi
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "bench-sbmm: no CUDA GPU visible to $PY; run it on a GPU machine (the kernels' CPU tests are in make test)" >&2
  exit 2
fi
OUT=${OUT:-bench/results}
VARIANTS=${VARIANTS:-4sp,2sp}
LABEL=${LABEL:-}
COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
GPU=$("$PY" -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))")
mkdir -p "$OUT"

if [[ "${TESTS:-1}" != 0 ]]; then
  LOG="$OUT/sbmm-gpu-tests-$GPU-$(date +%F)${LABEL:+-$LABEL}.log"
  echo "GPU kernel tests -> $LOG"
  "$PY" -m pytest -q -p no:cacheprovider tests/kernels > "$LOG" 2>&1 || { tail -20 "$LOG"; exit 1; }
  tail -1 "$LOG"
fi

ARGS=(--variants "$VARIANTS" --out "$OUT" --commit "$COMMIT")
[[ -n "$LABEL" ]] && ARGS+=(--label "$LABEL")
[[ -n "${BASELINE:-}" ]] && ARGS+=(--baseline-configs "$BASELINE")
"$PY" bench/sbmm.py "${ARGS[@]}"
JSON="$OUT/sbmm${LABEL:+-$LABEL}-$GPU-$(date +%F).json"  # bench/sbmm.py's name for this run
"$PY" bench/plot_sbmm.py "$JSON" || echo "no plot (matplotlib missing?): python bench/plot_sbmm.py $JSON" >&2
