#!/usr/bin/env python3
"""Generate the tops-receipt/2 test vectors (docs/spec/receipt-v2.md §15) from the spec's
text alone.

This is a second implementation on purpose: it imports nothing from tops_job (only hashlib,
hmac, base64 and coincurve for secp256k1), computes C in plain Python integers, builds Merkle
trees and audit paths with RFC 6962's recursive definitions, and writes canonical JSON by
hand. The test suite checks that the library accepts every valid vector with the same digest
and leaves, rejects every invalid one with the listed code, and that running this script
again reproduces the committed files byte for byte.

    python3 scripts/make_v2_vectors.py [OUT_DIR]     # default tests/vectors/v2
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import struct
import sys
from pathlib import Path

import coincurve

MASK = (1 << 64) - 1
ORDER = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
G_FS, S_FS = 1 << 16, 256


def H(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def T(name: str) -> bytes:
    return b"tops-receipt/2:" + name.encode() + b"\x00"


def u64(b: bytes) -> int:
    return struct.unpack("<Q", b[:8])[0]


# ---- §3, §4 -------------------------------------------------------------------------------

def nonce_from(challenge: bytes, pubkey: bytes, attempt: int) -> bytes:
    return H(T("nonce") + challenge + pubkey + struct.pack("<Q", attempt))


def seed_of(pubkey: bytes, did: str, nonce: bytes) -> bytes:
    return H(T("seed") + pubkey + bytes([len(did)]) + did.encode() + nonce)


def splitmix(key: int, w: int) -> int:
    z = (key + (w + 1) * 0x9E3779B97F4A7C15) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def elements(key: int, start: int, count: int) -> list[int]:
    words: dict[int, int] = {}
    out = []
    for e in range(start, start + count):
        w = e >> 4
        if w not in words:
            words[w] = splitmix(key, w)
        out.append(((words[w] >> (4 * (e & 15))) & 15) - 8)
    return out


def product(seed: bytes, m: int, n: int, k: int) -> list[list[int]]:
    key_a, key_b = u64(H(seed + b"A")), u64(H(seed + b"B"))
    a = [elements(key_a, i * k, k) for i in range(m)]
    bt = [elements(key_b, j * k, k) for j in range(n)]
    return [[sum(x * y for x, y in zip(a[i], bt[j])) for j in range(n)] for i in range(m)]


# ---- §5 -----------------------------------------------------------------------------------

def leaf_data(c: list[list[int]], n: int, tile: int) -> list[bytes]:
    return [struct.pack(f"<{len(row[lo:lo + tile])}i", *row[lo:lo + tile]) for row in c for lo in range(0, n, tile)]


def mth(d: list[bytes]) -> bytes:
    if len(d) == 1:
        return H(b"\x00" + d[0])
    p = 1 << ((len(d) - 1).bit_length() - 1)
    return H(b"\x01" + mth(d[:p]) + mth(d[p:]))


def path(index: int, d: list[bytes]) -> list[bytes]:
    if len(d) == 1:
        return []
    p = 1 << ((len(d) - 1).bit_length() - 1)
    if index < p:
        return path(index, d[:p]) + [mth(d[p:])]
    return path(index - p, d[p:]) + [mth(d[:p])]


# ---- §2.7, §6 -----------------------------------------------------------------------------

def canonical(value: object) -> str:
    if isinstance(value, dict):
        return "{" + ",".join(canonical(key) + ":" + canonical(value[key]) for key in sorted(value)) + "}"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, int):
        return str(value)
    raise TypeError(value)


def digest_of(header: dict) -> bytes:
    return H(T("body") + canonical({k: v for k, v in header.items() if k not in ("sig", "openings")}).encode())


def sign(header: dict, secret: bytes) -> str:
    return coincurve.PrivateKey(secret).sign_recoverable(digest_of(header), hasher=None).hex()


# ---- §7 -----------------------------------------------------------------------------------

def challenge_leaves(key: bytes, digest: bytes, s: int, count: int) -> list[int]:
    return [u64(hmac.new(key, T("open") + digest + struct.pack("<I", j), hashlib.sha256).digest()) % count
            for j in range(s)]


def fs_leaves(digest: bytes, count: int) -> list[int]:
    w = H(T("fs") + digest)
    for _ in range(G_FS):
        w = H(w)
    return [u64(H(T("fs-open") + w + struct.pack("<I", j))) % count for j in range(S_FS)]


def openings(data: list[bytes], leaves: list[int]) -> list[dict]:
    return [{"leaf": leaf, "values": base64.b64encode(data[leaf]).decode(),
             "path": [node.hex() for node in path(leaf, data)]} for leaf in leaves]


# ---- the vectors --------------------------------------------------------------------------

WORKER = H(b"tops-receipt/2 vectors: worker key")
THIEF = H(b"tops-receipt/2 vectors: thief key")
VERIFIER = H(b"tops-receipt/2 vectors: verifier key")


def pub(secret: bytes) -> bytes:
    return coincurve.PrivateKey(secret).public_key.format(compressed=True)


class Attempt:
    """One honest attempt: header, C's leaf data, signature."""

    def __init__(self, *, mode: str, m: int, n: int, k: int, tile: int, attempt: int = 0, did: str = "did:example:worker-1",
                 run_id: str = "vectors-1", with_challenge: bool = True, telemetry: dict | None = None,
                 secret: bytes = WORKER, label: str = "x", zero_rows: int = 0):
        pubkey = pub(secret)
        header: dict = {"schema": "tops-receipt/2", "mode": mode, "did": did, "pubkey": pubkey.hex(), "run_id": run_id,
                        "attempt": attempt, "m": m, "n": n, "k": k, "tile": tile, "dtype": "float32",
                        "backend": "reference", "device": "Python integers", "elapsed_ns": 123456789,
                        "started_ms": 1764547200000}
        if with_challenge:
            challenge = H(b"run challenge " + label.encode())
            header["challenge"] = challenge.hex()
            nonce = nonce_from(challenge, pubkey, attempt)
        else:
            nonce = H(b"worker nonce " + label.encode())
        header["nonce"] = nonce.hex()
        if telemetry:
            header["telemetry"] = telemetry
        c = product(seed_of(pubkey, did, nonce), m, n, k)
        for i in range(zero_rows):  # a cheat: rows never computed
            c[i] = [0] * n
        self.data = leaf_data(c, n, tile)
        header["root"] = mth(self.data).hex()
        self.header, self.secret = header, secret

    def signed(self, **changes: object) -> dict:
        header = dict(self.header, **changes)
        return dict(header, sig=sign(header, self.secret))

    @property
    def digest(self) -> bytes:
        return digest_of(self.header)


