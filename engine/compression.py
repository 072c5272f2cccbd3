"""Group-wise asymmetric min-max quantization (FlexGen's compression), 2 to 8 bits, as a byte codec.

Values are split into groups of `group` consecutive elements along the last dimension. Each group
stores its minimum and its step Δ = (max − min) / (2^b − 1) in fp16, and every value becomes the
b-bit code round((x − min) / Δ). Codes are bit-packed little-endian (value i of a row occupies bits
[b·i, b·i + b) of the row's packed bytes), so 4-bit codes go two per byte, low nibble first.

One encoded row is self-contained, so the KV cache can append and read single token rows:

    [ceil(m·b/8) packed code bytes][G fp16 minimums][G fp16 steps]      G = ceil(m / group)

The stored minimum is rounded down to fp16 and the stored step up, so every value of a group lies
inside [min, min + (2^b − 1)·Δ] as stored and the round-trip error is at most Δ/2 plus fp32 noise.
Values beyond the fp16 range (|x| > 65504) saturate instead of turning into inf or nan.
All work is whole-tensor torch ops (no Python loop over rows or groups), so it runs on any device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.errors import UserError

_FP16_MAX = 65504.0


@dataclass(frozen=True)
class QuantSpec:
    """Bit width (2..8) and group size of the quantizer."""

    bits: int = 4
    group: int = 64

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise UserError(f"compression bits must be an integer from 2 to 8, got {self.bits!r}")
        if not isinstance(self.group, int) or self.group < 1:
            raise UserError(f"compression group size must be a positive integer, got {self.group!r}")

    @property
    def levels(self) -> int:
        """Largest code, 2^bits − 1."""
        return (1 << self.bits) - 1


def _num_groups(m: int, spec: QuantSpec) -> int:
    return -(-m // spec.group)


def _packed_nbytes(m: int, spec: QuantSpec) -> int:
    return -(-m * spec.bits // 8)


def row_nbytes(m: int, spec: QuantSpec) -> int:
    """Bytes of one encoded row of m values: packed codes plus an fp16 minimum and step per group."""
    if m < 1:
        raise UserError(f"cannot quantize rows of {m} values; rows need at least one value")
    return _packed_nbytes(m, spec) + 4 * _num_groups(m, spec)


# -- bit packing -------------------------------------------------------------------------------------
# Eight b-bit codes fill exactly b bytes, so rows are packed in chunks of 8 codes. The (byte, code,
# shift) layout below is a handful of constants per bit width; the tensor ops run over all chunks at once.

def _pack_terms(bits: int) -> list[tuple[int, int, int]]:
    """(byte j, code i, shift) for every code i that has bits in byte j; shift > 0 means left shift."""
    terms = []
    for i in range(8):
        lo = bits * i
        for j in range(lo // 8, (lo + bits - 1) // 8 + 1):
            terms.append((j, i, lo - 8 * j))
    return terms


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes (n, 8k) -> uint8 bytes (n, bits·k)."""
    if bits == 8:
        return codes
    n = codes.shape[0]
    chunks = codes.view(n, codes.shape[1] // 8, 8).permute(2, 0, 1)  # (8, n, k): one slab per code position
    out = torch.zeros(bits, n, chunks.shape[2], dtype=torch.uint8, device=codes.device)
    for j, i, shift in _pack_terms(bits):
        out[j] |= chunks[i] << shift if shift >= 0 else chunks[i] >> -shift
    return out.permute(1, 2, 0).reshape(n, bits * chunks.shape[2])


def _unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 bytes (n, bits·k) -> uint8 codes (n, 8k)."""
    if bits == 8:
        return packed
    n = packed.shape[0]
    slabs = packed.view(n, packed.shape[1] // bits, bits).permute(2, 0, 1)  # (bits, n, k)
    codes = torch.zeros(8, n, slabs.shape[2], dtype=torch.uint8, device=packed.device)
    for j, i, shift in _pack_terms(bits):
        codes[i] |= slabs[j] >> shift if shift >= 0 else slabs[j] << -shift
    codes &= (1 << bits) - 1
    return codes.permute(1, 2, 0).reshape(n, 8 * slabs.shape[2])


# -- per-group parameters ----------------------------------------------------------------------------

def _group_params(groups: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 (min, step) per group of fp32 `groups` (..., G, g), rounded so that they cover the group."""
    lo, hi = torch.aminmax(groups, dim=-1)
    lo, hi = lo.clamp(-_FP16_MAX, _FP16_MAX), hi.clamp(-_FP16_MAX, _FP16_MAX)
    mn = lo.to(torch.float16)
    down = torch.nextafter(mn, torch.full_like(mn, -torch.inf))
    mn = torch.where(mn.float() > lo, down, mn)
    step = ((hi - mn.float()) / spec.levels).to(torch.float16)  # at most 131008 / 3: no overflow
    up = torch.nextafter(step, torch.full_like(step, torch.inf))  # also lifts a step that underflowed to 0
    step = torch.where(mn.float() + spec.levels * step.float() < hi, up, step)
    return mn, step


# -- rows --------------------------------------------------------------------------------------------

# Rows are processed in blocks so that the fp32 temporaries stay cache-sized on a CPU, where fresh
# large allocations (page faults) and memory traffic would otherwise cost more than the arithmetic,
# and bounded on a GPU. The loop runs over blocks of many rows, never over single rows or groups.
_BLOCK_VALUES = {"cpu": 1 << 18}
_DEFAULT_BLOCK_VALUES = 1 << 24


def _blocks(n: int, m: int, device: torch.device) -> list[slice]:
    rows = max(1, _BLOCK_VALUES.get(device.type, _DEFAULT_BLOCK_VALUES) // m)
    return [slice(start, start + rows) for start in range(0, n, rows)]


def encode_rows(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Quantize float rows (..., m) into uint8 (..., row_nbytes(m)) on x's device."""
    if not x.is_floating_point() or x.dim() < 1:
        raise UserError(f"encode_rows needs a floating-point tensor of rows, got {x.dtype} {tuple(x.shape)}")
    m = x.shape[-1]
    nbytes = row_nbytes(m, spec)
    rows = x.reshape(-1, m)
    out = torch.empty(rows.shape[0], nbytes, dtype=torch.uint8, device=x.device)
    for block in _blocks(rows.shape[0], m, x.device):
        _encode_block(rows[block], spec, out[block])
    return out.reshape(*x.shape[:-1], nbytes)


def _encode_block(rows: torch.Tensor, spec: QuantSpec, out: torch.Tensor) -> None:
    n, m = rows.shape
    num_groups, g = _num_groups(m, spec), spec.group
    rows = rows.float()
    if num_groups * g != m:  # pad the short last group with its own last value: min/max unchanged
        rows = torch.cat([rows, rows[:, -1:].expand(n, num_groups * g - m)], dim=1)
    groups = rows.view(n, num_groups, g)
    mn, step = _group_params(groups, spec)
    inv = torch.where(step > 0, 1.0 / step.float(), 0.0)  # a constant group has step 0: all codes 0
    q = torch.empty(n, num_groups, g, device=rows.device)
    torch.sub(groups, mn.float().unsqueeze(-1), out=q)
    q.mul_(inv.unsqueeze(-1)).round_().clamp_(0, spec.levels)
    codes = torch.empty(n, -(-m // 8) * 8, dtype=torch.uint8, device=rows.device)
    codes[:, :m] = q.view(n, num_groups * g)[:, :m]
    codes[:, m:] = 0  # completes the last chunk of eight codes; bytes past the row's packed end are dropped
    packed_len = _packed_nbytes(m, spec)
    out[:, :packed_len] = _pack(codes, spec.bits)[:, :packed_len]
    out[:, packed_len:packed_len + 2 * num_groups] = mn.view(torch.uint8)
    out[:, packed_len + 2 * num_groups:] = step.view(torch.uint8)


def decode_rows(data: torch.Tensor, m: int, spec: QuantSpec, dtype: torch.dtype) -> torch.Tensor:
    """Dequantize uint8 rows (..., row_nbytes(m)) into (..., m) of `dtype` on data's device.

    The arithmetic is fp32 and the result is rounded once to `dtype`.
    """
    nbytes = row_nbytes(m, spec)
    if data.dtype != torch.uint8 or data.dim() < 1 or data.shape[-1] != nbytes:
        raise UserError(f"decode_rows expects uint8 rows of {nbytes} bytes ({m} values at {spec.bits} "
                        f"bits, group {spec.group}), got {data.dtype} {tuple(data.shape)}")
    rows = data.reshape(-1, nbytes)
    out = torch.empty(rows.shape[0], m, dtype=dtype, device=data.device)
    for block in _blocks(rows.shape[0], m, data.device):
        _decode_block(rows[block], spec, out[block])
    return out.reshape(*data.shape[:-1], m)


def _fp16_field(raw: torch.Tensor) -> torch.Tensor:
    """fp32 values of fp16 bytes (n, 2k); the copy gives the even offset an fp16 view needs."""
    return raw.clone(memory_format=torch.contiguous_format).view(torch.float16).float()


def _decode_block(data: torch.Tensor, spec: QuantSpec, out: torch.Tensor) -> None:
    n, m = out.shape
    num_groups, g = _num_groups(m, spec), spec.group
    packed_len = _packed_nbytes(m, spec)
    width = -(-num_groups * g // 8) * 8  # whole chunks of eight codes covering every group
    packed = torch.empty(n, width * spec.bits // 8, dtype=torch.uint8, device=data.device)
    packed[:, :packed_len] = data[:, :packed_len]
    packed[:, packed_len:] = 0
    codes = _unpack(packed, spec.bits)[:, :num_groups * g].unflatten(1, (num_groups, g))
    mn = _fp16_field(data[:, packed_len:packed_len + 2 * num_groups])
    step = _fp16_field(data[:, packed_len + 2 * num_groups:])
    direct = out.dtype == torch.float32 and num_groups * g == m
    values = out.view(n, num_groups, g) if direct else torch.empty(n, num_groups, g, device=data.device)
    values.copy_(codes).mul_(step.unsqueeze(-1)).add_(mn.unsqueeze(-1))
    if not direct:
        out.copy_(values.view(n, num_groups * g)[:, :m])


# -- 2-D weights -------------------------------------------------------------------------------------
# dim=0 groups along the output dimension (FlexGen's default): the rows handed to the codec are the
# columns of the (out, in) weight. dim=1 groups along the input dimension: rows are the weight's rows.

def _weight_rows(shape: tuple[int, int], dim: int) -> tuple[int, int]:
    """(number of codec rows, values per row) of a 2-D weight grouped along `dim`."""
    if len(shape) != 2 or dim not in (0, 1):
        raise UserError(f"weights must be 2-D and grouped along dim 0 or 1, got shape {tuple(shape)}, "
                        f"dim {dim}")
    out_features, in_features = shape
    return (in_features, out_features) if dim == 0 else (out_features, in_features)


def weight_nbytes(shape: tuple[int, int], spec: QuantSpec, dim: int) -> int:
    """Bytes of an encoded 2-D weight."""
    n, m = _weight_rows(shape, dim)
    return n * row_nbytes(m, spec)


def encode_weight(w: torch.Tensor, spec: QuantSpec, dim: int = 0) -> torch.Tensor:
    """Quantize a 2-D weight into a flat uint8 tensor of weight_nbytes(w.shape, spec, dim) bytes."""
    _weight_rows(tuple(w.shape), dim)
    return encode_rows(w.t() if dim == 0 else w, spec).reshape(-1)


def decode_weight(data: torch.Tensor, shape: tuple[int, int], spec: QuantSpec, dim: int,
                  dtype: torch.dtype) -> torch.Tensor:
    """Dequantize a flat encoded weight back to `shape` and `dtype`.

    With dim=0 the result is a transposed view, (in, out)-contiguous, which is the layout
    `F.linear` multiplies fastest; call .contiguous() if a row-major copy is needed.
    """
    n, m = _weight_rows(tuple(shape), dim)
    if data.numel() != n * row_nbytes(m, spec):
        raise UserError(f"encoded weight has {data.numel()} bytes, but shape {tuple(shape)} at {spec.bits} "
                        f"bits, group {spec.group}, dim {dim} needs {weight_nbytes(shape, spec, dim)}")
    rows = decode_rows(data.reshape(n, -1), m, spec, dtype)
    return rows.t() if dim == 0 else rows
