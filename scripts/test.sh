#!/usr/bin/env bash
# Install everything the test suite needs, then run it. The README's second quick-start
# command, and what CI runs (.ci/run). Safe to re-run: installed pieces are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

# System tools the tests drive for real: promtool, headless Chromium, a one-node Slurm,
# podman (runc: crun refuses hybrid cgroups; catatonit: a pod's infra process) and
# debootstrap for the images' stand-in bases, libfaketime, PostgreSQL. (kubectl, hadolint and shellcheck come from
# PyPI with the test extra.) Installed only when missing, so a developer's second run is fast.
need=()
command -v promtool >/dev/null || need+=(prometheus)
command -v chromium >/dev/null || need+=(chromium)
command -v slurmctld >/dev/null || need+=(slurm-wlm)
command -v munged >/dev/null || need+=(munge)
command -v podman >/dev/null || need+=(podman)
command -v runc >/dev/null || need+=(runc)
[ -x /usr/libexec/podman/catatonit ] || command -v catatonit >/dev/null || need+=(catatonit)
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v gpg >/dev/null || need+=(gpg)
command -v g++ >/dev/null || need+=(g++)  # the GPU kernels, compiled as host C++ for the emulated-device tests
# libfaketime steps the wall clock under a run (tests/job/test_stop_and_clock.py).
compgen -G '/usr/lib/*/faketime/libfaketime.so.1' >/dev/null || need+=(faketime)
# A throw-away PostgreSQL cluster for the aggregator's replica tests (initdb is not on PATH).
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || need+=(postgresql)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get -o DPkg::Lock::Timeout=600 update -qq
    # One package at a time: a package missing from this release must not block the rest
    # (its tests then skip and say why).
    for package in "${need[@]}"; do
      apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "$package" >/dev/null || echo "warning: could not install $package" >&2
    done
  else
    echo "note: not root or no apt-get; tests needing ${need[*]} will skip" >&2
  fi
fi

# Outside a virtualenv, Debian's own python3 is "externally managed" (PEP 668) and pip
# refuses to install into it; running the suite with the system Python is a supported way,
# so say yes to it explicitly there (a venv never needs it).
pip_flags=(-q --disable-pip-version-check)
if python3 -c 'import sys, sysconfig, pathlib; sys.exit(sys.prefix != sys.base_prefix or not (pathlib.Path(sysconfig.get_paths()["stdlib"]) / "EXTERNALLY-MANAGED").exists())'; then
  pip_flags+=(--break-system-packages)
fi
python3 -m pip install "${pip_flags[@]}" -e '.[test]' -e plugins/tops-job-aws

# Lint and types first: a minute of pytest is wasted on code that does not type-check.
python3 -m ruff check tops_job tests plugins benchmarks scripts infra
python3 -m mypy

exec python3 -m pytest -q tests plugins/tops-job-aws/tests "$@"