def challenge_vector(name: str, reason: str, a: Attempt, s: int, commitment: dict | None = None,
                     opened: dict | None = None, expect: str = "accept") -> dict:
    commitment = commitment or a.signed()
    digest = digest_of(commitment)
    leaves = challenge_leaves(VERIFIER, digest, s, len(a.data))
    if opened is None:
        opened = {"digest": digest.hex(), "openings": openings(a.data, leaves)}
    return {"name": name, "reason": reason, "expect": expect, "kind": "challenge", "secret_key": a.secret.hex(),
            "verifier_key": VERIFIER.hex(), "s": s, "commitment": commitment, "digest": digest.hex(),
            "leaves": leaves, "opened": opened}


def fs_vector(name: str, reason: str, a: Attempt, receipt: dict | None = None, expect: str = "accept") -> dict:
    digest = a.digest
    leaves = fs_leaves(digest, len(a.data))
    receipt = receipt or dict(a.signed(), openings=openings(a.data, leaves))
    return {"name": name, "reason": reason, "expect": expect, "kind": "fiat-shamir", "secret_key": a.secret.hex(),
            "commitment": receipt, "digest": digest_of(receipt).hex(), "leaves": leaves}


def raw_vector(name: str, reason: str, kind: str, raw: bytes, expect: str) -> dict:
    vector = {"name": name, "reason": reason, "expect": expect, "kind": kind, "commitment_bytes_hex": raw.hex()}
    if kind == "challenge":
        vector.update(verifier_key=VERIFIER.hex(), s=32)
    return vector


def high_s(sig_hex: str) -> str:
    sig = bytes.fromhex(sig_hex)
    s = ORDER - int.from_bytes(sig[32:64], "big")
    return (sig[:32] + s.to_bytes(32, "big") + bytes([sig[64] ^ 1])).hex()


