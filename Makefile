# The two commands of the README's quick start:
#   make run    set up a virtualenv and start the app (http://127.0.0.1:7860)
#   make test   set up a virtualenv with the test oracle and run the whole suite
#   make test-fast  the same set-up, then the suite without its end-to-end and long tests (under 3 minutes)
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
# pip takes an installed torch as satisfying the range in pyproject.toml; name the build
# you want here (e.g. a CUDA wheel index) before the first `make`.
TORCH ?= torch==2.13.0
# The reference implementation: a test oracle only, never a runtime dependency.
REFERENCE ?= moshi==0.2.13

.PHONY: run test test-fast wheel space requirements bench bench-gpu setup setup-test system-deps clean

$(VENV)/.base: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH)"
	$(PIP) install -e ".[app]"
	$(VENV)/bin/moshi-core build-kernels
	touch $@

# The reference's own test assets (a tiny LM, its inputs and outputs) come with its sdist.
REFERENCE_ASSETS := .cache/reference/tests/assets

$(VENV)/.test: $(VENV)/.base
	$(PIP) install -e ".[app,test]"
	$(PIP) install --no-deps "$(REFERENCE)"
	rm -rf .cache/reference && mkdir -p .cache/reference
	$(PIP) download --no-deps --no-binary :all: "$(REFERENCE)" -d .cache/reference
	tar -xzf .cache/reference/moshi-*.tar.gz -C .cache/reference --strip-components=1
	touch $@

# What the tests drive for real: Debian's chromium (web UI), espeak-ng and sox (speech),
# redis-server (the API tests start their own on free ports; the default one is started if
# the machine has none running), ffmpeg (Gradio's streaming audio player, the TTS tab), haproxy (the scale-out test's
# balancer), docker-compose (checks compose.yaml; without the Docker engine it recommends).
# Installed with apt where missing.
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
SYSTEM_TOOLS := chromium espeak-ng sox redis-server ffmpeg haproxy

system-deps:
	@missing=""; for tool in $(SYSTEM_TOOLS); do command -v $$tool >/dev/null || missing="$$missing $$tool"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing$$missing with apt"; \
		$(SUDO) apt-get install -y -q $$missing >/dev/null 2>&1 || \
		{ $(SUDO) apt-get update -q >/dev/null && $(SUDO) apt-get install -y -q $$missing >/dev/null; }; \
	fi
	@command -v docker-compose >/dev/null || { echo "installing docker-compose with apt"; \
		$(SUDO) apt-get install -y -q --no-install-recommends docker-compose >/dev/null 2>&1 || \
		{ $(SUDO) apt-get update -q >/dev/null && $(SUDO) apt-get install -y -q --no-install-recommends docker-compose >/dev/null; }; }
	@redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 || \
		redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no >/dev/null

setup: $(VENV)/.base
setup-test: $(VENV)/.test system-deps

run: setup
	$(PY) app.py

# Both print their 15 slowest tests: the budgets (20 and 3 minutes on 2 cores, docs/testing.md)
# are kept by looking there first.
test: setup-test
	$(PY) -m pytest -q --durations=15

test-fast: setup-test
	$(PY) -m pytest -q -m "not e2e and not slow" --durations=15

# One table, ours beside the reference; `make bench BENCH_ARGS=--quick` skips the full 7B.
bench: setup-test
	$(PY) bench/run_all.py $(BENCH_ARGS)

# The GPU benchmark (bench/gpu.py, docs/benchmarks.md): the 7B and Mimi on one CUDA card, random
# weights made there, 1 to 96 conversations; under 8 minutes, figures in bench/results/gpu.json.
# Needs no test oracle. `make bench-gpu BENCH_GPU_ARGS="--batches 1,8,64"` narrows it.
bench-gpu: setup
	$(PY) bench/gpu.py $(BENCH_GPU_ARGS)

# The wheel users install (dist/), as the Dockerfile and a Space build it. A stale build/
# would slip files the package data misses into it, so it goes first.
wheel: $(VENV)/.base
	rm -rf build dist/moshi_core-*.whl
	$(PIP) wheel --no-deps -w dist .

# The Hugging Face Space's repository, ready to push (docs/deployment.md); SPACE_DIR=... puts it elsewhere.
# Its requirements.txt is this one, which `make requirements` writes from pyproject.toml.
SPACE_DIR ?= dist/space
space:
	$(PYTHON) space/build.py --out $(SPACE_DIR)

requirements:
	$(PYTHON) space/build.py --requirements

clean:
	rm -rf $(VENV) .pytest_cache
