"""CUDA C for the GPU backend: input generation (spec §2) and the leaf/level hashing of the
commitment (spec §4), as source strings plus the builders that compile them with CuPy.

The source is plain C++ with a small portability prelude: with `TJ_CUDA` defined (the builders
below prepend it) it is CUDA for NVRTC; without it, it compiles with g++ as host code, and the
CPU tests run every kernel over an emulated grid and compare with `hashlib`, `inputs.py` and
`merkle.py`. So the exact code the GPU runs is tested here, without a GPU.

Nothing here imports CuPy at module level.
"""

from __future__ import annotations

from dataclasses import dataclass

# ---- dtypes --------------------------------------------------------------------------------

# cudaDataType_t (library_types.h) and cublasComputeType_t (cublas_api.h) values.
CUDA_R_32F, CUDA_R_16F, CUDA_R_16BF, CUDA_R_8I, CUDA_R_32I = 0, 2, 14, 3, 10
CUBLAS_COMPUTE_32F, CUBLAS_COMPUTE_32F_FAST_TF32, CUBLAS_COMPUTE_32I = 68, 77, 72


@dataclass(frozen=True)
class GemmType:
    """How one receipt `dtype` is stored on the device and multiplied by cuBLAS."""

    dtype: str  # the receipt's `dtype`
    element_bytes: int  # storage of one input element
    storage: str  # NumPy/CuPy dtype name of the input buffers (bfloat16 travels as uint16)
    cuda_in: int  # cudaDataType_t of A and Bt
    cuda_out: int  # cudaDataType_t of C
    compute: int  # cublasComputeType_t
    product: str  # NumPy/CuPy dtype name of C
    k_multiple: int = 1  # cuBLAS's constraint on k (the leading dimension of A and Bt)


GEMM_TYPES: dict[str, GemmType] = {
    "float32": GemmType("float32", 4, "float32", CUDA_R_32F, CUDA_R_32F, CUBLAS_COMPUTE_32F, "float32"),
    # TF32: float32 storage, tensor-core math on 10-bit mantissas; nibbles −8..7 are exact there.
    "tf32": GemmType("tf32", 4, "float32", CUDA_R_32F, CUDA_R_32F, CUBLAS_COMPUTE_32F_FAST_TF32, "float32"),
    "float16": GemmType("float16", 2, "float16", CUDA_R_16F, CUDA_R_32F, CUBLAS_COMPUTE_32F, "float32"),
    "bfloat16": GemmType("bfloat16", 2, "uint16", CUDA_R_16BF, CUDA_R_32F, CUBLAS_COMPUTE_32F, "float32"),
    # cublasGemmEx's integer path: int8 inputs, int32 C, leading dimensions multiples of 4.
    "int8": GemmType("int8", 1, "int8", CUDA_R_8I, CUDA_R_32I, CUBLAS_COMPUTE_32I, "int32", k_multiple=4),
}
GPU_DTYPES = tuple(GEMM_TYPES)


def element_bits(dtype: str) -> list[int]:
    """Storage bits of the 16 element values nibble − 8 (nibble 0..15), as the fill kernel
    writes them: the host-side reference for the device's conversion."""
    import numpy as np

    values = np.arange(16, dtype=np.int32) - 8
    if dtype in ("float32", "tf32"):
        return [int(b) for b in values.astype(np.float32).view(np.uint32)]
    if dtype == "float16":
        return [int(b) for b in values.astype(np.float16).view(np.uint16)]
    if dtype == "bfloat16":
        return [int(b) for b in bf16_bits(values.astype(np.float32))]
    if dtype == "int8":
        return [int(b) for b in values.astype(np.int8).view(np.uint8)]
    raise ValueError(f"no GPU storage for dtype {dtype!r}")


def bf16_bits(values):
    """bfloat16 bit patterns (uint16) of float32 values that bfloat16 holds exactly (the
    input nibbles do): the upper half of the float32 bits. Raises on any inexact value."""
    import numpy as np

    bits = np.asarray(values, dtype=np.float32).view(np.uint32)
    if np.any(bits & np.uint32(0xFFFF)):
        raise ValueError("value not exactly representable in bfloat16")
    return (bits >> np.uint32(16)).astype(np.uint16)


def bf16_to_float32(bits):
    """float32 values of bfloat16 bit patterns (uint16)."""
    import numpy as np

    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


# ---- CUDA C source ---------------------------------------------------------------------------

