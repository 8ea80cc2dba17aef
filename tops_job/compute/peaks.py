"""Datasheet peak rates of the cards tops-job is measured on, dense (no sparsity), per
receipt dtype, in TFLOP/s (TOPS for int8). A product measured faster than its card's peak is
not fast: it is a timing bug (events that bracket nothing), and the device checks fail on it.

Sources: NVIDIA H100/H200 SXM and A100 SXM datasheets (dense tensor-core rates; float32 is
the non-tensor FP32 rate).
"""

from __future__ import annotations

_HOPPER_SXM = {"float32": 67.0, "tf32": 494.7, "float16": 989.4, "bfloat16": 989.4, "int8": 1978.9}
_A100_SXM = {"float32": 19.5, "tf32": 156.0, "float16": 312.0, "bfloat16": 312.0, "int8": 624.0}
PEAKS: dict[str, dict[str, float]] = {"H200": _HOPPER_SXM, "H100": _HOPPER_SXM, "A100": _A100_SXM}


def datasheet_tflops(device_model: str, dtype: str) -> float | None:
    """The peak for `dtype` on the card named `device_model` (None when it is not listed)."""
    for name, peaks in PEAKS.items():
        if name in device_model.upper():
            return peaks.get(dtype)
    return None