def build() -> tuple[list[dict], list[dict]]:
    base = Attempt(mode="challenge", m=4, n=24, k=256, tile=8, label="base")
    ragged = Attempt(mode="challenge", m=3, n=5, k=256, tile=2, attempt=7, label="ragged",
                     telemetry={"power_mw": 350000, "sm_clock_mhz": 1980, "temp_c": 61})
    narrow = Attempt(mode="challenge", m=1, n=17, k=272, tile=1, label="narrow", did="did:peaq:0xabc", run_id="r.2_x-3")
    fs_random = Attempt(mode="fiat-shamir", m=5, n=12, k=256, tile=4, with_challenge=False, label="fs-random")
    fs_challenged = Attempt(mode="fiat-shamir", m=2, n=7, k=320, tile=3, attempt=2, label="fs-challenged")
    valid = [
        challenge_vector("challenge-basic", "4x24x256, tile 8 (12 leaves), s = 32", base, 32),
        challenge_vector("challenge-default-s", "the same commitment opened with the default s = 64", base, 64),
        challenge_vector("challenge-ragged", "tile 2 does not divide n = 5: short last tiles, 9 leaves (carried nodes), "
                         "telemetry present", ragged, 48),
        challenge_vector("challenge-narrow", "m = 1, tile = 1, k not a multiple of 256", narrow, 32),
        fs_vector("fs-random-nonce", "fiat-shamir without a run challenge: 256 openings behind the 2^16 chain", fs_random),
        fs_vector("fs-challenged", "fiat-shamir with a run challenge, ragged tiles", fs_challenged),
    ]

    invalid: list[dict] = []

    def bad(name: str, reason: str, expect: str, commitment: dict | None = None, opened: dict | None = None,
            a: Attempt = base, s: int = 32) -> None:
        invalid.append(challenge_vector(name, reason, a, s, commitment, opened, expect))

    h = base.header
    good = base.signed()
    d = base.digest
    leaves = challenge_leaves(VERIFIER, d, 32, len(base.data))
    good_openings = openings(base.data, leaves)

    # §6 / §2 header rules
    bad("unknown-field", "a field beyond §6 (ops is computed by the verifier, never sent)", "unknown_field",
        base.signed(ops=2 * 4 * 24 * 256))
    missing = {key: value for key, value in h.items() if key != "root"}
    bad("missing-root", "root is required", "missing_field", dict(missing, sig=sign(missing, WORKER)))
    bad("m-as-string", "m must be an integer", "bad_type", base.signed(m="4"))
    bad("int-too-big", "started_ms beyond 2^53 - 1", "bad_type", base.signed(started_ms=2**53))
    bad("empty-did", "required strings are never empty", "bad_did", base.signed(did=""))
    bad("empty-device", "required strings are never empty", "bad_string", base.signed(device=""))
    bad("empty-dtype", "required strings are never empty", "bad_string", base.signed(dtype=""))
    bad("empty-backend", "required strings are never empty", "bad_string", base.signed(backend=""))
    bad("device-trailing-space", "device has no space at either end", "bad_string", base.signed(device="H200 "))
    bad("did-too-long", "did is at most 128 characters", "bad_did", base.signed(did="did:x:" + "a" * 123))
    bad("non-printable", "strings are printable ASCII", "bad_string", base.signed(device="H\u00e9200"))
    bad("schema-v1", "schema must be tops-receipt/2", "bad_schema", base.signed(schema="tops-receipt/1"))
    bad("mode-unknown", "mode is challenge or fiat-shamir", "bad_mode", base.signed(mode="interactive"))
    bad("mode-fs-to-challenge", "a fiat-shamir commitment is not answered with a challenge", "bad_mode",
        base.signed(mode="fiat-shamir"))
    bad("run-id-pattern", "run_id is [A-Za-z0-9._-]{1,64}", "bad_run_id", base.signed(run_id="run/1"))
    bad("root-uppercase", "hex is exactly [0-9a-f]{64}", "bad_hex", base.signed(root=h["root"].upper()))
    spaced = " ".join(h["root"][i:i + 2] for i in range(0, 62, 2))  # 31 bytes with spaces: bytes.fromhex takes it
    bad("root-with-spaces", "hex with spaces (31 bytes) is not 32-byte hex", "bad_hex", base.signed(root=spaced))
    bad("pubkey-0x", "pubkey is 0[23] and 64 hex characters, no prefix", "bad_hex", base.signed(pubkey="0x" + h["pubkey"]))
    bad("telemetry-bad-key", "telemetry keys are [a-z0-9_]{1,32}", "bad_telemetry", base.signed(telemetry={"Temp C": 60}))
    bad("k-one", "k = 1: C has 16 distinct rows (cheap shape), below K_MIN", "bad_shape", base.signed(k=1))
    bad("k-255", "k just below K_MIN = 256", "bad_shape", base.signed(k=255))
    bad("tile-over-256", "leaves are at most 256 columns", "bad_tile", base.signed(n=300, tile=257))
    bad("tile-over-n", "tile at most n", "bad_tile", base.signed(tile=25))
    bad("elapsed-zero", "elapsed_ns is at least 1", "bad_elapsed", base.signed(elapsed_ns=0))
    no_challenge = {key: value for key, value in h.items() if key != "challenge"}
    bad("challenge-missing", "the challenge mode needs a run challenge", "challenge_required",
        dict(no_challenge, sig=sign(no_challenge, WORKER)))
    bad("nonce-not-from-challenge", "nonce must follow from challenge, pubkey and attempt", "challenge_mismatch",
        base.signed(attempt=1))
    bad("sig-uppercase", "sig is exactly 130 characters of [0-9a-f]", "bad_hex", dict(good, sig=good["sig"].upper()))
    bad("high-s", "s above n/2 (the same signature, mirrored)", "high_s", dict(good, sig=high_s(good["sig"])))
    bad("sig-recovers-nothing", "r = 0 recovers no key", "bad_signature", dict(good, sig="00" * 32 + good["sig"][64:]))
    bad("signer-mismatch", "signed by another key than pubkey", "signer_mismatch",
        dict(h, sig=sign(h, THIEF)))
    amp = dict(h, m=1, n=8, k=262144, tile=8)
    bad("cost-over-cap", "m=1, n=8, k=262144, tile=8, s=64: cost 64*9*262144 > 2^26, refused from the header",
        "cost_over_cap", dict(amp, sig=sign(amp, WORKER)), opened={"digest": "00" * 32, "openings": []}, s=64)

    # theft: the body re-signed under another key, pubkey and nonce redone; the values are the victim's
    thief_header = dict(h, pubkey=pub(THIEF).hex(),
                        nonce=nonce_from(bytes.fromhex(h["challenge"]), pub(THIEF), h["attempt"]).hex())
    stolen = dict(thief_header, sig=sign(thief_header, THIEF))
    stolen_leaves = challenge_leaves(VERIFIER, digest_of(stolen), 32, len(base.data))
    bad("stolen-and-resigned", "another key re-signs the victim's root: the seed binds pubkey, the values fail",
        "wrong_product", stolen, {"digest": digest_of(stolen).hex(), "openings": openings(base.data, stolen_leaves)})

    # §7, §8 opened-set rules
    bad("too-few-openings", "s openings, not s - 1", "openings_count", good,
        {"digest": d.hex(), "openings": good_openings[:-1]})
    bad("opened-digest-mismatch", "the opened set names another digest", "digest_mismatch", good,
        {"digest": "11" * 32, "openings": good_openings})
    wrong_leaf = [dict(o) for o in good_openings]
    other = (leaves[0] + 1) % len(base.data)
    wrong_leaf[0] = openings(base.data, [other])[0]
    bad("wrong-leaf", "opening 0 opens a leaf of the worker's choice", "wrong_leaf", good, {"digest": d.hex(), "openings": wrong_leaf})
    extra_key = [dict(o) for o in good_openings]
    extra_key[3]["note"] = "x"
    bad("opening-extra-key", "an opening is exactly leaf, values, path", "bad_opening", good, {"digest": d.hex(), "openings": extra_key})
    short = [dict(o) for o in good_openings]
    short[1]["values"] = base64.b64encode(base.data[leaves[1]][:-4]).decode()
    bad("values-short", "values decode to 4 * width bytes", "bad_values", good, {"digest": d.hex(), "openings": short})
    noncanon = [dict(o) for o in good_openings]
    text = noncanon[2]["values"]
    noncanon[2]["values"] = text[:-2] + chr(ord(text[-2]) ^ 1) + text[-1] if text.endswith("=") and not text.endswith("==") else text + "\n"
    bad("values-not-canonical", "base64 in its canonical form only", "bad_values", good, {"digest": d.hex(), "openings": noncanon})
    spaced_path = [dict(o, path=list(o["path"])) for o in good_openings]
    node = spaced_path[0]["path"][0]
    spaced_path[0]["path"][0] = " ".join(node[i:i + 2] for i in range(0, 62, 2))
    bad("path-node-with-spaces", "an audit-path entry with spaces (31 bytes) is not 32-byte hex", "bad_path", good,
        {"digest": d.hex(), "openings": spaced_path})
    flipped = [dict(o, path=list(o["path"])) for o in good_openings]
    flipped[0]["path"][0] = ("0" if flipped[0]["path"][0][0] != "0" else "1") + flipped[0]["path"][0][1:]
    bad("path-wrong-node", "the path does not prove the values", "bad_merkle_path", good, {"digest": d.hex(), "openings": flipped})
    changed = [dict(o) for o in good_openings]
    raw = bytearray(base.data[leaves[0]])
    raw[0] ^= 1
    changed[0]["values"] = base64.b64encode(bytes(raw)).decode()
    bad("values-changed", "values changed after the commitment: the path no longer proves them", "bad_merkle_path", good,
        {"digest": d.hex(), "openings": changed})

    # a cheat: rows 0..1 of C (half the leaves) never computed, committed as zeros
    cheat = Attempt(mode="challenge", m=4, n=24, k=256, tile=8, label="base", zero_rows=2)
    bad("half-skipped", "half of C committed as zeros: an aggregator-drawn leaf lands in it", "wrong_product", a=cheat)

    # §2 encodings on the wire (bytes)
    text_good = json.dumps(good)
    invalid.append(raw_vector("utf16-body", "bodies are UTF-8 only, never auto-detected UTF-16", "challenge",
                              text_good.encode("utf-16"), "not_utf8"))
    invalid.append(raw_vector("utf8-bom", "no byte-order mark", "challenge", b"\xef\xbb\xbf" + text_good.encode(), "not_utf8"))
    invalid.append(raw_vector("float-integer", "m written as 4.0: integers only", "challenge",
                              text_good.replace('"m": 4', '"m": 4.0').encode(), "malformed_json"))
    invalid.append(raw_vector("minus-zero", "attempt written as -0", "challenge",
                              text_good.replace('"attempt": 0', '"attempt": -0').encode(), "malformed_json"))
    invalid.append(raw_vector("duplicate-key", "a key twice", "challenge",
                              text_good.replace('"m": 4', '"m": 4, "m": 4').encode(), "malformed_json"))
    invalid.append(raw_vector("not-an-object", "a commitment is an object", "challenge", b"[1, 2]", "not_an_object"))

    # fiat-shamir receipts
    fs_good = dict(fs_random.signed(), openings=openings(fs_random.data, fs_leaves(fs_random.digest, len(fs_random.data))))
    invalid.append(fs_vector("fs-missing-openings", "a fiat-shamir receipt carries its openings", fs_random,
                             fs_random.signed(), "missing_field"))
    v1_leaves = [u64(H(b"tops-receipt/1:open\x00" + bytes.fromhex(fs_random.header["root"]) + bytes.fromhex(
        fs_random.header["nonce"]) + struct.pack("<I", j))) % len(fs_random.data) for j in range(S_FS)]
    invalid.append(fs_vector("fs-v1-leaves", "leaves chosen the v1 way (one hash of root and nonce), not through the chain",
                             fs_random, dict(fs_random.signed(), openings=openings(fs_random.data, v1_leaves)), "wrong_leaf"))
    invalid.append(fs_vector("fs-too-few", "fiat-shamir has exactly 256 openings", fs_random,
                             dict(fs_good, openings=fs_good["openings"][:16]), "openings_count"))
    fs_cheat = Attempt(mode="fiat-shamir", m=5, n=12, k=256, tile=4, with_challenge=False, label="fs-random", zero_rows=3)
    invalid.append(fs_vector("fs-skipped", "three of five rows of C committed as zeros", fs_cheat, expect="wrong_product"))
    return valid, invalid


def main() -> int:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "tests" / "vectors" / "v2"
    out.mkdir(parents=True, exist_ok=True)
    valid, invalid = build()
    for name, vectors in (("valid.jsonl", valid), ("invalid.jsonl", invalid)):
        (out / name).write_text("".join(json.dumps(v, sort_keys=True, separators=(",", ":")) + "\n" for v in vectors))
    print(f"{len(valid)} valid and {len(invalid)} invalid vectors in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