PRELUDE = r"""
#if defined(TJ_CUDA)
#define TJ_DEV __device__ __forceinline__
#define TJ_MEMBER __device__ __forceinline__
#define TJ_GLOBAL extern "C" __global__
#define TJ_THREAD ((unsigned long long)blockIdx.x * blockDim.x + threadIdx.x)
#define TJ_BSWAP32(x) __byte_perm((x), 0u, 0x0123u)
#define TJ_U2F(x) __uint_as_float(x)
#define TJ_F2U(x) __float_as_uint(x)
#define TJ_F2I(x) __float2int_rn(x)
#else  /* host emulation for the CPU tests (g++): the harness sets tj_thread per call */
#include <string.h>
#define TJ_DEV static inline
#define TJ_MEMBER inline
#define TJ_GLOBAL extern "C"
extern unsigned long long tj_thread;
#define TJ_THREAD tj_thread
#define TJ_BSWAP32(x) __builtin_bswap32(x)
static inline float TJ_U2F(unsigned int u) { float f; memcpy(&f, &u, 4); return f; }
static inline unsigned int TJ_F2U(float f) { unsigned int u; memcpy(&u, &f, 4); return u; }
static inline int TJ_F2I(float f) { return (int)__builtin_rintf(f); }
#endif
typedef unsigned int u32;
typedef unsigned long long u64;
struct alignas(16) tj_u32x4 { u32 a, b, c, d; };
"""

# One thread per SplitMix64 word: it writes the word's 16 elements (spec §2: element f is
# nibble f & 15 of word f >> 4, minus 8) as 16 * ELEMENT_BYTES bytes of 16-byte stores. The
# buffer is padded to whole words (inputs.padded_size), so every thread writes a full word.
# Element values come from float32 bits: 0x4B400000 | nib is the float 1.5·2²³ + nib, so
# subtracting 1.5·2²³ + 8 gives nib − 8 exactly; bfloat16 is the upper half of those bits
# (exact: the low half is zero for these values) and float16 re-biases the exponent
# (127 → 15) and drops 13 mantissa bits (zero here); 0.0 is bits 0 in every type.
FILL_SOURCE = r"""
TJ_DEV u32 tj_f32_bits(u32 nib) {
    return TJ_F2U(TJ_U2F(0x4B400000u | nib) - 12582920.0f);
}
TJ_DEV u32 tj_element(u32 nib) {
#if ELEMENT_KIND == 0   /* float32 / tf32 */
    return tj_f32_bits(nib);
#elif ELEMENT_KIND == 1 /* float16 */
    u32 f = tj_f32_bits(nib);
    return f == 0u ? 0u : (((f >> 16) & 0x8000u) | ((((f >> 23) & 0xFFu) - 112u) << 10) | ((f >> 13) & 0x3FFu));
#elif ELEMENT_KIND == 2 /* bfloat16 */
    return tj_f32_bits(nib) >> 16;
#else                   /* int8 */
    return (nib - 8u) & 0xFFu;
#endif
}

TJ_GLOBAL void tops_fill(u64 key, u64 words, u32* out) {
    u64 w = TJ_THREAD;
    if (w >= words) return;
    u64 z = key + (w + 1ull) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z = z ^ (z >> 31);
    u32 packed[4 * ELEMENT_BYTES];
    const int per = 4 / ELEMENT_BYTES;  /* elements per 32-bit word */
#pragma unroll
    for (int i = 0; i < 4 * ELEMENT_BYTES; ++i) {
        u32 v = 0u;
#pragma unroll
        for (int e = 0; e < per; ++e) {
            u32 nib = (u32)(z >> (4 * (i * per + e))) & 15u;
            v |= tj_element(nib) << (8 * ELEMENT_BYTES * e);
        }
        packed[i] = v;
    }
    tj_u32x4* dst = (tj_u32x4*)(out + w * (4ull * ELEMENT_BYTES));
#pragma unroll
    for (int q = 0; q < ELEMENT_BYTES; ++q) {
        tj_u32x4 v4;
        v4.a = packed[4 * q]; v4.b = packed[4 * q + 1]; v4.c = packed[4 * q + 2]; v4.d = packed[4 * q + 3];
        dst[q] = v4;
    }
}
"""

