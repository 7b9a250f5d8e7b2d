# Two set-up commands (see README): `make up` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
HOST   ?= 127.0.0.1
PORT   ?= 8000

.PHONY: install up test lint clean reliability deploy-test triton-venv triton-test

# torch is pinned and installed first: the CPU wheel on this machine, not a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

up: install
	$(VENV)/bin/ldm-serve up --host $(HOST) --port $(PORT)

lint: install
	$(VENV)/bin/ruff check .

test: install lint
	$(PY) -m pytest -q

# Fuzzing, chaos, webhook outage, overload, bad inputs (docs/reliability.md); figures in tmp/results/.
reliability: install
	$(PY) -m pytest -q -m reliability tests/reliability

# The container deploy test (podman + podman-compose; on this sandbox first run
# `bash ../shared/tools/containers-setup.sh`): builds the image, runs the compose stack, tears it down.
deploy-test: install
	$(PY) -m pytest -q -m deploy tests/deploy -p no:cacheprovider

# The Triton test (docs/triton.md): its own venv, because the python backend's stub needs numpy<2.
# torch==2.13.0 first, then ldm-serve (editable) with nvidia-pytriton (tritonserver) and tritonclient.
TRITON_VENV ?= .venv-triton
$(TRITON_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/python -m pip install -q --upgrade pip
	$(TRITON_VENV)/bin/python -m pip install -q torch==2.13.0
	$(TRITON_VENV)/bin/python -m pip install -q -e '.[triton]'
	touch $@

triton-venv: $(TRITON_VENV)/.installed

triton-test: triton-venv
	$(TRITON_VENV)/bin/python -m pytest -q -m triton tests/tritonserver

clean:
	rm -rf $(VENV) $(TRITON_VENV) .pytest_cache .ruff_cache
