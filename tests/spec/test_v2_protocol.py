"""tops-receipt/2 library (docs/spec/receipt-v2.md): commit → challenge → open, strict
encodings, the header-computed cost cap, and the attacks of issue 11 at the library level."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from tests.spec.v2_helpers import THIEF_SECRET, make, product, resigned
from tops_job.spec.errors import ReceiptInvalid
from tops_job.spec.v2 import (
    COST_CAP,
    FIAT_SHAMIR,
    S_DEFAULT,
    S_FS,
    KeptCommitment,
    VerifierBusy,
    challenge_leaves,
    check_commitment,
    check_opened,
    cost_of,
    fs_leaves,
    leaf_count,
    max_tile_for,
    parse_json,
    recorded_commitment,
    seed_of,
    verify_challenge_transcript,
    verify_fs_receipt,
)
from tops_job.spec.v2 import openings as openings_module
from tops_job.spec.v2.product import tile_values

KEY = bytes(range(32))


def _code(call) -> str:
    with pytest.raises(ReceiptInvalid) as info:
        call()
    return info.value.code


def test_honest_exchange_is_accepted_with_the_stated_soundness():
    made = make()
    committed = check_commitment(made.commitment, s=S_DEFAULT)
    leaves = challenge_leaves(KEY, committed.digest, S_DEFAULT, committed.leaf_count)
    verified = check_opened(committed, leaves, made.opened(leaves))
    assert verified.ops == 2 * 8 * 32 * 256
    assert verified.soundness == "(1-f)^64"
    assert verified.digest == made.digest


def test_a_recorded_commitment_rebuilds_what_its_check_returned():
    made = make()
    committed = check_commitment(made.commitment, s=S_DEFAULT)
    kept = json.dumps(made.commitment, sort_keys=True, separators=(",", ":"))  # as the aggregator stores it
    assert recorded_commitment(json.loads(kept), s=S_DEFAULT) == committed
    cheat = make(skip_rows=8)  # every row of C left as zeros: the product check still runs on a rebuilt one
    rebuilt = recorded_commitment(json.loads(json.dumps(cheat.commitment)), s=S_DEFAULT)
    leaves = challenge_leaves(KEY, rebuilt.digest, S_DEFAULT, rebuilt.leaf_count)
    assert _code(lambda: check_opened(rebuilt, leaves, cheat.opened(leaves))) == "wrong_product"


def test_challenge_is_a_function_of_key_and_digest_only():
    made = make()
    one = challenge_leaves(KEY, made.digest, 64, 32)
    assert one == challenge_leaves(KEY, made.digest, 64, 32)  # posting again cannot re-roll it
    assert one != challenge_leaves(bytes(32), made.digest, 64, 32)  # the worker cannot compute it without K_v


@pytest.mark.parametrize("key_length", [32, 63, 64, 65, 200])  # RFC 2104: a key over the block size is hashed first
def test_challenge_leaves_are_the_spec_hmac_for_any_key_length(key_length):
    import hashlib
    import hmac
    import random
    import struct

    draw = random.Random(key_length)
    for _ in range(20):
        key, digest = draw.randbytes(key_length), draw.randbytes(32)
        leaf_count = draw.choice([1, 7, 4096, (1 << 40) + 7, 1 << 64])  # beyond 2^32: all 8 bytes count
        expected = [struct.unpack("<Q", hmac.new(key, b"tops-receipt/2:open\x00" + digest + struct.pack("<I", j),
                                                 hashlib.sha256).digest()[:8])[0] % leaf_count for j in range(64)]
        assert challenge_leaves(key, digest, 64, leaf_count) == expected


def test_kept_commitment_reopens_from_leaf_hashes_without_c():
    made = make(m=6, n=20, tile=7)  # ragged tiles
    kept = KeptCommitment(made.header, made.tree.levels[0])
    leaves = list(range(leaf_count(made.header)))
    assert kept.open(leaves) == made.opened(leaves)["openings"]


def test_tile_values_are_the_same_in_small_chunks():
    made = make(m=3, n=16, k=512, tile=5)
    seed_leaves = list(range(leaf_count(made.header)))
    seed = seed_of(made.header)
    big = tile_values(seed, n=16, k=512, tile=5, leaves=seed_leaves)
    small = tile_values(seed, n=16, k=512, tile=5, leaves=seed_leaves, chunk_elements=64)
    full = product(seed, 3, 16, 512)
    for leaf in seed_leaves:
        row, t = divmod(leaf, 4)
        assert np.array_equal(big[leaf], full[row, t * 5: t * 5 + 5])
        assert np.array_equal(small[leaf], big[leaf])


@pytest.mark.parametrize("leaves", [[13], [7, 2, 7, 13, 2], [3, 7, 11, 15, 0], [12, 13, 14, 15, 1, 5]],
                         ids=["one", "repeated", "every edge tile", "one row and one tile shared"])
def test_tile_values_of_any_subset_match_the_full_product(leaves):
    """Tiles are multiplied from slices of the generated rows: a drawn set with repeats, the
    narrow last tile of each row, a row opened in several tiles and a tile opened on several
    rows each give C's own values, in whole and in 64-element chunks."""
    made = make(m=4, n=16, k=96, tile=5)  # 4 tiles a row, the last one column wide
    seed = seed_of(made.header)
    full = product(seed, 4, 16, 96)
    for chunk in (1 << 22, 64):
        values = tile_values(seed, n=16, k=96, tile=5, leaves=leaves, chunk_elements=chunk)
        assert sorted(values) == sorted(set(leaves))
        for leaf, data in values.items():
            row, t = divmod(leaf, 4)
            assert data.dtype == np.int32 and np.array_equal(data, full[row, t * 5: t * 5 + 5])


