#!/usr/bin/env bash
# Device check for the CuPy backend, in one call of about 7 minutes on one H200.
#
#   benchmarks/gpu_check.sh [gpu_check.py options, e.g. --dtypes bfloat16,int8 --target-ms 300]
#
# Runs from the repository root under the machine's python3 (on the device image that is
# Python 3.12 with CuPy and nvidia-ml-py already installed). tops_job is put on PYTHONPATH,
# not installed. The image lacks coincurve, opentelemetry, platformdirs, pycryptodome,
# waitress and greenlet: `bash benchmarks/fetch_device_wheels.sh` here fills .whl/, and the
# call carries `.whl`. Without them gpu_check.py uses a stand-in with the same stages minus
# the signature, and says so; the end-to-end stage then fails to import and says that.
#
# Three stages, each bounded, so one that hangs cannot eat the others' time:
#   1. the GPU tests (roots against the CPU on every dtype, an 8192³ product), ≤ PYTEST_S;
#   2. `tops-job run --backend cupy` end to end (autotune, self-test, v2 receipts verified
#      in-process into a local ledger, self-audit, summary), ≤ RUN_S;
#   3. `tops-job run --backend cupy` in the challenge mode, against `tops-job aggregator serve`
#      on loopback (what a fleet runs), at the profile stage 2 tuned, ≤ CHALLENGE_S (0: skip);
#      the outbox's largest size during the run is sampled;
#   4. gpu_check.py: self-test per dtype and shape, then speed against raw cuBLAS, ≤ CHECK_S.
# Logs and results land in $OUT when set (pytest.log, run.log, run_summary.json,
# challenge.log, challenge_summary.json, aggregator.log, gpu_check.json, gpu_check.md).
# BACKEND=numpy runs stages 2 and 3 on the CPU (a dry run of this script without a GPU);
# DTYPE (float32) is their --dtype.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PYTEST_S=${PYTEST_S:-100} RUN_S=${RUN_S:-120} CHALLENGE_S=${CHALLENGE_S:-120} CHECK_S=${CHECK_S:-200}
BACKEND=${BACKEND:-cupy} DTYPE=${DTYPE:-float32} ATTEMPTS=${ATTEMPTS:-4} CHALLENGE_ATTEMPTS=${CHALLENGE_ATTEMPTS:-10}
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/tops-site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/tops-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export CUPY_CACHE_DIR="${CUPY_CACHE_DIR:-/tmp/tops-cupy-cache}"
OUT_DIR="${OUT:-/tmp/gpu-check}"
mkdir -p "$OUT_DIR"
nvidia-smi --query-gpu=name,uuid,driver_version,clocks.max.sm,power.limit --format=csv,noheader || true

# A run summary's timings, duration and delivery, on a few lines.
timings() {
    python3 - "$1" <<'PY' || true
import json, sys
s = json.load(open(sys.argv[1]))
t = s["timings"]
print("attempt ms", t["attempt_ms"], "\nstages ms", t["stages_ms_mean"], "\nduty", t["duty_cycle"],
      "\nduration s", s["duration_s"], "delivery", s["delivery"])
PY
}

echo "== 1. GPU tests (≤ ${PYTEST_S} s)"
timeout "$PYTEST_S" python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/compute/test_gpu_backend.py \
    tests/compute/test_gpu_emulated.py tests/compute/test_selftest.py >"$OUT_DIR/pytest.log" 2>&1 \
    || echo "pytest: exit $? (124: stopped at its ${PYTEST_S} s bound); full log in $OUT_DIR/pytest.log"
tail -n 25 "$OUT_DIR/pytest.log"

echo "== 2. tops-job run --backend $BACKEND end to end, no aggregator (≤ ${RUN_S} s)"
# Its own data, cache and config directories: the profile is tuned here, not taken from elsewhere.
export TOPS_JOB_DATA_DIR=/tmp/tops-e2e/data TOPS_JOB_CACHE_DIR=/tmp/tops-e2e/cache TOPS_JOB_CONFIG_DIR=/tmp/tops-e2e/config
timeout "$RUN_S" python3 -m tops_job run --backend "$BACKEND" --dtype "$DTYPE" --strict-device --attempts "$ATTEMPTS" --audit-every 2 \
    --summary "$OUT_DIR/run_summary.json" >"$OUT_DIR/run.log" 2>&1
echo "tops-job run: exit $?"
grep -E "autotune\] chosen|self-test|summary|attempts:|receipts:|self-audit|product time|achieved|Error|error" "$OUT_DIR/run.log" | tail -n 20
timings "$OUT_DIR/run_summary.json"

if [ "$CHALLENGE_S" -gt 0 ]; then
    echo "== 3. challenge mode against an aggregator on loopback (≤ ${CHALLENGE_S} s)"
    export TOPS_JOB_DATA_DIR=/tmp/tops-e2e/challenge-data  # the cache (profile) stays stage 2's
    mkdir -p "$TOPS_JOB_DATA_DIR"
    python3 -m tops_job aggregator serve --port 18081 --workers 4 --db /tmp/tops-e2e/aggregator.sqlite3 \
        >"$OUT_DIR/aggregator.log" 2>&1 &
    aggregator=$!
    for _ in $(seq 100); do
        python3 -c "import socket; socket.create_connection(('127.0.0.1', 18081), 0.2)" 2>/dev/null && break
        sleep 0.2
    done
    ( peak=0; while sleep 0.25; do
        size=$(du -sb "$TOPS_JOB_DATA_DIR" 2>/dev/null | cut -f1); [ "${size:-0}" -gt "$peak" ] && peak=$size
        echo "$peak" >"$OUT_DIR/challenge_peak_bytes"; done ) &
    sampler=$!
    timeout "$CHALLENGE_S" python3 -m tops_job run --backend "$BACKEND" --dtype "$DTYPE" --strict-device \
        --attempts "$CHALLENGE_ATTEMPTS" \
        --aggregator-url http://127.0.0.1:18081/verify --drain-timeout 60 \
        --summary "$OUT_DIR/challenge_summary.json" >"$OUT_DIR/challenge.log" 2>&1
    echo "tops-job run (challenge mode): exit $?; data dir peak $(cat "$OUT_DIR/challenge_peak_bytes" 2>/dev/null) bytes"
    kill "$sampler" "$aggregator" 2>/dev/null; wait "$aggregator" 2>/dev/null
    grep -E "summary|attempts:|receipts:|product time|achieved|Error|error|Traceback" "$OUT_DIR/challenge.log" | tail -n 12
    timings "$OUT_DIR/challenge_summary.json"
fi

echo "== 4. gpu_check.py (≤ ${CHECK_S} s)"
timeout $((CHECK_S + 30)) python3 benchmarks/gpu_check.py --budget-s "$CHECK_S" "$@"
