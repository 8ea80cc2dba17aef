# syntax=docker/dockerfile:1.7
#
# tops-job, CPU image (NumPy backend).
#
#   docker build -t tops-job:cpu .
#   docker run --rm -e AGGREGATOR_URL=http://aggregator:8081/verify \
#       -e TOPS_JOB_KEY_FILE=/run/secrets/worker.key \
#       -v tops-job-data:/var/lib/tops-job -v tops-job-cache:/var/cache/tops-job \
#       tops-job:cpu run --attempts 100
#
# The GPU image is Containerfile.gpu. tests/infra/test_images.py lints this file with
# hadolint and repeats its install steps (wheel -> fresh venv without pip -> run as a
# non-root user with a read-only home), because no container engine runs in CI.

ARG PYTHON_VERSION=3.11

# ---------------------------------------------------------------------------
# Stage 1: build wheels for the project and every dependency.
# Nothing from this stage but /wheels reaches the final image (no compiler, no build
# backend, no source tree).
# ---------------------------------------------------------------------------
FROM python:${PYTHON_VERSION}-slim-bookworm AS build

# Extras of tops-job to install, e.g. --build-arg TOPS_JOB_EXTRAS="[gpu]".
ARG TOPS_JOB_EXTRAS=""
# More projects from the build context, space-separated; the AWS plugin is opt-in:
#   --build-arg TOPS_JOB_PROJECTS=plugins/tops-job-aws --build-arg TOPS_JOB_PLUGINS=tops-job-aws
ARG TOPS_JOB_PROJECTS=""

WORKDIR /src
# .dockerignore is an allow-list: only the package, its metadata and plugins/ arrive.
COPY . .
# Built from the local paths, never resolved by name: a package called tops-job on an
# index cannot end up in the image.
RUN python -m pip wheel --no-cache-dir --wheel-dir /wheels ".${TOPS_JOB_EXTRAS}" ${TOPS_JOB_PROJECTS}

# ---------------------------------------------------------------------------
# Stage 2: a venv at its final path, installed from the wheels only (--no-index), without
# pip inside it: the runtime has no package manager and no dev tools.
# ---------------------------------------------------------------------------
FROM python:${PYTHON_VERSION}-slim-bookworm AS venv
ARG TOPS_JOB_EXTRAS=""
ARG TOPS_JOB_PLUGINS=""
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    python -m venv --without-pip /opt/tops-job \
 && python -m pip --python /opt/tops-job/bin/python install --no-cache-dir --no-index \
        --find-links /wheels "tops-job${TOPS_JOB_EXTRAS}" ${TOPS_JOB_PLUGINS} \
 && /opt/tops-job/bin/tops-job --version

# ---------------------------------------------------------------------------
# Stage 3: runtime.
# ---------------------------------------------------------------------------
FROM python:${PYTHON_VERSION}-slim-bookworm AS runtime

ARG VERSION=0.0.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="tops-job" \
      org.opencontainers.image.description="Proof-of-compute batch worker (CPU / NumPy backend)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.documentation="README.md"

# tini is PID 1: it forwards SIGTERM/SIGINT to tops-job (a Python process as PID 1 would
# get no default signal dispositions) and reaps zombies. -g signals the whole process group.
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini=0.19.0-1+b3 \
 && rm -rf /var/lib/apt/lists/*

# Numeric uid/gid so Kubernetes' runAsNonRoot can verify it without /etc/passwd.
RUN groupadd --system --gid 10001 tops-job \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/tops-job --create-home \
        --shell /usr/sbin/nologin tops-job \
 && install -d -o 10001 -g 10001 -m 0750 /var/lib/tops-job /var/cache/tops-job

COPY --from=venv /opt/tops-job /opt/tops-job

# Everything the job writes lives under the two volumes, so the container runs with a
# read-only root filesystem:
#   /var/lib/tops-job   ledger, summaries, durable outbox (must outlive the container:
#                       receipts left there are sent by the next run), generated key
#   /var/cache/tops-job autotune profile cache (safe to lose; saves the tuning time)
ENV PATH="/opt/tops-job/bin:${PATH}" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TOPS_JOB_DATA_DIR=/var/lib/tops-job \
    TOPS_JOB_CACHE_DIR=/var/cache/tops-job \
    TOPS_JOB_CONFIG_DIR=/var/lib/tops-job/config \
    TOPS_JOB_LOG_FORMAT=json
VOLUME ["/var/lib/tops-job", "/var/cache/tops-job"]

USER 10001:10001
WORKDIR /var/lib/tops-job

# Health server (METRICS_ENABLED=1): /health, /metrics, /metrics.json.
EXPOSE 8082

# HEALTHCHECK: deliberately none. This is a batch job, judged by its exit code
# (README.md, "Exit codes under each scheduler"). A Docker health check that fails would only mark the
# container unhealthy (or, under Swarm/compose restart policies, kill a job that is doing
# useful work or draining its outbox); Kubernetes, AWS Batch and Slurm ignore the
# instruction altogether. The /health endpoint exists for schedulers that do probe
# (a Kubernetes startup/liveness probe), and is opt-in via METRICS_ENABLED=1, so a
# HEALTHCHECK baked into the image would report a job that runs without it as unhealthy.
HEALTHCHECK NONE

STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/tini", "-g", "--", "tops-job"]
CMD ["run", "--attempts", "100", "--backend", "numpy"]
