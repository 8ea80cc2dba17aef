"""Backend selection: `auto` takes CuPy when a CUDA device is usable, else NumPy."""

from __future__ import annotations

from tops_job.compute.base import Backend, Shape
from tops_job.errors import ConfigError, DeviceError

BACKEND_NAMES = ("auto", "numpy", "cupy")
# Inputs types across backends (spec §3); each backend accepts its own subset.
DTYPES = ("float32", "float64", "tf32", "float16", "bfloat16", "int8")


def gpu_available() -> bool:
    """True when CuPy imports and sees a CUDA device. CuPy is imported only here, lazily."""
    try:
        import cupy  # noqa: F401  (optional extra tops-job[gpu])
    except Exception:
        return False
    try:
        return bool(cupy.cuda.is_available())
    except Exception:
        return False


def create_backend(name: str, dtype: str | None = None, device_index: int = 0, *,
                   strict_device: bool = False) -> Backend:
    """The backend `name` for `dtype` (None: the backend's default). `strict_device`: fail
    rather than fall back to the host where the device kernels cannot be built."""
    if name not in BACKEND_NAMES:
        raise ConfigError("TOPS_JOB_BACKEND", f"unknown backend {name!r}; use one of {', '.join(BACKEND_NAMES)}")
    if name == "auto":
        name = "cupy" if gpu_available() else "numpy"
    if name == "cupy":
        if not gpu_available():
            raise DeviceError("--backend cupy needs CuPy (pip install 'tops-job[gpu]') and a usable CUDA device; none was found")
        from tops_job.compute.cupy_backend import CupyBackend

        return CupyBackend(dtype or "float32", device_index=device_index, strict_device=strict_device)
    from tops_job.compute.numpy_backend import NumpyBackend

    return NumpyBackend(dtype or "float32")


__all__ = ["Backend", "Shape", "BACKEND_NAMES", "DTYPES", "create_backend", "gpu_available"]
