"""Shared-memory buffers that carry tensors between a front-end and a device process.

Each channel (one front-end thread <-> one device process) owns one buffer: an
anonymous memory file (``memfd``) mapped on both sides, its descriptor passed once
over the channel. A call is strictly request -> reply, so the whole buffer belongs to
the call in flight: the front-end writes the input rows at 64-byte aligned offsets
and sends only their descriptors ``(offset, dtype, shape)``; the device process
reads them in place (zero-copy ``numpy`` views), runs them, and writes the outputs
over the same buffer (the inputs are consumed by then) before it replies. The
front-end copies the outputs out before its next call. A buffer grows (a new memfd,
sent once) when a call needs more than it holds; it is freed when both sides close it.
"""

from __future__ import annotations

import mmap
import os
from typing import Any, Sequence

import numpy as np

ALIGN = 64
INITIAL_BYTES = 1 << 20  # grows on demand; untouched pages of a memfd cost nothing

Desc = tuple  # (offset, dtype str, shape)


def aligned(n: int) -> int:
    return (n + ALIGN - 1) & ~(ALIGN - 1)


def nbytes_of(arrays: Sequence[np.ndarray]) -> int:
    return sum(aligned(a.nbytes) for a in arrays)


def storable(value: Any) -> bool:
    """Whether ``value`` can travel through a buffer (a plain numeric/bool array)."""
    return isinstance(value, np.ndarray) and value.dtype.kind in "biufc" and not value.dtype.hasobject


class Buffer:
    """One mapped memory file. The creating side (`create`) sends `fd` once."""

    def __init__(self, fd: int, size: int, owner: bool):
        self.fd = fd
        self.size = size
        self._map = mmap.mmap(fd, size)
        self.view = memoryview(self._map)
        self._owner = owner

    @classmethod
    def create(cls, size: int) -> "Buffer":
        fd = os.memfd_create("mserve-tensors", os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        return cls(fd, size, owner=True)

    @classmethod
    def attach(cls, fd: int, size: int) -> "Buffer":
        """Map a buffer whose descriptor came over a channel (the fd is closed once mapped)."""
        try:
            return cls(fd, size, owner=False)
        finally:
            os.close(fd)

    def write(self, arrays: Sequence[np.ndarray], offset: int = 0) -> tuple[list[Desc], int]:
        """Copy ``arrays`` in from ``offset``; their descriptors and the next free offset."""
        descs = []
        for a in arrays:
            n = a.nbytes
            if offset + n > self.size:
                raise ValueError(f"{offset + n} bytes do not fit in a {self.size}-byte buffer")
            target = np.frombuffer(self.view, a.dtype, a.size, offset).reshape(a.shape)
            np.copyto(target, a, casting="no")
            descs.append((offset, a.dtype.str, a.shape))
            offset += aligned(n)
        return descs, offset

    def read(self, desc: Desc) -> np.ndarray:
        """A view of one array in the buffer (valid until the buffer is written again)."""
        offset, dtype, shape = desc
        dt = np.dtype(dtype)
        count = 1
        for d in shape:
            count *= d
        return np.frombuffer(self.view, dt, count, offset).reshape(shape)

    def close(self) -> None:
        try:
            self.view.release()
            self._map.close()
        except (BufferError, ValueError):
            pass  # a view still exported: the mapping goes when the last view does
        if self._owner:
            try:
                os.close(self.fd)
            except OSError:
                pass
