"""Spec §1–§2: seed, keys, SplitMix64 and element layout."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tops_job.spec.inputs import (
    attempt_seed,
    element_rows,
    fill_elements,
    matrix_key,
    nonce_from_challenge,
    padded_size,
    splitmix64,
    splitmix64_words,
)


def test_splitmix64_check_value_from_spec():
    assert splitmix64(1234567, 0) == 6457827717110365317


def test_vectorised_splitmix_matches_reference():
    keys = [0, 1, 1234567, 2**64 - 1, 0x9E3779B97F4A7C15]
    for key in keys:
        idx = np.array([0, 1, 2, 15, 16, 2**32, 2**40 + 3], dtype=np.uint64)
        assert splitmix64_words(key, idx).tolist() == [splitmix64(key, int(i)) for i in idx]


def _reference_element(key: int, f: int) -> int:
    return ((splitmix64(key, f >> 4) >> (4 * (f & 15))) & 15) - 8


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, np.int8, np.int32])
def test_fill_matches_element_formula(dtype):
    out = np.empty(padded_size(100), dtype)
    fill_elements(4242, out)
    assert out.astype(int).tolist() == [_reference_element(4242, f) for f in range(out.size)]


def test_threaded_fill_equals_single_thread():
    single = np.empty(padded_size(600_000), np.float32)
    fill_elements(7, single)
    threaded = np.empty_like(single)
    with ThreadPoolExecutor(2) as pool:
        fill_elements(7, threaded, pool, 2)
    assert np.array_equal(single, threaded)
    assert single.min() == -8 and single.max() == 7


@settings(max_examples=50, deadline=None)
@given(key=st.integers(0, 2**64 - 1), start=st.integers(0, 2**40), length=st.integers(1, 70))
def test_element_rows_match_formula_anywhere(key, start, length):
    row = element_rows(key, np.array([start], dtype=np.uint64), length)[0]
    assert row.tolist() == [_reference_element(key, start + i) for i in range(length)]


@settings(max_examples=30, deadline=None)
@given(key=st.integers(0, 2**64 - 1), starts=st.lists(st.integers(0, 2**40), min_size=1, max_size=40),
       length=st.integers(1, 70))
def test_element_rows_of_many_starts_match_formula(key, starts, length):
    """Rows at different offsets into their first word, and rows at the same one (copied together)."""
    rows = element_rows(key, np.array(starts, dtype=np.uint64), length)
    assert rows.shape == (len(starts), length) and rows.flags.c_contiguous
    assert rows.tolist() == [[_reference_element(key, start + i) for i in range(length)] for start in starts]


@pytest.mark.parametrize("offset,length", [(0, 32), (0, 40), (5, 32), (15, 17)])
def test_element_rows_starting_alike_match_formula(offset, length):
    """Rows at the same place in their first word (a verifier's rows when k % 16 == 0) are
    generated in one piece; whole words are returned as generated."""
    starts = [offset + 16 * w for w in (0, 3, 1000, 2**36)]
    rows = element_rows(99, np.array(starts, dtype=np.uint64), length)
    assert rows.shape == (len(starts), length) and rows.flags.c_contiguous
    assert rows.tolist() == [[_reference_element(99, start + i) for i in range(length)] for start in starts]


def test_element_rows_of_no_starts_is_empty():
    assert element_rows(1, np.array([], dtype=np.uint64), 8).shape == (0, 8)


def test_fill_rejects_unaligned_buffer():
    with pytest.raises(ValueError):
        fill_elements(1, np.empty(17, np.float32))


def test_seed_and_keys_follow_the_formulas():
    import hashlib
    import struct

    nonce = bytes(range(32))
    seed = attempt_seed("did:x", nonce)
    assert seed == hashlib.sha256(b"tops-receipt/1:seed\x00did:x\x00" + nonce).digest()
    assert matrix_key(seed, "A") == struct.unpack("<Q", hashlib.sha256(seed + b"A").digest()[:8])[0]
    assert nonce_from_challenge(b"c" * 32, 5) == hashlib.sha256(b"c" * 32 + struct.pack("<Q", 5)).digest()
