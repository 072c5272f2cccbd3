"""4-bit weights multiplied straight from their packed bytes, with torch's fused int4 CPU matmul.

Decoding a 4-bit weight to fp32 and then multiplying costs a CPU two passes over 4 bytes per value;
in a decode step (a few rows) both are bound by memory bandwidth. `torch._weight_int4pack_mm_for_cpu`
(the kernel behind gpt-fast's int4 on CPU) reads the packed half byte per value once instead, several
times faster at decode shapes (`python -m engine.bench.codec --fused`; docs/measurements.md). It
wants groups along the input dimension (`comp_weight_dim=1`), 4 bits, groups of 32 to 256, and bf16
activations; it returns bf16 outputs, so its results differ from the fp32 path by bf16 rounding
(about 2^-9 relative), well inside the 4-bit quantization error. Large products (prefill) gain nothing from it,
so a weight stored for the kernel is decoded once per layer load when a call has many rows.

The kernel's packed layout depends on the CPU's vector width and is internal to torch, so it is
learned from torch's own packing function at first use (`kernel_layout`), and checked: where torch
packs in a way this module does not model, the kernel is not used and weights keep the row format.
The stored form keeps the codec's numbers exactly (fp16 minimum and step per group), so decoding it
gives the same values as decoding the row format.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from engine.quant.groupwise import QuantSpec, row_blocks, row_nbytes, scratch_tensors

KERNEL_GROUPS = (32, 64, 128, 256)
# Rows up to which the fused kernel beats decoding once and an fp32 GEMM: past about this many rows the
# GEMM's reuse of each decoded value wins (`python -m engine.bench.codec --fused` measures the crossover).
FUSED_MAX_ROWS = 48
_OPS = torch.ops.aten


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """uint8 (..., n) -> (..., 2n): each byte's low then high 4 bits."""
    return torch.stack((packed & 15, packed >> 4), dim=-1).flatten(-2)


