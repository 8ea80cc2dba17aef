#!/usr/bin/env python3
"""Stand-in base images for building Dockerfile and Containerfile.gpu where no container
registry is reachable (CI here, air-gapped builders): debootstrap a minimal root file
system from a package archive and import it into the container engine.

    python3 infra/images/standin_base.py python  localhost/tops-job-base:python
    python3 infra/images/standin_base.py cuda    localhost/tops-job-base:cuda

then build with the shipped files unchanged, passing the base as a build argument:

    podman build --build-arg PYTHON_IMAGE=localhost/tops-job-base:python -f Dockerfile .
    podman build --build-arg CUDA_IMAGE=localhost/tops-job-base:cuda -f Containerfile.gpu .

- `python` stands in for python:3.11-slim-bookworm: Debian bookworm minbase plus Debian's
  python3 (3.11), venv, pip and `python` on PATH. The archive is the one this machine's own
  apt sources name for bookworm (/etc/apt/sources.list, /etc/apt/sources.list.d/*), so the
  build uses whatever mirror the machine is set up for; DEBIAN_MIRROR overrides it.
- `cuda` stands in for nvidia/cuda:12.x-runtime-ubuntu24.04 WITHOUT the CUDA libraries
  (they come from NVIDIA's registry only): Ubuntu 24.04 (noble) minbase, main + universe,
  ca-certificates.
  The archive: the machine's apt source for noble if it has one, else debootstrap's own
  default for Ubuntu suites (UBUNTU_MIRROR overrides both);
  the archive key is taken from the archive's ubuntu-keyring package and accepted only if
  it holds the Ubuntu archive signing key named below by fingerprint, which then checks
  the Release file debootstrap verifies every package against.

Needs root, debootstrap, gpg and the engine (ENGINE, default podman). Exit 2 on bad usage.
"""

from __future__ import annotations

import glob
import gzip
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

DEBIAN_SUITE = "bookworm"
UBUNTU_SUITE = "noble"
# Ubuntu Archive Automatic Signing Key (2018) <ftpmaster@ubuntu.com>: signs noble's Release.
UBUNTU_ARCHIVE_KEY = "F6ECB3762474EDA9D21B7022871920D1991BC93C"
PYTHON_PACKAGES = ["python3", "python3-venv", "python3-pip", "python-is-python3", "ca-certificates"]


def apt_source_uris(suite: str, sources: list[Path] | None = None) -> list[str]:
    """Archive URIs the machine's apt sources list for `suite` (one-line and deb822)."""
    if sources is None:
        sources = [Path("/etc/apt/sources.list"),
                   *map(Path, sorted(glob.glob("/etc/apt/sources.list.d/*.list"))),
                   *map(Path, sorted(glob.glob("/etc/apt/sources.list.d/*.sources")))]
    uris: list[str] = []
    for path in sources:
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if path.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields: dict[str, str] = {}
                for line in stanza.splitlines():
                    if line.startswith("#") or ":" not in line:
                        continue
                    key, value = line.split(":", 1)
                    fields[key.strip().lower()] = value.strip()
                if ("deb" in fields.get("types", "").split() and suite in fields.get("suites", "").split()
                        and fields.get("enabled", "yes").lower() != "no"):
                    uris += fields.get("uris", "").split()
        else:
            for line in text.splitlines():
                words = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
                if len(words) >= 3 and words[0] == "deb" and words[2] == suite:
                    uris.append(words[1])
    return [u.rstrip("/") for u in uris if u.startswith(("http://", "https://", "file:/"))]


def debian_mirror() -> str:
    if os.environ.get("DEBIAN_MIRROR"):
        return os.environ["DEBIAN_MIRROR"]
    uris = apt_source_uris(DEBIAN_SUITE)
    if not uris:
        sys.exit(f"error: no apt source on this machine serves {DEBIAN_SUITE}; set DEBIAN_MIRROR")
    return uris[0]


def debootstrap_script(suite: str) -> Path:
    scripts = Path("/usr/share/debootstrap/scripts")
    script = scripts / suite
    # Debian 12's debootstrap predates noble; every Ubuntu suite uses the same script.
    return script if script.exists() else scripts / "gutsy"


def ubuntu_mirror() -> str:
    """UBUNTU_MIRROR, else this machine's apt source for the suite (an Ubuntu host), else
    the default debootstrap's own script picks for the suite on amd64."""
    if os.environ.get("UBUNTU_MIRROR"):
        return os.environ["UBUNTU_MIRROR"]
    if uris := apt_source_uris(UBUNTU_SUITE):
        return uris[0]
    probe = subprocess.run(
        ["bash", "-c", 'default_mirror() { echo "$1"; exit 0; }; . "$0"; exit 1',
         str(debootstrap_script(UBUNTU_SUITE))],
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "ARCH": "amd64", "SUITE": UBUNTU_SUITE},
        capture_output=True, text=True)
    if probe.returncode != 0 or not probe.stdout.strip():
        sys.exit("error: debootstrap names no default archive for Ubuntu; set UBUNTU_MIRROR")
    return probe.stdout.strip().rstrip("/")


def fetch(url: str, target: Path) -> Path:
    with urllib.request.urlopen(url, timeout=120) as response, open(target, "wb") as out:
        shutil.copyfileobj(response, out)
    return target