# ---- issue 11's attack table, library level

def test_skipping_half_is_caught_by_drawn_leaves_however_long_the_worker_grinds():
    """Grinding the root changes the digest, and with it leaves the worker cannot predict:
    every one of 200 reground commitments of a half-skipped C is rejected."""
    accepted = 0
    for attempt in range(200):
        made = make(m=4, n=16, tile=8, skip_rows=2, attempt=attempt)
        committed = check_commitment(made.commitment, s=32)
        leaves = challenge_leaves(KEY, committed.digest, 32, committed.leaf_count)
        try:
            check_opened(committed, leaves, made.opened(leaves))
            accepted += 1
        except ReceiptInvalid as exc:
            assert exc.code == "wrong_product"
    assert accepted == 0  # bound: 200 * 2^-32


def test_k1_cheap_shape_is_refused():
    assert _code(lambda: check_commitment(resigned(make(), k=1), s=64)) == "bad_shape"


def test_resigned_body_fails_the_product_check():
    """Theft: another key re-signs the victim's root (pubkey and nonce redone). The seed
    binds the pubkey, so the victim's values are wrong for the thief's inputs."""
    victim = make(m=4, n=16, tile=4)
    thief = make(m=4, n=16, tile=4, secret=THIEF_SECRET, challenge=bytes.fromhex(victim.header["challenge"]))
    stolen_header = dict(thief.header, root=victim.header["root"])
    from tops_job.spec.signing import LocalKeySigner
    from tops_job.spec.v2 import digest_of
    digest = digest_of(stolen_header)
    stolen = dict(stolen_header, sig=LocalKeySigner(THIEF_SECRET).sign_digest(digest).hex())
    committed = check_commitment(stolen, s=32)
    leaves = challenge_leaves(KEY, digest, 32, committed.leaf_count)
    opened = {"digest": digest.hex(), "openings": victim.opened(leaves)["openings"]}
    assert _code(lambda: check_opened(committed, leaves, opened)) == "wrong_product"


def test_a_wrong_product_names_the_first_opening_and_entry_that_show_it():
    """The opened set is compared with the recomputed tiles in one piece; a rejection still
    names the first opening, in the drawn order, and its first entry that is not A·B."""
    cheat = make(skip_rows=1, challenge=bytes([2]) * 32)  # row 0 of C left as zeros; a fixed draw
    committed = check_commitment(cheat.commitment, s=S_DEFAULT)
    leaves = challenge_leaves(KEY, committed.digest, S_DEFAULT, committed.leaf_count)
    honest = product(seed_of(cheat.header), 8, 32, 256)
    j = next(j for j, leaf in enumerate(leaves) if leaf < 4)  # 4 tiles of 8 a row
    assert j > 0  # the first wrong opening is not the first of the draw
    row, lo = leaves[j] // 4, leaves[j] % 4 * 8
    column = lo + int(np.flatnonzero(honest[row, lo: lo + 8])[0])
    with pytest.raises(ReceiptInvalid) as info:
        check_opened(committed, leaves, cheat.opened(leaves))
    assert (info.value.code, info.value.detail) == ("wrong_product", f"opening {j}: C[{row}][{column}] is not A·B")


def test_a_rejected_opening_gets_the_same_answer_every_time():
    made = make(skip_rows=4)
    codes = set()
    for _ in range(5):
        try:
            verify_challenge_transcript(made.commitment, made.opened(challenge_leaves(
                KEY, made.digest, 32, 32)), verifier_key=KEY, s=32)
            codes.add("accept")
        except ReceiptInvalid as exc:
            codes.add(exc.code)
    assert codes == {"wrong_product"}


