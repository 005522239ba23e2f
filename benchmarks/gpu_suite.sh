#!/usr/bin/env bash
# The GPU suite in one command (one H100, under 10 minutes): attention correctness at BAGEL-7B
# head shapes, then training-step tokens/s, MFU and peak memory of BAGEL at 7B width with few
# layers across sdpa/flex, compile, activation checkpointing and 8k/16k packs. Appends its
# tables to benchmarks/RESULTS.md. Arguments go to benchmarks/gpu_suite.py (see its --help),
# e.g. `bash benchmarks/gpu_suite.sh --llm-layers 4 --vit-layers 4`.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
if [ ! -x "$PYTHON" ]; then
    PYTHON="$(command -v python3 || command -v python)"
fi
exec "$PYTHON" benchmarks/gpu_suite.py "$@"
