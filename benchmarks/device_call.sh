#!/usr/bin/env bash
# One call on a lent GPU machine (`benchmarks/device_bundle.sh` first, here; carry `.whl`):
# installs the carried wheels beside the image's torch, then runs the GPU suite
# (`benchmarks/gpu_suite.py`: device matmul ceiling, attention checks at BAGEL-7B heads,
# 7B-width training rows, the first profiled). Everything it writes lands under $OUT as it goes:
# the log, the profile, and RESULTS.md with the suite's tables appended.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_out}"
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/nvidia-smi.csv" 2>&1
python3 -c "import torch, bagel_titan; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" \
    2>&1 | tee "$OUT/versions.txt"
python3 benchmarks/gpu_suite.py --profile-dir "$OUT/profile" "$@" 2>&1 | tee "$OUT/gpu_suite.log"
status=${PIPESTATUS[0]}
cp benchmarks/RESULTS.md "$OUT/RESULTS.md"
exit "$status"
