#
# tops-job, CPU image (NumPy backend).
#
#   podman build -t tops-job:cpu .          (or docker build; no BuildKit frontend is pulled)
#   podman run --rm -e AGGREGATOR_URL=http://aggregator:8081/verify \
#       -e TOPS_JOB_KEY_FILE=/run/secrets/worker.key \
#       -v tops-job-data:/var/lib/tops-job -v tops-job-cache:/var/cache/tops-job \
#       tops-job:cpu run --attempts 100
#
# The GPU image is Containerfile.gpu. tests/infra/test_images.py lints both files;
# tests/infra/test_images_built.py builds them with podman on a debootstrapped stand-in
# base (infra/images/standin_base.py, passed as PYTHON_IMAGE / CUDA_IMAGE: the files
# themselves are built unchanged) and runs them.
#
# Reproducible: every Python dependency is pinned with hashes in
# infra/images/requirements.lock (refreshed by infra/images/lock.sh); pin the base by
# digest too, e.g. --build-arg PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:...

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------
# Stage 1: build wheels for the project and every dependency.
# Nothing from this stage but /wheels reaches the final image (no compiler, no build
# backend, no source tree).
# ---------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS build

WORKDIR /src
# The locked dependencies first, on their own layer: an edit to the source re-runs only
# the project's wheel below, not this download. The cache mount keeps pip's downloads
# between builds without putting them in any layer.
COPY infra/images/requirements.lock infra/images/
RUN --mount=type=cache,target=/root/.cache/pip,sharing=locked \
    python -m pip wheel --disable-pip-version-check --wheel-dir /wheels \
        --require-hashes -r infra/images/requirements.lock

# More projects from the build context, space-separated; the AWS plugin is opt-in (its own
# dependencies are not in the lock file):
#   --build-arg TOPS_JOB_PROJECTS=plugins/tops-job-aws --build-arg TOPS_JOB_PLUGINS=tops-job-aws
ARG TOPS_JOB_PROJECTS=""
# .dockerignore is an allow-list: only the package, its metadata and plugins/ arrive.
COPY . .
# Built from the local paths, never resolved by name: a package called tops-job on an
# index cannot end up in the image. --no-deps: the dependencies are the locked wheels
# above, and the venv stage installs with --no-index, so a dependency missing from the
# lock file fails the build instead of being fetched unpinned.
RUN --mount=type=cache,target=/root/.cache/pip,sharing=locked \
    python -m pip wheel --disable-pip-version-check --wheel-dir /wheels --no-deps . \
 && if [ -n "${TOPS_JOB_PROJECTS}" ]; then \
        python -m pip wheel --disable-pip-version-check --wheel-dir /wheels ${TOPS_JOB_PROJECTS}; \
    fi

# ---------------------------------------------------------------------------
# Stage 2: a venv at its final path, installed from the wheels only (--no-index), without
# pip inside it: the runtime has no package manager and no dev tools.
# ---------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS venv
# Extras of tops-job to install (their dependencies must be in the lock file).
ARG TOPS_JOB_EXTRAS=""
ARG TOPS_JOB_PLUGINS=""
# COPY, not a RUN --mount=type=bind,from=build: podman/buildah reuses a cached RUN whose
# bind-mounted content changed, which would ship the previous build's wheels. This stage
# is not shipped, so the copy costs no image size.
COPY --from=build /wheels /wheels
RUN python -m venv --without-pip /opt/tops-job \
 && python -m pip --python /opt/tops-job/bin/python install --no-cache-dir --no-index \
        --find-links /wheels "tops-job${TOPS_JOB_EXTRAS}" ${TOPS_JOB_PLUGINS} \
 && /opt/tops-job/bin/tops-job --version

# ---------------------------------------------------------------------------
# Stage 3: runtime.
# ---------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

# tini is PID 1: it forwards SIGTERM/SIGINT to tops-job (a Python process as PID 1 would
# get no default signal dispositions) and reaps zombies. -g signals the whole process group.
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini=0.19.0-1+b3 \
 && rm -rf /var/lib/apt/lists/*

# Numeric uid/gid so Kubernetes' runAsNonRoot can verify it without /etc/passwd.
# Any UID works too (OpenShift's restricted SCC, `--user`): such a user runs with group 0,
# so what the job writes is owned by group 0 and group-writable (g=u), as OpenShift asks.
RUN groupadd --system --gid 10001 tops-job \
 && useradd --system --uid 10001 --gid 0 --groups tops-job --home-dir /home/tops-job \
        --create-home --shell /usr/sbin/nologin tops-job \
 && install -d -o 10001 -g 0 -m 0770 /var/lib/tops-job /var/cache/tops-job \
 && chgrp 0 /home/tops-job && chmod 0770 /home/tops-job

COPY --from=venv /opt/tops-job /opt/tops-job

# Everything the job writes lives under the two volumes, so the container runs with a
# read-only root filesystem:
#   /var/lib/tops-job   ledger, summaries, durable outbox (must outlive the container:
#                       receipts left there are sent by the next run), generated key,
#                       the aggregator's database when the image serves as one
#   /var/cache/tops-job autotune profile cache (safe to lose; saves the tuning time)
ENV PATH="/opt/tops-job/bin:${PATH}" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TOPS_JOB_DATA_DIR=/var/lib/tops-job \
    TOPS_JOB_CACHE_DIR=/var/cache/tops-job \
    TOPS_JOB_CONFIG_DIR=/var/lib/tops-job/config \
    TOPS_JOB_LOG_FORMAT=json
VOLUME ["/var/lib/tops-job", "/var/cache/tops-job"]

USER 10001:0
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

# Last, so that a new version or revision reuses every layer above and changes only the
# image's configuration. CREATED: the commit time (git log -1 --format=%cI), not the
# build's clock, so two builds of one commit carry the same labels.
ARG VERSION=0.0.0
ARG REVISION=unknown
ARG CREATED=1970-01-01T00:00:00Z
ARG SOURCE=https://example.invalid/tops-job
LABEL org.opencontainers.image.title="tops-job" \
      org.opencontainers.image.description="Proof-of-compute batch worker (CPU / NumPy backend)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.documentation="${SOURCE}/blob/${REVISION}/README.md#images"
