#!/usr/bin/env bash
# The serving matrix on one GPU host, one command (`make bench-gpu-matrix`): every (num_models, bits) job in JOBS is
# one scripts/bench_gpu.sh run = one bench/serve.py process with its own whole stack (redis, delta store, schedulers,
# one worker per mode) pinned to one GPU with CUDA_VISIBLE_DEVICES. A job measures delta, dense-delta and swap plus the
# base-only reference on the same workload in the same process, so every ratio comes from one run. Jobs go to the GPUs
# round-robin in the order listed; each GPU runs its jobs one after another, all GPUs at once. Then
# bench/merge_serving.py writes one JSON + PNG and prints the summary table: OUT/serving-matrix-<gpu>-<date>.{json,png}
# (each job's own JSON, PNG and log stay in JOBS_DIR).
#
# Warm state: every mode x num_models set is prefetched before its warm-up requests (--warmup-prefetch: delta and
# dense-delta to GPU slots then host, swap to the pinned host cache; bench/warm.py), with one worker disk cache kept
# across the modes of a job (--keep-disk-cache) and filled with hard links to the store's files as each delta is pushed
# (--link-worker-cache: one copy of the deltas on disk, so deeper shapes fit), so no measured point pays a fetch from
# the store.
#
# Time: BUDGET_S bounds all jobs, wall clock from the first job's start. A job gets (time left) / (jobs left on its
# GPU): bench/serve.py starts points until POINT_S before that share ends (--budget-s; a point started then may run up
# to --timeout-s past its arrivals), with MODE_RESERVE_S per mode still to start kept from a mode's later points
# (--mode-reserve-s), and the job is stopped at its share + JOB_GRACE_S (SIGINT to its whole process group, SIGKILL
# 15 s later). Whatever still runs at BUDGET_S + MARGIN_S is stopped the same way. serve.py writes its JSON after
# every point, so a stopped job keeps what it finished, and the merge reads whatever each job wrote.
#
# Isolation: each job has its own work dir, log and --label (result file name) and its own --port-range
# (PORT_BASE + 100 x job index, below the kernel's ephemeral ports), so stacks side by side never share a port or a
# redis; CPU_PIN=1 (default on a GPU host with >= 4 cores per GPU) gives each GPU's jobs an equal slice of the cores
# (taskset) and OMP threads to match, so one job's CPU work (swap's merges) does not slow another's relay.
#
# DEVICE=cpu runs the same pipeline with NUM_FAKE_GPUS plain process slots instead of GPUs (CPU workers, use
# SHAPE=tiny), to check this script without a GPU. DRY_RUN=1 prints the plan (job -> GPU, label, ports, the command)
# and exits. Knobs: the variables below; BENCH_ARGS adds bench/serve.py flags to every job.
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ -z "${PY:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=$(command -v python3); fi
fi
export PY
DEVICE=${DEVICE:-cuda}
# num_models:bits, handed out round-robin: on 4 GPUs each runs a small job first (its time left over goes to the
# next) and then a large one: 8+64, 16+32, 8+64, 16+32 fine-tunes per GPU.
JOBS=${JOBS:-8:4,16:4,8:2,16:2,64:2,32:2,64:4,32:4}
BUDGET_S=${BUDGET_S:-480}
MARGIN_S=${MARGIN_S:-40}
TIMEOUT_S=${TIMEOUT_S:-45}            # a request's deadline (per point)
POINT_S=${POINT_S:-20}                # no point starts in the last POINT_S of a job's share
JOB_GRACE_S=${JOB_GRACE_S:-30}        # a job is stopped this long after its share ends
MODE_RESERVE_S=${MODE_RESERVE_S:-50}  # per mode still to start: worker start + prefetch + warm-up before its first point
WARMUP_REQUESTS=${WARMUP_REQUESTS:-60}
WARMUP_TIMEOUT_S=${WARMUP_TIMEOUT_S:-10}
HOST_CACHE_BYTES=${HOST_CACHE_BYTES:-34359738368}
PORT_BASE=${PORT_BASE:-20000}
OUT=${OUT:-bench/results}
JOBS_DIR=${JOBS_DIR:-$OUT/serving-matrix-jobs}
WORK_ROOT=${WORK_ROOT:-}  # default: a temp dir, made once the jobs start
# The workload and shape every job shares (bench_gpu.sh reads them); matrix defaults where they differ from it.
# RATE_RPS=0: load 1 = half the base-only capacity each job measures. Load 2 (the goals' load) first: under a tight
# budget every mode keeps its first point, and the reserve makes the later ones give way.
export SHAPE=${SHAPE:-7b} NUM_LAYERS=${NUM_LAYERS:-4} MODES=${MODES:-delta,dense-delta,swap} RATE_RPS=${RATE_RPS:-0}
export LOADS=${LOADS:-2,1} NUM_REQUESTS=${NUM_REQUESTS:-120} DEVICE

