#!/usr/bin/env bash
# Fetch, here, the wheels the GPU device machine lacks, for benchmarks/gpu_check.sh there.
#
#   bash benchmarks/fetch_device_wheels.sh      # fills .whl/ (git-ignored), ~5 MB
#
# The device image (Python 3.12, CuPy, numpy, pluggy, click, requests already installed)
# cannot reach a registry; these are the packages tops_job imports on the attempt path that
# it does not have. Name `.whl` in the device call's `carry`; gpu_check.sh installs them.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
platforms=()
for n in 17 27 28 34; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl \
    coincurve pycryptodome platformdirs waitress \
    opentelemetry-api opentelemetry-sdk opentelemetry-semantic-conventions
ls -1 .whl
