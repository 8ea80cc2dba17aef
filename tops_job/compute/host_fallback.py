"""The GPU backend's host path, for a device whose kernels NVRTC cannot build: inputs made on
the host (spec §2) and uploaded, the commitment made on the host from a copy of C.

Slower (the duty cycle in the summary shows by how much), but every receipt still verifies,
where failing every attempt would only idle the card. `--strict-device` turns it off.
"""

from __future__ import annotations

import numpy as np

from tops_job.compute.cuda_kernels import GEMM_TYPES, bf16_bits
from tops_job.spec.commitment import HostCommitment
from tops_job.spec.inputs import fill_elements


class HostPath:
    def __init__(self, dtype: str):
        self.dtype = dtype
        self.storage = GEMM_TYPES[dtype].storage
        self._values: np.ndarray | None = None
        self._scratch: np.ndarray | None = None

    def fill(self, cp, stream, key: int, flat) -> None:
        """Write spec §2's elements for `key` into the device buffer `flat` (padded size)."""
        if self._values is None or self._values.size != flat.size:
            self._values = np.empty(flat.size, np.float32)
        fill_elements(key, self._values)
        if self.dtype == "bfloat16":
            host = bf16_bits(self._values)
        else:
            host = self._values.astype(self.storage)
        flat.set(host, stream=stream)

    def commit(self, c, stream, tile: int) -> HostCommitment:
        """The commitment of the device product `c`, from a copy on the host (ordered after
        the GEMM on `stream`)."""
        product = c.get(stream=stream)
        if self._scratch is None or self._scratch.shape != product.shape:
            self._scratch = np.empty(product.shape, np.int32)
        return HostCommitment(product, tile, self._scratch)
