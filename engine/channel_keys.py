"""A compressed KV cache's keys grouped per channel over blocks of tokens (KIVI, Liu et al. 2024).

Keys have outlier channels: a few of a head's d dimensions are far larger than the rest at every token,
so a group made of one token's d values spends its 2^b levels on those few. Grouping each channel over
`group` consecutive tokens puts an outlier channel in groups of its own. A block can only be encoded
once all its tokens exist, so the keys of the unfinished block wait in a window in the storage dtype.

What attention sees is defined per query, and is the same in a prefill and in decode steps: the blocks
before the query's own as they are stored (quantized), its own block's keys as computed. So a prompt's
log-probs equal those of feeding it token by token, and no key is quantized with statistics of tokens
after the query that reads it. Blocks start at absolute cache positions, so a left-padded row's groups
depend on its padding (as with any batch-dependent numerics; a row's outputs depend on its block).

Bytes: block j holds, per (row, head, channel), its `group` values as one group-wise coded row, laid out
block-major (blocks, rows, heads, d, row_nbytes(group)). With d a multiple of the group that is the bytes of
token-major rows of d values; the window, at most group − 1 tokens in the storage dtype, is the extra.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.quant import groupwise
from engine.quant.codec import RowCodec
from engine.quant.groupwise import QuantSpec


@dataclass(frozen=True)
class KeyBlocks:
    """The layout of one cache segment's keys: `rows` sequences × `heads` KV heads × `dim` channels."""

    rows: int
    heads: int
    dim: int
    storage: torch.dtype
    quant: QuantSpec

    @property
    def group(self) -> int:
        return self.quant.group

    @property
    def block_bytes(self) -> int:
        """One block of `group` tokens, every row, head and channel."""
        return self.rows * self.heads * self.dim * groupwise.row_nbytes(self.group, self.quant)

    @property
    def token_bytes(self) -> int:
        """One window token, every row and head, in the storage dtype."""
        return self.rows * self.heads * self.dim * self.storage.itemsize

    def store_bytes(self, max_len: int) -> int:
        """The blocks store: only whole blocks are ever encoded."""
        return max_len // self.group * self.block_bytes

    def window_bytes(self, max_len: int) -> int:
        return min(self.group - 1, max_len) * self.token_bytes

    def encode(self, keys: torch.Tensor) -> torch.Tensor:
        """(rows, n·group, heads, d) keys -> uint8 (n, rows, heads, d, row_nbytes(group)) blocks."""
        b, t, h, d = keys.shape
        blocks = keys.reshape(b, t // self.group, self.group, h, d).permute(1, 0, 3, 4, 2)
        return groupwise.encode_rows(blocks.float(), self.quant)

    def decode_into(self, blocks: torch.Tensor, out: torch.Tensor) -> None:
        """Decode coded blocks (n, rows, heads, d, ·), or their flat bytes, into keys `out` (rows, heads,
        n·group, d), head-major as SDPA reads them best: a slice of the keys attention reads. The codes cross
        into that layout in one converting copy and are scaled in place there (fp32, as decode_rows computes)."""
        codes, mn, step = groupwise.unpack_codes(blocks.reshape(-1, groupwise.row_nbytes(self.group, self.quant)),
                                                 self.group, self.quant)
        n = codes.shape[0] // (self.rows * self.heads * self.dim)

        def laid_out(t: torch.Tensor) -> torch.Tensor:  # (n·rows·heads·d, group or 1) -> (rows, heads, n, ·, d)
            return t.view(n, self.rows, self.heads, self.dim, -1).permute(1, 2, 0, 4, 3)

        target = out.view(self.rows, self.heads, n, self.group, self.dim)
        values = target if out.dtype == torch.float32 else torch.empty(target.shape, device=out.device)
        values.copy_(laid_out(codes))
        torch.addcmul(laid_out(mn).contiguous(), values, laid_out(step).contiguous(), out=values)
        if values is not target:
            target.copy_(values)

def segment_bytes(rows: int, heads: int, dim: int, max_len: int, storage: torch.dtype, quant: QuantSpec | None,
                  keys: str) -> dict[str, int]:
    """Bytes of one layer's cache segment per store ('k', 'v' and, for channel-grouped keys, the window 'kw'),
    sized for `max_len` positions: the one rule the cache allocates by and the memory plan counts."""
    values = max_len * RowCodec(rows * heads * dim, storage, quant, vector=dim).row_bytes
    if quant is None or keys == "token":
        return {"k": values, "v": values}
    layout = KeyBlocks(rows, heads, dim, storage, quant)
    return {"k": layout.store_bytes(max_len), "v": values, "kw": layout.window_bytes(max_len)}