def test_amplification_header_is_refused_before_any_work():
    header = resigned(make(), m=1, n=8, k=262144, tile=8)
    assert cost_of(header, 64) > COST_CAP
    begun = time.perf_counter()
    assert _code(lambda: check_commitment(header, s=64)) == "cost_over_cap"
    assert time.perf_counter() - begun < 0.5


def test_resource_failure_is_busy_not_a_verdict(monkeypatch):
    made = make()
    committed = check_commitment(made.commitment, s=32)
    leaves = challenge_leaves(KEY, committed.digest, 32, committed.leaf_count)

    def exhausted(*args, **kwargs):
        raise MemoryError
    monkeypatch.setattr(openings_module, "tile_values", exhausted)
    with pytest.raises(VerifierBusy):
        check_opened(committed, leaves, made.opened(leaves))


@pytest.mark.parametrize("node", ["67 0b 98 " + "ab " * 28 + "cd", "AB" * 32, "0x" + "ab" * 31, "ab" * 31 + "a"])
def test_audit_path_entries_are_exact_hex(node):
    made = make()
    committed = check_commitment(made.commitment, s=32)
    leaves = challenge_leaves(KEY, committed.digest, 32, committed.leaf_count)
    opened = made.opened(leaves)
    opened["openings"][0]["path"][0] = node
    assert _code(lambda: check_opened(committed, leaves, opened)) == "bad_path"


@pytest.mark.parametrize("field", ["did", "device", "dtype", "backend"])
def test_required_strings_are_not_empty(field):
    commitment = resigned(make(), **{field: ""})
    assert _code(lambda: check_commitment(commitment, s=32)) in ("bad_did", "bad_string")


@pytest.mark.parametrize("data, code", [
    ('{"a": 1}'.encode("utf-16"), "not_utf8"),
    (b"\xef\xbb\xbf{}", "not_utf8"),
    (b'{"a": 1.0}', "malformed_json"),
    (b'{"a": -0}', "malformed_json"),
    (b'{"a": 1e3}', "malformed_json"),
    (b'{"a": 1, "a": 1}', "malformed_json"),
    (b'{"a": NaN}', "malformed_json"),
    (b"[" * 9 + b"]" * 9, "malformed_json"),
    (b"\xff", "not_utf8"),
])
def test_strict_json(data, code):
    assert _code(lambda: parse_json(data)) == code


def _nested(wrappers: int) -> bytes:
    """Objects and arrays in turn, the deepest branch after siblings: wrappers + 1 levels deep
    (the innermost wrapper's empty sibling is one more)."""
    text = "1"
    for level in range(wrappers):
        text = f'{{"s": ["x", 2, {{}}], "d": {text}}}' if level % 2 else f'["a", [], {{"b": 3}}, {text}]'
    return text.encode()


@pytest.mark.parametrize("wrappers", [1, 2, 7])  # 2, 3 and 8 levels: MAX_DEPTH is 8
def test_nesting_up_to_the_limit_is_taken(wrappers):
    assert parse_json(_nested(wrappers)) is not None


@pytest.mark.parametrize("data", [_nested(8), _nested(9), _nested(40), b"[" * 100_000 + b"]" * 100_000,
                                  b'{"a": ' * 9 + b"1" + b"}" * 9])
def test_nesting_beyond_the_limit_is_malformed(data):
    assert _code(lambda: parse_json(data)) == "malformed_json"


def test_huge_integer_literal_is_out_of_range_not_converted():
    value = parse_json(b'{"m": ' + b"9" * 5000 + b"}")
    assert value["m"] == 2**53


# ---- fiat-shamir

def test_fiat_shamir_receipt_is_accepted_as_grinding_bounded():
    made = make(mode=FIAT_SHAMIR, challenge=None, m=4, n=16, tile=4)
    leaves = fs_leaves(made.digest, 16)
    assert len(leaves) == S_FS
    verified = verify_fs_receipt(dict(made.commitment, openings=made.opened(leaves)["openings"]))
    assert verified.soundness == "grinding-bounded (fiat-shamir, s=256)"


def test_fiat_shamir_receipt_with_skipped_rows_is_rejected():
    made = make(mode=FIAT_SHAMIR, challenge=None, m=4, n=16, tile=4, skip_rows=2)
    receipt = dict(made.commitment, openings=made.opened(fs_leaves(made.digest, 16))["openings"])
    assert _code(lambda: verify_fs_receipt(receipt)) == "wrong_product"


def test_max_tile_keeps_honest_receipts_under_the_cap():
    for k in (256, 1024, 4096, 16384, 65536):
        for s in (S_DEFAULT, S_FS):
            tile = max_tile_for(k, s)
            assert tile >= 1 and cost_of({"tile": tile, "k": k}, s) <= COST_CAP


def test_commitment_round_trips_through_strict_json():
    made = make()
    assert check_commitment(parse_json(json.dumps(made.commitment).encode()), s=32).digest == made.digest
