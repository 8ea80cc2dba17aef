"""Which leaves are opened (spec §7.2, §7.3): drawn from the verifier's secret in the
challenge mode, derived through a 2^16-hash chain in the fiat-shamir mode."""

from __future__ import annotations

import hashlib
import hmac
import struct

from .encoding import tag
from .header import G_FS, S_FS

_OPEN = tag("open")
_FS = tag("fs")
_FS_OPEN = tag("fs-open")


def challenge_leaves(verifier_key: bytes, digest: bytes, s: int, leaf_count: int) -> list[int]:
    """ℓ_j = u64le⁻¹(HMAC(K_v, T("open") || digest || u32le(j))[0:8]) mod L, j < s."""
    if len(verifier_key) < 32:
        raise ValueError("the verifier key must be at least 32 bytes")
    return [struct.unpack("<Q", hmac.new(verifier_key, _OPEN + digest + struct.pack("<I", j),
                                          hashlib.sha256).digest()[:8])[0] % leaf_count for j in range(s)]


def fs_chain(digest: bytes, length: int = G_FS) -> bytes:
    """w_G: w_0 = H(T("fs") || digest), w_i = H(w_{i-1})."""
    w = hashlib.sha256(_FS + digest).digest()
    sha256 = hashlib.sha256
    for _ in range(length):
        w = sha256(w).digest()
    return w


def fs_leaves(digest: bytes, leaf_count: int, s: int = S_FS) -> list[int]:
    """ℓ_j = u64le⁻¹(H(T("fs-open") || w_G || u32le(j))[0:8]) mod L, j < S_FS."""
    w = fs_chain(digest)
    return [struct.unpack("<Q", hashlib.sha256(_FS_OPEN + w + struct.pack("<I", j)).digest()[:8])[0] % leaf_count
            for j in range(s)]
