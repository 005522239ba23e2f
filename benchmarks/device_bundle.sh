#!/usr/bin/env bash
# Prepares `.whl/` (git-ignored) for a call on a lent GPU machine, here on the CPU machine, at no
# device time. That machine has python3 3.12 with torch, transformers, safetensors, pyarrow,
# pillow, tensorboard, pluggy and peft, but no network and none of: this package, torchdata,
# tomli_w, the Triton NSA kernels. The call then names `.whl` in `carry` and runs
# `bash benchmarks/device_call.sh [gpu_suite.py arguments]`.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
NSA_WHEEL_DIR="${NSA_WHEEL_DIR:-../shared/wheels}"

rm -rf .whl
mkdir -p .whl
"$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w .whl .
# Pure-Python wheels, pinned to the versions the suite here runs with.
pinned() { echo "$1==$("$PYTHON" -c "import importlib.metadata as m; print(m.version('$1'))")"; }
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$(pinned torchdata)" "$(pinned tomli_w)"
if compgen -G "$NSA_WHEEL_DIR/native_sparse_attention_triton-*.whl" > /dev/null; then
    cp "$NSA_WHEEL_DIR"/native_sparse_attention_triton-*.whl .whl/
else
    echo "note: no native_sparse_attention_triton wheel in $NSA_WHEEL_DIR; the NSA Triton checks will say so" >&2
fi
ls -l .whl
