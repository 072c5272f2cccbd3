"""Codecs turn compute tensors into the bytes a tier stores, and back, plain or compressed.

Tiers only hold bytes, so the same stores serve fp32, fp16 and group-quantized data alike,
and compressed tensors stay compressed on every tier, disk included.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from engine.quant import groupwise
from engine.quant.groupwise import QuantSpec
from engine.quant.int4_kernel import decode, to_kernel


@dataclass(frozen=True)
class RowCodec:
    """Rows of `row_elems` values (KV cache tokens, activations): plain or group-quantized.

    A quantized row is coded as independent vectors of `vector` values (one head of one sequence for
    the KV cache), so groups never straddle two heads or two sequences, whatever the tier split.
    """

    row_elems: int
    storage: torch.dtype
    quant: QuantSpec | None = None
    vector: int = 0  # 0: the whole row

    @property
    def _vec(self) -> int:
        return self.vector or self.row_elems

    @property
    def row_bytes(self) -> int:
        if self.quant is None:
            return self.row_elems * self.storage.itemsize

        return self.row_elems // self._vec * groupwise.row_nbytes(self._vec, self.quant)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(n, row_elems) -> uint8 (n, row_bytes)."""
        if self.quant is None:
            return x.to(self.storage).contiguous().view(torch.uint8)

        return groupwise.encode_rows(x.reshape(x.shape[0], -1, self._vec), self.quant).reshape(x.shape[0], -1)

    def decode(self, data: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """uint8 (n * row_bytes,) -> (n, row_elems) on `device` in `dtype`; a view when nothing changes."""
        rows = data.view(-1, self.row_bytes)
        if self.quant is None:
            return rows.view(self.storage).to(device=device, dtype=dtype, non_blocking=True)

        vectors = rows.to(device, non_blocking=True).view(rows.shape[0], self.row_elems // self._vec, -1)
        return groupwise.decode_rows(vectors, self._vec, self.quant, dtype).reshape(rows.shape[0], self.row_elems)


@dataclass(frozen=True)
class WeightCodec:
    """One weight tensor; 2-D weights may be group-quantized along `dim`.

    `fused`: a 4-bit weight grouped along dim 1 stored in the layout of torch's fused int4 CPU matmul
    (engine.quant.int4_kernel): same bytes, other order; decoded to a `PackedLinear` rather than a tensor.
    """

    shape: tuple[int, ...]
    storage: torch.dtype
    quant: QuantSpec | None = None
    dim: int = 0
    fused: bool = False

    @property
    def nbytes(self) -> int:
        if self.quant is None:
            return math.prod(self.shape) * self.storage.itemsize

        return groupwise.weight_nbytes(self.shape, self.quant, self.dim)

    def encode(self, w: torch.Tensor) -> torch.Tensor:
        """The weight -> its stored bytes."""
        return self.finish(self.encode_portable(w))

    def encode_portable(self, w: torch.Tensor) -> torch.Tensor:
        """The weight -> bytes of the same size as stored, in a form that does not depend on this CPU (the row
        format, before any fused-kernel layout): what the encoded-weight cache keeps."""
        if self.quant is None:
            return w.to(self.storage).contiguous().reshape(-1).view(torch.uint8)

        return groupwise.encode_weight(w, self.quant, self.dim)

    def finish(self, data: torch.Tensor) -> torch.Tensor:
        """Portable bytes (encode_portable) -> stored bytes: a cheap reordering for the fused kernel, else as is."""
        if self.fused:
            return to_kernel(data.view(self.shape[0], -1), self.shape, self.quant)
        return data

    @property
    def stored_rows(self) -> tuple[int, int]:
        """(rows, values per row) as stored: a quantized weight grouped along dim 0 stores its transpose."""
        if self.quant is not None and self.dim == 0:
            return self.shape[1], self.shape[0]
        return self.shape[0], math.prod(self.shape[1:])

    @property
    def stored_row_bytes(self) -> int:
        return self.nbytes // self.stored_rows[0]

    def decode_rows(self, stored: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        """Stored rows of a 2-D weight, uint8 (n, stored_row_bytes), as (n, values per row) in `dtype`.

        Into `out` if given; a view of `stored` when nothing changes.
        """
        width = self.stored_rows[1]
        if self.quant is None:
            values = stored.view(self.storage).view(-1, width)
            return values.to(dtype) if out is None else out.copy_(values)

        return groupwise.decode_rows(stored, width, self.quant, dtype, out)

    def decode_columns(self, data: torch.Tensor, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Stored columns `index` of a quantized weight, as rows (len(index), stored rows): a lookup in a
        weight stored transposed, decoding only the groups that hold the columns asked for."""
        rows, width = self.stored_rows
        return groupwise.decode_columns(data.view(rows, -1), width, self.quant, dtype, index.to(data.device))

    def in_place(self, data_device: torch.device, device: torch.device, dtype: torch.dtype) -> bool:
        """Whether stored bytes on `data_device` can be used as the compute tensor without a copy."""
        return self.quant is None and self.storage == dtype and data_device == device

    def working_room(self, table: bool, data_device: torch.device, device: torch.device,
                     dtype: torch.dtype) -> int:
        """Working-buffer bytes this weight takes when loaded from `data_device`; 0 when used in place.

        A vocabulary table (engine.tables) stays in stored form: it needs room only to move to the device.
        Rounded up to 64 bytes, so the next weight in the buffer stays aligned.
        """
        if table:
            nbytes = 0 if data_device == device else self.nbytes
        else:
            nbytes = 0 if self.in_place(data_device, device, dtype) else math.prod(self.shape) * dtype.itemsize
        return -(-nbytes // 64) * 64

    def working(self, buf: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """A view of the uint8 buffer `buf` laid out like `decode`'s result, to pass as its `out`."""
        flat = buf[:math.prod(self.shape) * dtype.itemsize].view(dtype)
        if self.quant is not None and self.dim == 0:  # decode_weight's result is a transposed view
            return flat.view(self.shape[1], self.shape[0]).t()
        return flat.view(self.shape)

    def decode(self, data: torch.Tensor, device: torch.device, dtype: torch.dtype,
               out: torch.Tensor | None = None) -> torch.Tensor:
        """Stored bytes -> the compute tensor: a view when nothing changes, else into `out` if given."""
        if self.quant is None:
            stored = data.view(self.storage).view(self.shape)
            if out is None:
                return stored.to(device=device, dtype=dtype, non_blocking=True)
            return out.copy_(stored, non_blocking=True)
        if self.fused:
            return decode(data, self.shape, self.quant, dtype, out)

        return groupwise.decode_weight(data.to(device, non_blocking=True), self.shape, self.quant, self.dim, dtype, out)