@functools.cache
def kernel_layout() -> int | None:
    """Rows per block of torch's int4 packing on this CPU, or None where it packs otherwise.

    Torch packs a (N, K) code matrix as N/block blocks; for each input column of a block it writes
    block/2 bytes, byte j holding row j in its low and row j + block/2 in its high 4 bits. Packing a
    probe whose codes spell their own row and column reveals block, and checks the rest.
    """
    if not hasattr(_OPS, "_convert_weight_to_int4pack_for_cpu"):
        return None
    n, k = 128, 2
    rows = torch.arange(n, dtype=torch.int32)[:, None].expand(n, k)
    cols = torch.arange(k, dtype=torch.int32)[None, :].expand(n, k)

    def slots(codes: torch.Tensor) -> torch.Tensor:
        packed = _OPS._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1)
        return _nibbles(packed.reshape(-1)).long()

    try:
        row, col = slots(rows % 16) + 16 * slots(rows // 16), slots(cols)
    except RuntimeError:
        return None
    block = int((col == 0).long().cumprod(0).sum())
    if block < 2 or block % 2 or n % block:
        return None
    s = torch.arange(n * k)  # slot s: block s // (k·block), column s // block % k, byte s % block // 2
    expect_row = s // (k * block) * block + s % block // 2 + s % 2 * (block // 2)
    if not (torch.equal(row, expect_row) and torch.equal(col, s // block % k)):
        return None
    return block


def supported(shape: tuple[int, ...], spec: QuantSpec | None, dim: int, device: torch.device) -> bool:
    """Whether a weight of `shape`, quantized with `spec` along `dim`, can be stored for the kernel."""
    block = kernel_layout() if device.type == "cpu" else None
    if block is None or spec is None or len(shape) != 2 or dim != 1:
        return False
    out_features, in_features = shape
    return (spec.bits == 4 and spec.group in KERNEL_GROUPS and in_features % spec.group == 0
            and out_features % block == 0)


def to_kernel(rows: torch.Tensor, shape: tuple[int, int], spec: QuantSpec) -> torch.Tensor:
    """Encoded rows (N, row_nbytes(K)) of a weight grouped along dim 1 -> flat kernel form.

    Kernel form: [N·K/2 code bytes in torch's packed layout][(K/group, N, 2) fp16 (minimum, step)].
    Same size as the rows; only the order of codes and fields changes.
    """
    block = kernel_layout()
    (n, k), groups = shape, shape[1] // spec.group
    codes = _nibbles(rows[:, :k // 2]).view(n // block, 2, block // 2, k)
    packed = (codes[:, 0] | (codes[:, 1] << 4)).transpose(1, 2).reshape(-1)
    fields = rows[:, k // 2:].contiguous().view(torch.float16).view(n, 2, groups).permute(2, 0, 1)
    return torch.cat((packed, fields.contiguous().view(torch.uint8).reshape(-1)))


def _parts(data: torch.Tensor, shape: tuple[int, int], spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed codes (N, K/2) uint8, fields (K/group, N, 2) fp16) of kernel-form bytes."""
    (n, k), code_bytes = shape, shape[0] * shape[1] // 2
    if data.numel() != n * row_nbytes(k, spec):
        raise ValueError(f"kernel-form weight has {data.numel()} bytes, shape {shape} needs {n * row_nbytes(k, spec)}")
    return data[:code_bytes].view(n, k // 2), data[code_bytes:].view(torch.float16).view(k // spec.group, n, 2)


def decode(data: torch.Tensor, shape: tuple[int, int], spec: QuantSpec, dtype: torch.dtype,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """Kernel-form bytes -> the (N, K) weight in `dtype` (into `out` if given); the row format's values.

    It goes through cache-sized blocks of rows, each first transposed as bytes so that every later
    pass is contiguous: as fast as decoding the row format.
    """
    block, cpu = kernel_layout(), torch.device("cpu")
    (n, k), g, half = shape, spec.group, block // 2
    packed, fields = _parts(data, shape, spec)
    packed = packed.view(n // block, k, half)
    out = torch.empty(shape, dtype=dtype) if out is None else out
    step, mn = (fields[..., i].t().float().unsqueeze(-1) for i in (1, 0))  # (N, K/group, 1)
    rows_per, row_slices = row_blocks(n, k, cpu, align=block)
    direct = dtype == torch.float32  # no scratch: compute in the output
    bytes_t, codes, scratch = scratch_tensors(
        cpu, ((rows_per // block, half, k), torch.uint8), ((rows_per, k), torch.uint8),
        ((0 if direct else rows_per, k), torch.float32))
    for rows in row_slices:
        blocks = packed[rows.start // block:rows.stop // block]
        nrows = len(blocks) * block
        part_t = bytes_t[:len(blocks)].copy_(blocks.transpose(1, 2))  # (blocks, half, K): rows j, j + half
        halves = codes[:nrows].view(-1, 2, half, k)
        torch.bitwise_and(part_t, 15, out=halves[:, 0])
        torch.bitwise_right_shift(part_t, 4, out=halves[:, 1])
        values = out[rows] if direct else scratch[:nrows]
        values.view(nrows, k // g, g).copy_(codes[:nrows].view(nrows, k // g, g)).mul_(step[rows]).add_(mn[rows])
        if not direct:
            out[rows] = values
    return out


class PackedLinear:
    """A 4-bit weight in kernel form: `linear(x, b)` runs small products on the packed bytes with the
    fused kernel and large ones on a copy decoded once into `out`, its working buffer."""

    def __init__(self, data: torch.Tensor, shape: tuple[int, int], spec: QuantSpec, out: torch.Tensor):
        self.data, self.shape, self.spec, self.out = data, shape, spec, out
        self._decoded: torch.Tensor | None = None
        self._scales: torch.Tensor | None = None

    def linear(self, x: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if rows > FUSED_MAX_ROWS:
            if self._decoded is None:
                self._decoded = decode(self.data, self.shape, self.spec, x.dtype, self.out)
            return F.linear(x, self._decoded, b)
        y = self.fused_product(x.reshape(rows, -1)).to(x.dtype).view(*x.shape[:-1], self.shape[0])
        return y if b is None else y.add_(b)

    def fused_product(self, x: torch.Tensor) -> torch.Tensor:
        """x (rows, K) @ W.T in bf16 by the fused kernel."""
        packed, fields = _parts(self.data, self.shape, self.spec)
        if self._scales is None:  # the kernel's w = (q − 8)·scale + zero, so zero = min + 8·step
            mn, step = fields[..., 0].float(), fields[..., 1].float()
            self._scales = torch.stack((step, mn + 8 * step), dim=-1).to(torch.bfloat16)
        return _OPS._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), packed, self.spec.group, self._scales)