# SHA-256 (FIPS 180-4) of prefix || 4·count data bytes, where the data arrive as big-endian
# words X_0..X_{count-1} (X_j = the 4 bytes read most significant first). Because the prefix
# is one byte, message word j is (X_{j-1} << 24) | (X_j >> 8), with X_{-1} = prefix: the
# stream is produced word by word without a byte buffer. Leaves: prefix 0x00 and X_j the
# int32 tile value's little-endian bytes (a byte swap); nodes: prefix 0x01 and X the two
# children's digest words. Digests are kept as the 8 state words (big-endian digest bytes).
SHA256_SOURCE = r"""
#define TJ_ROTR(x, n) (((x) >> (n)) | ((x) << (32 - (n))))
#if defined(TJ_CUDA)
__constant__ u32 TJ_K[64] = {
#else
static const u32 TJ_K[64] = {
#endif
    0x428a2f98u, 0x71374491u, 0xb5c0fbcfu, 0xe9b5dba5u, 0x3956c25bu, 0x59f111f1u, 0x923f82a4u, 0xab1c5ed5u,
    0xd807aa98u, 0x12835b01u, 0x243185beu, 0x550c7dc3u, 0x72be5d74u, 0x80deb1feu, 0x9bdc06a7u, 0xc19bf174u,
    0xe49b69c1u, 0xefbe4786u, 0x0fc19dc6u, 0x240ca1ccu, 0x2de92c6fu, 0x4a7484aau, 0x5cb0a9dcu, 0x76f988dau,
    0x983e5152u, 0xa831c66du, 0xb00327c8u, 0xbf597fc7u, 0xc6e00bf3u, 0xd5a79147u, 0x06ca6351u, 0x14292967u,
    0x27b70a85u, 0x2e1b2138u, 0x4d2c6dfcu, 0x53380d13u, 0x650a7354u, 0x766a0abbu, 0x81c2c92eu, 0x92722c85u,
    0xa2bfe8a1u, 0xa81a664bu, 0xc24b8b70u, 0xc76c51a3u, 0xd192e819u, 0xd6990624u, 0xf40e3585u, 0x106aa070u,
    0x19a4c116u, 0x1e376c08u, 0x2748774cu, 0x34b0bcb5u, 0x391c0cb3u, 0x4ed8aa4au, 0x5b9cca4fu, 0x682e6ff3u,
    0x748f82eeu, 0x78a5636fu, 0x84c87814u, 0x8cc70208u, 0x90befffau, 0xa4506cebu, 0xbef9a3f7u, 0xc67178f2u};

TJ_DEV void tj_sha256_init(u32 s[8]) {
    s[0] = 0x6a09e667u; s[1] = 0xbb67ae85u; s[2] = 0x3c6ef372u; s[3] = 0xa54ff53au;
    s[4] = 0x510e527fu; s[5] = 0x9b05688cu; s[6] = 0x1f83d9abu; s[7] = 0x5be0cd19u;
}

TJ_DEV void tj_sha256_block(u32 s[8], u32 w[16]) {
    u32 a = s[0], b = s[1], c = s[2], d = s[3], e = s[4], f = s[5], g = s[6], h = s[7];
#pragma unroll
    for (int i = 0; i < 64; ++i) {
        u32 wi;
        if (i < 16) {
            wi = w[i];
        } else {  /* the schedule in a rolling 16-word window */
            u32 w15 = w[(i + 1) & 15], w2 = w[(i + 14) & 15];
            u32 s0 = TJ_ROTR(w15, 7) ^ TJ_ROTR(w15, 18) ^ (w15 >> 3);
            u32 s1 = TJ_ROTR(w2, 17) ^ TJ_ROTR(w2, 19) ^ (w2 >> 10);
            wi = w[i & 15] + s0 + w[(i + 9) & 15] + s1;
            w[i & 15] = wi;
        }
        u32 t1 = h + (TJ_ROTR(e, 6) ^ TJ_ROTR(e, 11) ^ TJ_ROTR(e, 25)) + ((e & f) ^ (~e & g)) + TJ_K[i] + wi;
        u32 t2 = (TJ_ROTR(a, 2) ^ TJ_ROTR(a, 13) ^ TJ_ROTR(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
        h = g; g = f; f = e; e = d + t1; d = c; c = b; b = a; a = t1 + t2;
    }
    s[0] += a; s[1] += b; s[2] += c; s[3] += d; s[4] += e; s[5] += f; s[6] += g; s[7] += h;
}

/* SHA-256 of prefix || X_0..X_{count-1} (big-endian words), X_j = load(j). */
template <class Load>
TJ_DEV void tj_sha256_prefixed(u32 prefix, u64 count, const Load& load, u32 out[8]) {
    u64 bytes = 1ull + 4ull * count;
    u64 total_words = ((bytes + 8ull) / 64ull + 1ull) * 16ull;  /* whole 64-byte blocks */
    u64 bits = bytes * 8ull;
    u32 prev = prefix;  /* X_{j-1}; its low byte is the message byte before X_j */
    u32 s[8];
    u32 w[16];
    tj_sha256_init(s);
    for (u64 base = 0; base < total_words; base += 16) {
#pragma unroll
        for (int i = 0; i < 16; ++i) {
            u64 j = base + (u64)i;
            u32 word;
            if (j < count) {
                u32 x = load(j);
                word = (prev << 24) | (x >> 8);
                prev = x;
            } else if (j == count) {
                word = (prev << 24) | 0x00800000u;  /* last data byte, then the 0x80 pad byte */
            } else if (j == total_words - 2) {
                word = (u32)(bits >> 32);
            } else if (j == total_words - 1) {
                word = (u32)bits;
            } else {
                word = 0u;
            }
            w[i] = word;
        }
        tj_sha256_block(s, w);
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) out[i] = s[i];
}
"""

