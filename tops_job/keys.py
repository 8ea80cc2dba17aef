"""Worker keys: where the secret comes from and key files (the address and DID derived
from a key are protocol: tops_job.spec.identity)."""

from __future__ import annotations

import errno
import os
import re
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

import coincurve

from tops_job.errors import ConfigError
from tops_job.files import private_dir

_SECRET_HEX = re.compile(r"(0x)?[0-9a-fA-F]{64}")
KEY_FILE_NAME = "worker.key"


@dataclass(frozen=True)
class KeySource:
    """A secret key and where it came from (the source is logged; the key never is)."""

    secret: bytes
    origin: str  # "WORKER_SK_HEX", "TOPS_JOB_KEY_FILE (path)", "generated (path)", …
    generated: bool = False

    def __repr__(self) -> str:  # keep the secret out of tracebacks and logs
        return f"KeySource(origin={self.origin!r}, generated={self.generated})"


def parse_secret_hex(text: str, variable: str) -> bytes:
    """A 32-byte secret from hex; errors name the variable and never echo the value."""
    text = text.strip()
    if not _SECRET_HEX.fullmatch(text):
        raise ConfigError(variable, "must be 64 hexadecimal characters (32 bytes), optionally 0x-prefixed")
    secret = bytes.fromhex(text[2:] if text.startswith("0x") else text)
    try:
        coincurve.PrivateKey(secret)
    except Exception:
        raise ConfigError(variable, "is not a valid secp256k1 secret key (zero or not below the curve order)") from None
    return secret


def read_key_file(path: Path, variable: str) -> bytes:
    """A key file holds the secret as hex. Refused, like ssh, when group or world can access
    it; also when it is a symlink (someone else could point it at their key) or belongs to
    another user. The checks are made on the open file, not on the name."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ConfigError(variable, f"key file {path} is a symbolic link; give the file itself") from None
        raise ConfigError(variable, f"cannot read key file {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(variable, f"key file {path} is not a regular file")
        if info.st_uid != os.geteuid():
            raise ConfigError(variable, f"key file {path} belongs to uid {info.st_uid}, not to this user "
                              f"(uid {os.geteuid()}); it must be the user's own file")
        mode = info.st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(variable, f"key file {path} is accessible by group or others "
                              f"(mode {stat.S_IMODE(mode):04o}); run chmod 600 {path}")
        try:
            text = handle.read(4096).decode("ascii")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(variable, f"cannot read key file {path}: {exc}") from None
    return parse_secret_hex(text, f"{variable} ({path})")


def write_key_file(path: Path, secret: bytes | None = None) -> bytes:
    """Write a new (or given) secret to `path` with mode 0600, never overwriting a file.

    The file appears whole or not at all (temp file, fsync, then a hard link that fails if
    `path` exists): several workers starting at once may race to create the key, and none
    may read a half-written one."""
    secret = secret or coincurve.PrivateKey().secret
    private_dir(path.parent)  # 0700 whatever the umask
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".key-")  # mode 0600
    try:
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            handle.write(secret.hex() + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.link(tmp, path)  # FileExistsError when another process won the race
    finally:
        os.unlink(tmp)
    return secret


def resolve_key(secret: bytes | None, key_file: Path | None, config_dir: Path) -> KeySource:
    """The secret from WORKER_SK_HEX, else TOPS_JOB_KEY_FILE, else the key generated once into
    the config dir."""
    if secret is not None:
        return KeySource(secret, "WORKER_SK_HEX")
    if key_file is not None:
        return KeySource(read_key_file(key_file, "TOPS_JOB_KEY_FILE"), f"TOPS_JOB_KEY_FILE ({key_file})")
    path = config_dir / KEY_FILE_NAME
    if path.exists():
        return KeySource(read_key_file(path, "key file"), f"key file ({path})")
    try:
        secret = write_key_file(path)
    except FileExistsError:  # another process generated it first
        return KeySource(read_key_file(path, "key file"), f"key file ({path})")
    except OSError as exc:
        raise ConfigError("TOPS_JOB_CONFIG_DIR", f"cannot create key file {path}: {exc.strerror}") from None
    return KeySource(secret, f"generated ({path})", generated=True)
