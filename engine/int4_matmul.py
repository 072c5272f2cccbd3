"""4-bit weights multiplied straight from their packed bytes, with torch's fused int4 CPU matmul.

Decoding a 4-bit weight to fp32 and then multiplying costs a CPU two passes over 4 bytes per value;
in a decode step (a few rows) both are bound by memory bandwidth. `torch._weight_int4pack_mm_for_cpu`
(the kernel behind gpt-fast's int4 on CPU) reads the packed half byte per value once instead: on
this machine, 5.4 ms against 10 + 20 ms for an (8 x 2048) @ (2048 x 8192) product. It wants groups
along the input dimension (`comp_weight_dim=1`), 4 bits, groups of 32 to 256, and bf16 activations;
it returns bf16 outputs, so its results differ from the fp32 path by bf16 rounding (about 2^-9
relative), well inside the 4-bit quantization error. Large products (prefill) gain nothing from it,
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

from engine.compression import QuantSpec, row_nbytes

KERNEL_GROUPS = (32, 64, 128, 256)
# Rows up to which the fused kernel beats decoding once and an fp32 GEMM (OPT-1.3B shapes, 2 cores:
# at 64 rows they tie, at 256 the GEMM is 1.6x faster); `engine.bench_quant --fused` measures it.
FUSED_MAX_ROWS = 48
_OPS = torch.ops.aten


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """uint8 (..., n) -> (..., 2n): each byte's low then high 4 bits."""
    return torch.stack((packed & 15, packed >> 4), dim=-1).flatten(-2)


@functools.cache
def kernel_layout() -> tuple[int, torch.Tensor] | None:
    """(rows per block, row order inside a block) of torch's int4 packing on this CPU, or None.

    Torch packs a (N, K) code matrix as N/block blocks of K packed rows, each row holding the block's
    `block` codes of one input column in the order `order`, two per byte, low nibble first. Packing
    a probe whose codes spell their own row and column reveals block and order.
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
    if block == 0 or n % block:
        return None
    order = row[:block]
    if not torch.equal(order.sort().values, torch.arange(block)):
        return None
    s = torch.arange(n * k)
    expect_row = s // (k * block) * block + order[s % block]
    expect_col = s // block % k
    if not (torch.equal(row, expect_row) and torch.equal(col, expect_col)):
        return None
    return block, order


def supported(shape: tuple[int, ...], spec: QuantSpec | None, dim: int, device: torch.device) -> bool:
    """Whether a weight of `shape`, quantized with `spec` along `dim`, can be stored for the kernel."""
    layout = kernel_layout() if device.type == "cpu" else None
    if layout is None or spec is None or len(shape) != 2 or dim != 1:
        return False
    out_features, in_features = shape
    return (spec.bits == 4 and spec.group in KERNEL_GROUPS and in_features % spec.group == 0
            and out_features % layout[0] == 0)


def to_kernel(rows: torch.Tensor, shape: tuple[int, int], spec: QuantSpec) -> torch.Tensor:
    """Encoded rows (N, row_nbytes(K)) of a weight grouped along dim 1 -> flat kernel form.

    Kernel form: [N·K/2 code bytes in torch's packed layout][(K/group, N, 2) fp16 (minimum, step)].
    Same size as the rows; only the order of codes and fields changes.
    """
    block, order = kernel_layout()
    (n, k), groups = shape, shape[1] // spec.group
    codes = _nibbles(rows[:, :k // 2]).view(n // block, block, k)[:, order].transpose(1, 2).reshape(-1, 2)
    packed = codes[:, 0] | (codes[:, 1] << 4)
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
    """Kernel-form bytes -> the (N, K) weight in `dtype` (into `out` if given); the row format's values."""
    block, order = kernel_layout()
    (n, k), g = shape, spec.group
    packed, fields = _parts(data, shape, spec)
    slots = _nibbles(packed).view(n // block, k, block)[..., order.argsort()]
    out = torch.empty(shape, dtype=dtype) if out is None else out
    groups = out.view(n // block, block, k).copy_(slots.transpose(1, 2)).view(n, k // g, g)
    step, mn = (fields[..., i].t().float().unsqueeze(-1) for i in (1, 0))
    groups.mul_(step).add_(mn)
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
        packed, fields = _parts(self.data, self.shape, self.spec)
        if self._scales is None:  # the kernel's w = (q − 8)·scale + zero, so zero = min + 8·step
            mn, step = fields[..., 0].float(), fields[..., 1].float()
            self._scales = torch.stack((step, mn + 8 * step), dim=-1).to(torch.bfloat16)
        y = _OPS._weight_int4pack_mm_for_cpu(x.reshape(rows, -1).to(torch.bfloat16), packed, self.spec.group,
                                             self._scales)
        y = y.to(x.dtype).view(*x.shape[:-1], self.shape[0])
        return y if b is None else y.add_(b)
