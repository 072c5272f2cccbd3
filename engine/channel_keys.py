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

Bytes: block j holds, per (row, head), `group` × d b-bit codes and an fp16 minimum and step per channel
(KeyBlocks), laid out block-major. With d a multiple of the group that is the bytes of token-major rows of d
values; the window, at most group − 1 tokens in the storage dtype, is the extra.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.quant import groupwise
from engine.quant.codec import RowCodec
from engine.quant.fit import minmax_params
from engine.quant.groupwise import QuantSpec


@dataclass(frozen=True)
class KeyBlocks:
    """The layout of one cache segment's keys: `rows` sequences × `heads` KV heads × `dim` channels.

    A block holds, per (row, head), its `group` × d codes token-major, then the d channels' fp16 minimums and
    steps: the byte layout of a group-wise row of group·d values with d groups (groupwise.row_nbytes), whose
    groups are the channels, strided, rather than runs. Decoded, a block is already (positions, d), the
    order attention reads keys in, so decoding is one converting copy and one fused multiply-add.
    """

    rows: int
    heads: int
    dim: int
    storage: torch.dtype
    quant: QuantSpec

    @property
    def group(self) -> int:
        return self.quant.group

    @property
    def _head_values(self) -> int:
        """One (row, head)'s block as a group-wise row: group × d values, whose groups of `group` count d."""
        return self.group * self.dim

    @property
    def block_bytes(self) -> int:
        """One block of `group` tokens, every row, head and channel."""
        return self.rows * self.heads * groupwise.row_nbytes(self._head_values, self.quant)

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
        """(rows, n·group, heads, d) keys -> uint8 (n, rows, heads, block bytes a head), each channel's group of
        positions fitted by min-max and coded with encode_rows's arithmetic."""
        b, t, h, d = keys.shape
        values = keys.float().reshape(b, t // self.group, self.group, h, d).permute(1, 0, 3, 2, 4).contiguous()
        mn, step = minmax_params(values.amin(3), values.amax(3), self.quant.levels)  # (n, rows, heads, d)
        codes = groupwise.code_bits_(values, mn.unsqueeze(3), step.unsqueeze(3), self.quant.levels)
        coded = groupwise.pack_codes(codes.reshape(-1, self._head_values), mn.reshape(-1, d), step.reshape(-1, d),
                                     self.quant)
        return coded.view(t // self.group, b, h, -1)

    def decode_into(self, blocks: torch.Tensor, out: torch.Tensor) -> None:
        """Decode coded blocks (n, rows, heads, ·), or their flat bytes, into keys `out` (rows, heads, n·group,
        d), head-major as SDPA reads them best: a slice of the keys attention reads (fp32 arithmetic, rounded
        once to out's dtype, as decode_rows does)."""
        m = self._head_values
        codes, mn, step = groupwise.unpack_codes(blocks.reshape(-1, groupwise.row_nbytes(m, self.quant)), m,
                                                 self.quant)
        n = codes.shape[0] // (self.rows * self.heads)

        def laid_out(t: torch.Tensor) -> torch.Tensor:  # (n·rows·heads, positions·d) -> (rows, heads, n, ·, d)
            return t.view(n, self.rows, self.heads, -1, self.dim).permute(1, 2, 0, 3, 4)

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

