#!/usr/bin/env bash
# Device check for the CuPy backend (issue 7): one call, at most 8 minutes on one H200.
#
#   benchmarks/gpu_check.sh [gpu_check.py options, e.g. --dtypes bfloat16,int8 --target-ms 300]
#
# Runs from the repository root under the machine's python3 (on the device image that is
# Python 3.12 with CuPy and nvidia-ml-py already installed). tops_job is put on PYTHONPATH,
# not installed. The image lacks opentelemetry, coincurve, platformdirs, pycryptodome and
# waitress, so the whole-attempt stage runs through run_attempt only when they travel as
# wheels in .whl/ (`bash benchmarks/fetch_device_wheels.sh` here, then carry `.whl`);
# without them gpu_check.py uses a stand-in with the same stages minus the signature, and
# says so in its output. Results land in $OUT (gpu_check.json, gpu_check.md) when set.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/tops-site .whl/*.whl
    export PYTHONPATH="/tmp/tops-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export CUPY_CACHE_DIR="${CUPY_CACHE_DIR:-/tmp/tops-cupy-cache}"
nvidia-smi --query-gpu=name,uuid,driver_version,clocks.max.sm,power.limit --format=csv,noheader || true
# Budget of the 480 s call: pytest at most 100 s, the check at most 330 s (it stops starting
# new work at 300 s and rewrites its JSON after every dtype), the rest for start-up.
# The GPU tests first (roots vs the CPU on every dtype, an 8192³ product), their whole log
# kept under $OUT, then the timed check.
LOG="${OUT:-/tmp}/pytest.log"
mkdir -p "$(dirname "$LOG")"
timeout 100 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/compute/test_gpu_backend.py \
    tests/compute/test_gpu_emulated.py tests/compute/test_selftest.py >"$LOG" 2>&1 \
    || echo "pytest: exit $? (124: stopped at its 100 s bound); full log in $LOG"
tail -n 40 "$LOG"
exec timeout 330 python3 benchmarks/gpu_check.py "$@"
