"""Weights used straight from their stored bytes, decoded a cache-sized chunk at a time where used.

A vocabulary table is a model's largest tensor (OPT-1.3B: 412 MB in fp32), yet an embedding lookup
needs only the rows of the tokens at hand and an LM head can be applied a chunk at a time. On a CPU
the same holds for every quantized weight: decoding a chunk right before its matmul keeps the decoded
values in cache, where decoding the whole weight first writes it to memory and reads it back, which
costs more than decoding (see WeightCodec.chunked). A `ChunkedWeight` decodes only what it is asked
for, at most `CHUNK_ELEMS` values at a time, into one reused buffer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.codec import WeightCodec

CHUNK_ELEMS = 1 << 20  # 4 MiB of fp32 per decoded chunk: stays in cache next to its matmul


class ChunkedWeight:
    """A 2-D weight kept in stored form on the compute device: `w[ids]` and `w.linear(x, bias)`."""

    def __init__(self, data: torch.Tensor, codec: WeightCodec, dtype: torch.dtype):
        self.data, self.codec, self.dtype = data, codec, dtype
        self.rows, self.width = codec.stored_rows
        # group-quantized along the output dimension, the stored rows are the weight's columns
        self.transposed = codec.quant is not None and codec.dim == 0
        # a weight already in compute form is sliced as views: one chunk, one matmul
        self.in_place = codec.in_place(data.device, data.device, dtype)
        self.step = self.rows if self.in_place else max(1, CHUNK_ELEMS // self.width)

    def _decoded(self):
        """(stored rows, their decoded values) chunk by chunk; the values live until the next chunk."""
        buf = None if self.in_place else torch.empty(self.step * self.width, dtype=self.dtype, device=self.data.device)
        for start in range(0, self.rows, self.step):
            chunk = slice(start, min(start + self.step, self.rows))
            out = None if buf is None else buf[:(chunk.stop - start) * self.width].view(-1, self.width)
            yield chunk, self.codec.decode_rows(self.data, chunk, self.dtype, out)

    def __getitem__(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of the weight (an embedding lookup), shape (*ids.shape, columns)."""
        flat = ids.reshape(-1)
        if not self.transposed:
            return self.codec.decode_rows(self.data, flat, self.dtype).view(*ids.shape, self.width)
        return self.codec.decode_columns(self.data, flat, self.dtype).view(*ids.shape, self.rows)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """F.linear(x, weight, bias), one decoded chunk at a time."""
        if self.step >= self.rows:
            _, w = next(self._decoded())
            return F.linear(x, w.t() if self.transposed else w, bias)
        flat = x.reshape(-1, x.shape[-1])
        if not self.transposed:  # stored rows are output features: each chunk fills its own columns
            out = torch.empty(flat.shape[0], self.rows, dtype=x.dtype, device=x.device)
            for chunk, w in self._decoded():
                out[:, chunk] = flat @ w.t()
            if bias is not None:
                out += bias
        else:  # stored rows are input features: every chunk adds to all outputs
            out = (torch.zeros(flat.shape[0], self.width, dtype=x.dtype, device=x.device) if bias is None
                   else bias.to(x.dtype).expand(flat.shape[0], -1).clone())
            for chunk, w in self._decoded():
                out.addmm_(flat[:, chunk], w)
        return out.view(*x.shape[:-1], out.shape[-1])