# Leaves (spec §4): thread ℓ hashes tile t = ℓ mod tpr of row i = ℓ div tpr, reading C as
# C_T (float: exact integers, converted with round-to-nearest; int: as is) and writing the
# leaf's 8 state words to nodes[8ℓ .. 8ℓ+7]. Level kernel: parent p of a level of `count`
# nodes is H(0x01 || L || R) of children 2p, 2p+1, or child 2p carried up unchanged when it
# has no sibling (the last node of an odd level).
COMMIT_SOURCE = r"""
struct TjLeafLoad {
    const C_T* row;
    TJ_MEMBER u32 operator()(u64 j) const { return TJ_BSWAP32((u32)C_TO_INT(row[j])); }
};

TJ_GLOBAL void tops_leaf_hash(const C_T* c, u64 m, u64 n, u64 tile, u64 tpr, u32* nodes) {
    u64 leaf = TJ_THREAD;
    if (leaf >= m * tpr) return;
    u64 row = leaf / tpr, t = leaf - row * tpr;
    u64 lo = t * tile;
    u64 width = (n - lo < tile) ? n - lo : tile;
    TjLeafLoad load;
    load.row = c + row * n + lo;
    u32 out[8];
    tj_sha256_prefixed(0u, width, load, out);
#pragma unroll
    for (int i = 0; i < 8; ++i) nodes[leaf * 8ull + i] = out[i];
}

struct TjNodeLoad {
    const u32* pair;
    TJ_MEMBER u32 operator()(u64 j) const { return pair[j]; }
};

TJ_GLOBAL void tops_merkle_level(const u32* level, u64 count, u32* parents) {
    u64 p = TJ_THREAD;
    if (p >= (count + 1ull) / 2ull) return;
    const u32* left = level + 16ull * p;
    u32 out[8];
    if (2ull * p + 1ull < count) {
        TjNodeLoad load;
        load.pair = left;  /* L then R: 16 consecutive words */
        tj_sha256_prefixed(1u, 16ull, load, out);
    } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) out[i] = left[i];
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) parents[8ull * p + i] = out[i];
}
"""

_ELEMENT_KIND = {"float32": 0, "tf32": 0, "float16": 1, "bfloat16": 2, "int8": 3}


def fill_source(dtype: str, *, cuda: bool = True) -> str:
    """The fill kernel `tops_fill(key, words, out)` for `dtype`'s storage."""
    gemm = GEMM_TYPES[dtype]
    head = "#define TJ_CUDA 1\n" if cuda else ""
    return (head + f"#define ELEMENT_BYTES {gemm.element_bytes}\n#define ELEMENT_KIND {_ELEMENT_KIND[dtype]}\n"
            + PRELUDE + FILL_SOURCE)


def commit_source(product: str, *, cuda: bool = True) -> str:
    """The kernels `tops_leaf_hash` and `tops_merkle_level` for a C of NumPy dtype `product`
    ("float32" or "int32")."""
    if product == "float32":
        types = "#define C_T float\n#define C_TO_INT(v) TJ_F2I(v)\n"
    elif product == "int32":
        types = "#define C_T int\n#define C_TO_INT(v) (v)\n"
    else:
        raise ValueError(f"no commitment kernel for a product of {product!r}")
    head = "#define TJ_CUDA 1\n" if cuda else ""
    return head + types + PRELUDE + SHA256_SOURCE + COMMIT_SOURCE


# ---- builders (CuPy) -------------------------------------------------------------------------

THREADS_PER_BLOCK = 256
NVRTC_OPTIONS = ("--std=c++14",)


def blocks_for(threads: int, per_block: int = THREADS_PER_BLOCK) -> int:
    """Grid size for one thread per item (at least one block)."""
    return max(1, -(-threads // per_block))


def build_fill_kernel(cp, dtype: str):
    """RawKernel tops_fill for `dtype` (compiled by NVRTC on first launch, cached by CuPy)."""
    return cp.RawKernel(fill_source(dtype), "tops_fill", options=NVRTC_OPTIONS)


def build_commit_kernels(cp, product: str):
    """(leaf kernel, level kernel) for a C of dtype `product`."""
    module = cp.RawModule(code=commit_source(product), options=NVRTC_OPTIONS)
    return module.get_function("tops_leaf_hash"), module.get_function("tops_merkle_level")
