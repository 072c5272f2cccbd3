"""Vocabulary tables (embeddings, LM heads) used a slice at a time, straight from their stored bytes.

A vocabulary table is a model's largest tensor (OPT-1.3B: 412 MB in fp32), yet an embedding lookup
needs only the rows of the tokens at hand and an LM head can be applied a chunk at a time. Decoding
these tables whole into the compute dtype would make them the largest working buffer of every load;
a `Table` decodes only what it is asked for, at most `CHUNK_ELEMS` values at a time.
"""

from __future__ import annotations

import torch

from engine.codec import WeightCodec

CHUNK_ELEMS = 1 << 22  # 16 MiB of fp32 per decoded chunk


class Table:
    """A 2-D weight kept in stored form on the compute device; `table[ids]` and `table.logits(h)`."""

    def __init__(self, data: torch.Tensor, codec: WeightCodec, dtype: torch.dtype):
        self.data, self.codec, self.dtype = data, codec, dtype
        self.rows, self.width = codec.stored_rows
        # group-quantized along the output dimension, the stored rows are the table's columns
        self.transposed = codec.quant is not None and codec.dim == 0
        # a table already in compute form is sliced as views: one chunk, one matmul
        in_place = codec.in_place(data.device, data.device, dtype)
        self.step = self.rows if in_place else max(1, CHUNK_ELEMS // self.width)

    def _decode(self, index: slice | torch.Tensor) -> torch.Tensor:
        return self.codec.decode_rows(self.data, index, self.dtype)

    def _chunks(self):
        for start in range(0, self.rows, self.step):
            yield slice(start, min(start + self.step, self.rows))

    def __getitem__(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of the table (an embedding lookup), shape (*ids.shape, columns)."""
        flat = ids.reshape(-1)
        if not self.transposed:
            return self._decode(flat).view(*ids.shape, self.width)
        out = torch.empty(flat.numel(), self.rows, dtype=self.dtype, device=self.data.device)
        for chunk in self._chunks():
            out[:, chunk] = self._decode(chunk)[:, flat].t()
        return out.view(*ids.shape, self.rows)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """h @ table.T, decoding one chunk of the table at a time."""
        if not self.transposed:
            out = torch.empty(*h.shape[:-1], self.rows, dtype=h.dtype, device=h.device)
            for chunk in self._chunks():
                out[..., chunk] = h @ self._decode(chunk).t()
            return out
        out = torch.zeros(*h.shape[:-1], self.width, dtype=h.dtype, device=h.device)
        for chunk in self._chunks():
            out += h[..., chunk] @ self._decode(chunk)
        return out