def ubuntu_keyring(mirror: str, work: Path) -> Path:
    """The archive key, from the archive's ubuntu-keyring package, kept only if it is the
    key pinned by fingerprint (so a tampered package or index cannot slip in another)."""
    index = gzip.decompress(fetch(f"{mirror}/dists/{UBUNTU_SUITE}/main/binary-amd64/Packages.gz",
                                  work / "Packages.gz").read_bytes()).decode()
    stanza = re.search(r"^Package: ubuntu-keyring\n(?:.+\n)*?Filename: (\S+)", index, re.M)
    if not stanza:
        sys.exit("error: the archive has no ubuntu-keyring package")
    deb = fetch(f"{mirror}/{stanza.group(1)}", work / "ubuntu-keyring.deb")
    subprocess.run(["dpkg-deb", "-x", str(deb), str(work / "keyring")], check=True)
    gnupg = work / "gnupg"
    gnupg.mkdir(mode=0o700)
    for keyring in (work / "keyring").rglob("ubuntu-archive-keyring.gpg"):
        subprocess.run(["gpg", "--homedir", str(gnupg), "--batch", "--quiet", "--import", str(keyring)],
                       check=True, capture_output=True)
    exported = subprocess.run(["gpg", "--homedir", str(gnupg), "--batch", "--export", UBUNTU_ARCHIVE_KEY],
                              capture_output=True, check=True).stdout
    if not exported:
        sys.exit(f"error: ubuntu-keyring does not hold the archive key {UBUNTU_ARCHIVE_KEY}")
    trusted = work / "trusted.gpg"
    trusted.write_bytes(exported)
    return trusted


def debootstrap(suite: str, root: Path, mirror: str, *options: str) -> None:
    command = ["debootstrap", "--variant=minbase", *options, suite, str(root), mirror,
               str(debootstrap_script(suite))]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        log = root / "debootstrap" / "debootstrap.log"
        detail = log.read_text(errors="replace")[-4000:] if log.exists() else result.stderr[-4000:]
        sys.exit(f"error: {' '.join(command)} failed ({result.returncode}):\n{result.stdout[-2000:]}\n{detail}")


# What the official Debian/Ubuntu images (and so python:*-slim and nvidia/cuda) configure:
# apt keeps no package caches or translations in a layer, dpkg installs no documentation.
APT_CONF = {
    "docker-clean": 'DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb '
                    '/var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };\n'
                    'APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb '
                    '/var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };\n'
                    'Dir::Cache::pkgcache "";\nDir::Cache::srcpkgcache "";\n',
    "docker-no-languages": 'Acquire::Languages "none";\n',
    "docker-gzip-indexes": 'Acquire::GzipIndexes "true";\n',
}
EXCLUDED_DOCS = ["usr/share/doc", "usr/share/man", "usr/share/groff", "usr/share/info",
                 "usr/share/lintian", "usr/share/linda", "usr/share/locale"]


def slim(root: Path) -> None:
    for name, text in APT_CONF.items():
        (root / "etc/apt/apt.conf.d" / name).write_text(text)
    (root / "etc/dpkg/dpkg.cfg.d/docker").write_text(
        "".join(f"path-exclude /{d}/*\n" for d in EXCLUDED_DOCS) + "path-include /usr/share/doc/*/copyright\n")
    for directory in EXCLUDED_DOCS:
        for path in (root / directory).glob("*"):
            if directory == "usr/share/doc" and path.is_dir() and (path / "copyright").exists():
                for inner in path.iterdir():
                    if inner.name != "copyright":
                        shutil.rmtree(inner) if inner.is_dir() and not inner.is_symlink() else inner.unlink()
            elif path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
    for pattern in ("var/lib/apt/lists/*", "var/cache/apt/*.bin", "var/cache/apt/archives/*.deb",
                    "var/log/*.log", "var/log/apt/*"):
        for path in root.glob(pattern):
            if path.is_file():
                path.unlink()


def build(kind: str, tag: str, engine: str) -> None:
    with tempfile.TemporaryDirectory(prefix="tops-job-base-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        root = work / "root"
        if kind == "python":
            mirror = debian_mirror()
            debootstrap(DEBIAN_SUITE, root, mirror, "--include=" + ",".join(PYTHON_PACKAGES))
            changes = ["ENV LANG=C.UTF-8", 'CMD ["python3"]']
        else:
            mirror = ubuntu_mirror()
            keyring = ubuntu_keyring(mirror, work)
            # ca-certificates: nvidia/cuda has it (and a build that mounts the host's bundle
            # over its path cannot configure it later).
            debootstrap(UBUNTU_SUITE, root, mirror, f"--keyring={keyring}", "--components=main,universe",
                        "--include=ca-certificates")
            (root / "etc/apt/sources.list").write_text(
                f"deb {mirror} {UBUNTU_SUITE} main universe\n"
                f"deb {mirror} {UBUNTU_SUITE}-updates main universe\n")
            changes = ["ENV LANG=C.UTF-8", 'CMD ["bash"]']
        slim(root)
        tar = subprocess.Popen(["tar", "--numeric-owner", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        command = [engine, "import"]
        for change in changes:
            command += ["--change", change]
        imported = subprocess.run([*command, "-", tag], stdin=tar.stdout, capture_output=True, text=True)
        tar.stdout.close()
        if tar.wait() != 0 or imported.returncode != 0:
            sys.exit(f"error: importing {root} as {tag} failed:\n{imported.stderr}")


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("python", "cuda"):
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        print("usage: standin_base.py python|cuda TAG", file=sys.stderr)
        return 2
    for tool in ("debootstrap", "gpg", "dpkg-deb", "tar"):
        if not shutil.which(tool):
            print(f"error: {tool} not found (apt-get install debootstrap gpg)", file=sys.stderr)
            return 2
    build(argv[0], argv[1], os.environ.get("ENGINE", "podman"))
    print(argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
