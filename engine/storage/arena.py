"""One host allocation per tier, sub-allocated into aligned views: the weights a memory tier keeps on the host.

On a GPU machine, uploads from pinned (page-locked) host memory run as asynchronous DMA; from pageable
memory they are staged through the driver and block the host. Pinning each weight on its own costs a
driver call per tensor, and torch's pinned allocator rounds every request up to a power of two (a
1.1 GiB layer takes 2 GiB). An arena is allocated once, at exactly the sum of its views' aligned sizes,
and pinned in place once (cudaHostRegister), only where the compute device is CUDA.
"""

from __future__ import annotations

import itertools
import weakref

import torch

VIEW_ALIGN = 64  # bytes: each view starts on a cache line, so vector loads and DMA start aligned


def aligned(nbytes: int) -> int:
    return -(-nbytes // VIEW_ALIGN) * VIEW_ALIGN


class HostArena:
    """`sizes` bytes of views over one host buffer of `nbytes` = the sum of the aligned sizes."""

    def __init__(self, sizes: list[int], pin: bool):
        self.sizes = list(sizes)
        self.offsets = list(itertools.accumulate((aligned(n) for n in self.sizes), initial=0))
        self.nbytes = self.offsets[-1]
        raw = torch.empty(self.nbytes + VIEW_ALIGN, dtype=torch.uint8)
        shift = (-raw.data_ptr()) % VIEW_ALIGN
        self.buf = raw[shift:shift + self.nbytes]
        self.pinned = pin and self.nbytes > 0
        if self.pinned:
            _register(self.buf)
            # unpinned when the arena goes: its buffer (held by the arena) is freed only after that
            weakref.finalize(self, _unregister, self.buf.data_ptr())

    def view(self, i: int) -> torch.Tensor:
        """View `i`: `sizes[i]` bytes starting at an aligned offset, sharing the arena's memory."""
        return self.buf[self.offsets[i]:self.offsets[i] + self.sizes[i]]


def _register(buf: torch.Tensor) -> None:
    err = torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), buf.numel(), 0)
    if int(err) != 0:
        raise RuntimeError(f"cudaHostRegister of {buf.numel()} bytes failed with CUDA error {int(err)}")


def _unregister(ptr: int) -> None:
    torch.cuda.cudart().cudaHostUnregister(ptr)
