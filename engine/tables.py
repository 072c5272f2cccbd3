"""Vocabulary tables (embeddings, LM heads) used a slice at a time, straight from their stored bytes.

A vocabulary table is a model's largest tensor (OPT-1.3B: 412 MB in fp32), yet an embedding lookup
needs only the rows of the tokens at hand and an LM head can be applied a chunk at a time. Decoding
these tables whole into the compute dtype would make them the largest working buffer of every load;
a `Table` decodes only what it is asked for, at most `CHUNK_ELEMS` values at a time, into one reused
buffer. A table left on the disk tier is read the same way: a lookup reads only its rows (a few KB
per token where reading the table took 100s of MB per pass), an LM head a chunk at a time.

Other weights are not decoded this way: chunked decoding inside every matmul lost to decoding each
weight whole into a reused working buffer, because the smaller matmuls run less efficiently
(docs/measurements.md, "Compression throughput").
"""

from __future__ import annotations

import torch

from engine.quant.codec import WeightCodec
from engine.storage.tiers import DiskStore, aligned_empty

CHUNK_ELEMS = 1 << 20  # 4 MiB of fp32 per decoded chunk


class Table:
    """A 2-D weight kept in stored form, in memory or on disk: `table[ids]` and `table.linear(x)`."""

    def __init__(self, data: torch.Tensor | DiskStore, codec: WeightCodec, dtype: torch.dtype,
                 device: torch.device | None = None):
        self.data, self.codec, self.dtype = data, codec, dtype
        self.on_disk = isinstance(data, DiskStore)
        self.device = device if device is not None else data.device
        self.rows, self.width = codec.stored_rows
        # group-quantized along the output dimension, the stored rows are the weight's columns
        self.transposed = codec.quant is not None and codec.dim == 0
        if self.on_disk and not self.reads_rows(codec):
            raise ValueError("a table stored transposed is looked up by column: it cannot be read from disk by row")
        # stored bytes already in compute form need no decoding; in memory they are sliced as views: one chunk
        self.plain = codec.in_place(self.device, self.device, dtype)
        self.step = self.rows if self.plain and not self.on_disk else max(1, CHUNK_ELEMS // self.width)
        self._staging: torch.Tensor | None = None

    @staticmethod
    def reads_rows(codec: WeightCodec) -> bool:
        """Whether a lookup needs only the looked-up stored rows (so a table on disk can be read by row)."""
        return codec.quant is None or codec.dim != 0

    def _stored(self, index: slice | torch.Tensor) -> torch.Tensor:
        """Stored bytes of rows `index`, uint8 (n, stored row bytes) on the compute device."""
        if not self.on_disk:
            if isinstance(index, torch.Tensor):
                index = index.to(self.data.device)
            return self.data.view(self.rows, -1)[index]
        nbytes = self.codec.stored_row_bytes
        if self._staging is None:
            self._staging = aligned_empty(DiskStore.staging_bytes(self.step * nbytes))
        if isinstance(index, slice):
            n = index.stop - index.start
            return self.data.read(index.start * nbytes, n * nbytes, out=self._staging).view(n, nbytes).to(self.device)
        unique, inverse = torch.unique(index.cpu(), return_inverse=True)
        rows = torch.empty(len(unique), nbytes, dtype=torch.uint8)
        for i, row in enumerate(unique.tolist()):
            rows[i] = self.data.read(row * nbytes, nbytes, out=self._staging)
        return rows.to(self.device)[inverse.to(self.device)]

    def _decoded(self):
        """(stored rows, their decoded values) chunk by chunk; the values live until the next chunk."""
        buf = None if self.plain else torch.empty(self.step * self.width, dtype=self.dtype, device=self.device)
        for start in range(0, self.rows, self.step):
            chunk = slice(start, min(start + self.step, self.rows))
            out = None if buf is None else buf[:(chunk.stop - start) * self.width].view(-1, self.width)
            yield chunk, self.codec.decode_rows(self._stored(chunk), self.dtype, out)

    def __getitem__(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of the weight (an embedding lookup), shape (*ids.shape, columns)."""
        flat = ids.reshape(-1)
        if not self.transposed:
            return self.codec.decode_rows(self._stored(flat), self.dtype).view(*ids.shape, self.width)
        return self.codec.decode_columns(self.data, flat, self.dtype).view(*ids.shape, self.rows)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """x @ table.T (an LM head), one decoded chunk at a time."""
        if self.step >= self.rows:
            _, w = next(self._decoded())
            return x @ (w if self.transposed else w.t())
        if not self.transposed:  # stored rows are the outputs: each chunk fills its own columns
            out = torch.empty(*x.shape[:-1], self.rows, dtype=x.dtype, device=x.device)
            for chunk, w in self._decoded():
                out[..., chunk] = x @ w.t()
            return out
        out = torch.zeros(*x.shape[:-1], self.width, dtype=x.dtype, device=x.device)
        for chunk, w in self._decoded():  # stored rows are the inputs: every chunk adds to all outputs
            out += x[..., chunk] @ w
        return out