IFS=, read -r -a JOB_LIST <<<"$JOBS"
for spec in "${JOB_LIST[@]}"; do
  [[ "$spec" =~ ^[0-9]+:[0-9]+(:h[0-9]+)?$ ]] || {
    echo "JOBS wants num_models:bits[:hGiB] entries, e.g. 8:4,32:2,32:4:h12; got '$spec'" >&2; exit 1; }
done
if [[ "$DEVICE" == cpu ]]; then
  GPU_NAME=cpu
  IFS=, read -r -a GPU_LIST <<<"$(seq -s, 0 $((${NUM_FAKE_GPUS:-2} - 1)))"
else
  GPU_NAME=${GPU_NAME:-$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr ' ' '-')}
  GPUS=${GPUS:-${CUDA_VISIBLE_DEVICES:-$(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null | paste -sd,)}}
  IFS=, read -r -a GPU_LIST <<<"$GPUS"
  [[ ${#GPU_LIST[@]} -ge 1 && -n "$GPU_NAME" ]] || { echo "no GPU found (nvidia-smi); DEVICE=cpu checks this script without one" >&2; exit 1; }
fi
NUM_GPUS=${#GPU_LIST[@]}
# The CPUs this process may use (a container's cpuset need not start at 0), cut into one slice per GPU.
read -r -a CPU_IDS <<<"$("$PY" -c "import os; print(*sorted(os.sched_getaffinity(0)))")"
CORES=${#CPU_IDS[@]}
CPU_PIN=${CPU_PIN:-$([[ "$DEVICE" != cpu && $CORES -ge $((4 * NUM_GPUS)) ]] && command -v taskset >/dev/null && echo 1 || echo 0)}
SLICE=$((CORES / NUM_GPUS))
(( SLICE >= 1 )) || CPU_PIN=0  # fewer CPUs than GPUs: no slices to give
SLICE=$((SLICE > 0 ? SLICE : 1))
cpu_slice() { local ids=("${CPU_IDS[@]:$(($1 * SLICE)):SLICE}"); local IFS=,; echo "${ids[*]}"; }
if (( CPU_PIN )) && ! taskset -c "$(cpu_slice 0)" true 2>/dev/null; then
  echo "taskset cannot pin here: jobs share all CPUs" >&2
  CPU_PIN=0
fi
SERVE_ARGS="--timeout-s $TIMEOUT_S --warmup-requests $WARMUP_REQUESTS --warmup-timeout-s $WARMUP_TIMEOUT_S --warmup-prefetch
  --keep-disk-cache --link-worker-cache --mode-reserve-s $MODE_RESERVE_S --worker-flag=--host-cache-bytes=$HOST_CACHE_BYTES --out $JOBS_DIR"
[[ "$DEVICE" == cpu ]] || SERVE_ARGS+=" --worker-flag=--cuda-graphs=1"

# A job spec: num_models:bits, optionally :h<GiB> = that job's host cache instead of HOST_CACHE_BYTES (e.g. the swap
# baseline with a host budget that holds only some merged models).
spec_models() { echo "${1%%:*}"; }
spec_bits() { local rest=${1#*:}; echo "${rest%%:*}"; }
spec_host_gib() { [[ "$1" =~ :h([0-9]+)$ ]] && echo "${BASH_REMATCH[1]}" || echo ""; }
job_label() { local h; h=$(spec_host_gib "$1"); echo "$GPU_NAME-m$(spec_models "$1")-b$(spec_bits "$1")${h:+-h$h}"; }
job_ports() { echo "$((PORT_BASE + 100 * $1))-$((PORT_BASE + 100 * $1 + 99))"; }

if [[ "${DRY_RUN:-0}" == 1 ]]; then
  echo "plan: ${#JOB_LIST[@]} jobs on $NUM_GPUS GPU(s) [${GPU_LIST[*]}], budget ${BUDGET_S}s (all stopped at $((BUDGET_S + MARGIN_S))s), cpu pin $CPU_PIN"
  for i in "${!JOB_LIST[@]}"; do
    k=$((i % NUM_GPUS))
    echo "job $i: num_models=$(spec_models "${JOB_LIST[$i]}") bits=$(spec_bits "${JOB_LIST[$i]}") host_gib=$(spec_host_gib "${JOB_LIST[$i]}") gpu=${GPU_LIST[$k]} turn=$((i / NUM_GPUS + 1)) label=$(job_label "${JOB_LIST[$i]}") ports=$(job_ports "$i") cpus=$( (( CPU_PIN )) && cpu_slice "$k" || echo all)"
  done
  echo "each job: bash scripts/bench_gpu.sh with BENCH_ARGS=--budget-s <share - $POINT_S> --label <label> --port-range <ports> $(echo $SERVE_ARGS) ${BENCH_ARGS:-}"
  exit 0
fi

mkdir -p "$JOBS_DIR"
rm -f "$JOBS_DIR"/*.job.json "$JOBS_DIR"/*.pid
WORK_ROOT=${WORK_ROOT:-$(mktemp -d /tmp/dz-matrix.XXXXXX)}
RANGE=$(cat /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo "32768 60999")
if (( PORT_BASE + 100 * ${#JOB_LIST[@]} > ${RANGE%%[[:space:]]*} )); then
  echo "warning: job ports reach into the ephemeral range ($RANGE); set PORT_BASE lower" >&2
fi
# Generated stubs once, before the jobs start (several jobs generating them at once would race).
ls deltazip/v1/scheduler_pb2.py >/dev/null 2>&1 || \
  "$PY" -m grpc_tools.protoc -Iprotos --python_out=. --grpc_python_out=. --pyi_out=. protos/deltazip/v1/*.proto

T0=$(date +%s)
write_record() {  # label gpu num_models bits share_s rc started ended why
  local file="$JOBS_DIR/$1.job.json"
  printf '{"label": "%s", "gpu": "%s", "num_models": %d, "bits": %d, "share_s": %d, "rc": %s, "started_s": %s, "ended_s": %s, "skipped": %s, "log": "%s.log"}\n' \
    "$1" "$2" "$3" "$4" "$5" "$6" "$7" "$8" "$9" "$1" >"$file.tmp" && mv "$file.tmp" "$file"
}

run_job() {  # job index, gpu slot, share in seconds
  local i=$1 k=$2 share=$3 spec=${JOB_LIST[$1]}
  local n b h label gpu=${GPU_LIST[$2]} started rc pin=() host=()
  n=$(spec_models "$spec") b=$(spec_bits "$spec") h=$(spec_host_gib "$spec") label=$(job_label "$spec")
  [[ -n "$h" ]] && host=("--worker-flag=--host-cache-bytes=$((h << 30))")  # after SERVE_ARGS': the last one wins
  started=$(($(date +%s) - T0))
  rm -f "$JOBS_DIR/serving-$label-"*.json "$JOBS_DIR/serving-$label-"*.png  # an earlier run's result is not this one's
  write_record "$label" "$gpu" "$n" "$b" "$share" null "$started" null null
  (( CPU_PIN )) && pin=(taskset -c "$(cpu_slice "$k")")
  echo "[$started s] job $label on gpu $gpu: share ${share}s"
  CUDA_VISIBLE_DEVICES=$gpu OMP_NUM_THREADS=$SLICE NUM_MODELS=$n BITS=$b WORK_DIR="$WORK_ROOT/$label" \
    BENCH_ARGS="--budget-s $((share - POINT_S)) --label $label --port-range $(job_ports "$i") $SERVE_ARGS ${BENCH_ARGS:-} ${host[*]:-}" \
    "${pin[@]}" timeout -s INT -k 15 $((share + JOB_GRACE_S)) bash scripts/bench_gpu.sh >"$JOBS_DIR/$label.log" 2>&1 &
  local pid=$!
  echo "$pid" >"$JOBS_DIR/$label.pid"
  wait "$pid"
  rc=$?
  rm -f "$JOBS_DIR/$label.pid"
  # timeout leads the job's process group: a straggler in it (a service still stopping) must not hold the GPU
  # when the next job starts there.
  for _ in $(seq 20); do kill -0 -- "-$pid" 2>/dev/null || break; sleep 0.5; done
  kill -KILL -- "-$pid" 2>/dev/null
  rm -rf "$WORK_ROOT/$label"
  write_record "$label" "$gpu" "$n" "$b" "$share" "$rc" "$started" "$(($(date +%s) - T0))" null
  echo "[$(($(date +%s) - T0)) s] job $label on gpu $gpu: rc $rc"
}

run_gpu() {  # gpu slot: its jobs one after another, each with an equal share of the time left
  local k=$1 mine=() left share spec
  for i in "${!JOB_LIST[@]}"; do (( i % NUM_GPUS == k )) && mine+=("$i"); done
  left=${#mine[@]}
  for i in "${mine[@]}"; do
    share=$(( (BUDGET_S - ($(date +%s) - T0)) / left ))
    left=$((left - 1))
    if (( share <= POINT_S )); then
      spec=${JOB_LIST[$i]}
      write_record "$(job_label "$spec")" "${GPU_LIST[$k]}" "$(spec_models "$spec")" "$(spec_bits "$spec")" 0 null null null \
        '"budget spent before its turn"'
      continue
    fi
    run_job "$i" "$k" "$share"
  done
}

stop_jobs() {  # SIGINT to each running job's timeout, which passes it to the job's process group (SIGKILL 15 s later)
  for f in "$JOBS_DIR"/*.pid; do [[ -e "$f" ]] && kill -INT "$(cat "$f")" 2>/dev/null; done
}
trap 'stop_jobs; wait; exit 130' INT TERM

echo "matrix: ${#JOB_LIST[@]} jobs on $NUM_GPUS GPU(s) [${GPU_LIST[*]}] ($GPU_NAME), budget ${BUDGET_S}s, jobs in $JOBS_DIR"
RUNNERS=()
for k in "${!GPU_LIST[@]}"; do run_gpu "$k" & RUNNERS+=($!); done
alive=1
while (( $(date +%s) - T0 < BUDGET_S + MARGIN_S )); do
  alive=0
  for pid in "${RUNNERS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
  (( alive )) || break
  sleep 1
done
if (( alive )); then
  echo "[$(($(date +%s) - T0)) s] past the budget + ${MARGIN_S}s: stopping the jobs still running"
  stop_jobs
fi
wait
rm -rf "$WORK_ROOT"
echo "[$(($(date +%s) - T0)) s] jobs done; merging"
"$PY" -m bench.merge_serving "$JOBS_DIR" --out "$OUT"
