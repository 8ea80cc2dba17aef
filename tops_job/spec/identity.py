"""The worker's address and DID, derived from its secp256k1 public key."""

from __future__ import annotations

import coincurve
from Crypto.Hash import keccak


def eth_address(public_key: bytes) -> str:
    """EIP-55 checksummed address: the last 20 bytes of keccak-256 of the uncompressed key."""
    point = coincurve.PublicKey(public_key).format(compressed=False)[1:]
    address = keccak.new(data=point, digest_bits=256).hexdigest()[-40:]
    checksum = keccak.new(data=address.encode("ascii"), digest_bits=256).hexdigest()
    return "0x" + "".join(c.upper() if int(checksum[i], 16) >= 8 else c for i, c in enumerate(address))


def default_did(public_key: bytes) -> str:
    """did:peaq:<address>, the identity peaq derives for an EVM key."""
    return f"did:peaq:{eth_address(public_key)}"
