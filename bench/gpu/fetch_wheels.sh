#!/usr/bin/env bash
# Download the pure-Python wheels bench/gpu/run.sh needs on a GPU machine without network
# (its image has torch, transformers, safetensors, tokenizers, but no diffusers) into .whl/.
# Run here, where pip can reach the index; then carry .whl to the GPU machine.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${PYTHON:-.venv/bin/python}"
DIFFUSERS_VERSION="${DIFFUSERS_VERSION:-$("$PY" -m pip show diffusers 2>/dev/null | sed -n 's/^Version: //p')}"
WHEEL_DIR="${WHEEL_DIR:-.whl}"
mkdir -p "$WHEEL_DIR"
"$PY" -m pip download -q --no-deps --only-binary=:all: -d "$WHEEL_DIR" "diffusers==$DIFFUSERS_VERSION" importlib_metadata
ls -l "$WHEEL_DIR"
