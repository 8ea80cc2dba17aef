#!/usr/bin/env bash
# Fetch, here, the wheels the GPU device machine lacks, for benchmarks/gpu_check.sh there.
#
#   bash benchmarks/fetch_device_wheels.sh      # fills .whl/ (git-ignored), ~7 MB
#
# The device image (Python 3.12, CuPy, numpy, pluggy, click, requests already installed)
# cannot reach a registry; these are the packages `tops-job run` imports (the attempt path,
# telemetry's exporters, the in-process aggregator) that it does not have. protobuf travels
# too: the image's may be older than googleapis-common-protos needs. Name `.whl` in the device call's `carry`; gpu_check.sh installs them.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
platforms=()
for n in 17 27 28 34; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl \
    coincurve pycryptodome platformdirs waitress \
    opentelemetry-api opentelemetry-sdk opentelemetry-semantic-conventions \
    opentelemetry-exporter-prometheus opentelemetry-exporter-otlp-proto-http \
    opentelemetry-exporter-otlp-proto-common opentelemetry-exporter-otlp-common \
    opentelemetry-exporter-http-transport opentelemetry-proto googleapis-common-protos protobuf greenlet
ls -1 .whl
