"""Attempt seed and input matrices (spec §1, §2).

Every element is a nibble of a SplitMix64 word, so any row can be generated on its own:
the worker fills whole matrices, the verifier only the rows an opening needs.
"""

from __future__ import annotations

import hashlib
import struct
from concurrent.futures import Executor

import numpy as np

SEED_TAG = b"tops-receipt/1:seed"
GOLDEN = np.uint64(0x9E3779B97F4A7C15)
MIX1 = np.uint64(0xBF58476D1CE4E5B9)
MIX2 = np.uint64(0x94D049BB133111EB)
ELEMENTS_PER_WORD = 16


def attempt_seed(did: str, nonce: bytes) -> bytes:
    """seed = H("tops-receipt/1:seed" || 0x00 || did || 0x00 || nonce)."""
    return hashlib.sha256(SEED_TAG + b"\x00" + did.encode("ascii") + b"\x00" + nonce).digest()


def matrix_key(seed: bytes, tag: str) -> int:
    """key_X = u64le⁻¹(H(seed || X)[0:8]) for X in "A", "B"."""
    key: int = struct.unpack("<Q", hashlib.sha256(seed + tag.encode("ascii")).digest()[:8])[0]
    return key


def nonce_from_challenge(challenge: bytes, attempt: int) -> bytes:
    """nonce = H(challenge || u64le(attempt)) for runs with an aggregator challenge."""
    return hashlib.sha256(challenge + struct.pack("<Q", attempt)).digest()


def splitmix64_words(key: int, word_index: np.ndarray) -> np.ndarray:
    """word_X[w] for each w in `word_index` (uint64), computed in place on a fresh array."""
    z: np.ndarray = word_index + np.uint64(1)
    z *= GOLDEN
    z += np.uint64(key)
    z ^= z >> np.uint64(30)
    z *= MIX1
    z ^= z >> np.uint64(27)
    z *= MIX2
    z ^= z >> np.uint64(31)
    return z


def splitmix64(key: int, index: int) -> int:
    """One SplitMix64 output in pure Python; the reference the vectorised code is tested against."""
    mask = (1 << 64) - 1
    z = (key + (index + 1) * 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


_WORDS_PER_SLICE = 1 << 14  # 256 K elements: a slice's passes stay in the L2 cache
_LOW, _HIGH = np.uint8(15), np.uint8(4)


def padded_size(elements: int) -> int:
    """Elements a fill buffer needs: whole words, so the last word expands in place."""
    return -(-elements // ELEMENTS_PER_WORD) * ELEMENTS_PER_WORD


def _expand_words(words: np.ndarray, out: np.ndarray) -> None:
    """The 16 elements of each word into `out` (len 16·len(words)), in any numeric dtype.

    A little-endian word's byte b holds elements 2b (low nibble) and 2b+1 (high nibble), so
    two byte-wide passes and two strided converting writes do it: half the passes of
    extracting each nibble from the word, and no wide temporaries."""
    octets = words.view(np.uint8)
    np.subtract(octets & _LOW, 8, out=out[0::2], dtype=out.dtype, casting="unsafe")
    np.subtract(octets >> _HIGH, 8, out=out[1::2], dtype=out.dtype, casting="unsafe")


def _expand_slice(key: int, out: np.ndarray, lo: int, hi: int) -> None:
    """Elements of words lo..hi-1 into out[16·lo : 16·hi]."""
    _expand_words(splitmix64_words(key, np.arange(lo, hi, dtype=np.uint64)), out[lo * 16 : hi * 16])


def fill_elements(key: int, out: np.ndarray, executor: Executor | None = None, chunks: int = 1) -> None:
    """Write elements 0..len(out)-1 of the matrix keyed `key` into the flat buffer `out`.

    `out` must be contiguous, with a length that is a multiple of 16 (see `padded_size`).
    The work is split in `chunks` pieces run on `executor`: NumPy releases the GIL inside
    these loops, so two threads fill about twice as fast on two cores.
    """
    if out.ndim != 1 or out.size % ELEMENTS_PER_WORD or not out.flags.c_contiguous:
        raise ValueError("fill buffer must be flat and contiguous with a multiple of 16 elements")
    words_total = out.size // ELEMENTS_PER_WORD

    def fill(word_lo: int, word_hi: int) -> None:
        for lo in range(word_lo, word_hi, _WORDS_PER_SLICE):
            _expand_slice(key, out, lo, min(word_hi, lo + _WORDS_PER_SLICE))

    if executor is None or chunks <= 1 or words_total < 4 * _WORDS_PER_SLICE:
        fill(0, words_total)
        return
    bounds = np.linspace(0, words_total, chunks + 1).astype(int)
    futures = [executor.submit(fill, int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]
    for future in futures:
        future.result()


def element_rows(key: int, starts: np.ndarray, length: int) -> np.ndarray:
    """Rows of elements as float32: row r is elements starts[r] .. starts[r]+length-1.

    Used by the verifier: O(length) per row, independent of the matrix size. float32 is
    exact here, and so is a dot product of two rows (|Σ| ≤ 64·k < 2²⁴ for k ≤ 262144).
    """
    starts = np.asarray(starts, dtype=np.uint64)
    rows = len(starts)
    offsets = (starts & np.uint64(15)).tolist()  # where each row starts in its first word
    first = offsets[0] if offsets else 0
    same = len(set(offsets)) <= 1  # always when k % 16 == 0: rows start at multiples of k
    words_per_row = (first + length + 15) // 16 if same else (length + 15) // 16 + 1
    word_index = (starts >> np.uint64(4))[:, None] + np.arange(words_per_row, dtype=np.uint64)[None, :]
    flat = np.empty(rows * words_per_row * 16, np.float32)
    _expand_words(splitmix64_words(key, word_index.reshape(-1)), flat)
    nibbles = flat.reshape(rows, words_per_row * 16)
    if same:  # one copy, or none when the rows are whole words
        return nibbles if nibbles.shape[1] == length else np.ascontiguousarray(nibbles[:, first : first + length])
    out = np.empty((rows, length), np.float32)
    for row, offset in enumerate(offsets):
        out[row] = nibbles[row, offset : offset + length]
    return out
