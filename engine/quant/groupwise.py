"""Group-wise asymmetric quantization (FlexGen's compression), 2 to 8 bits, as a byte codec.

Values are split into groups of `group` consecutive elements along the last dimension. Each group
stores its minimum and its step Δ in fp16, and every value becomes the b-bit code
clamp(round((x − min) / Δ), 0, 2^b − 1). FlexGen's min-max takes Δ = (max − min) / (2^b − 1); the
error-minimizing fit (engine.quant.fit) chooses (min, Δ) per group for the least squared error.
Codes are bit-packed little-endian (value i of a row occupies bits [b·i, b·i + b) of the row's packed
bytes), so 4-bit codes go two per byte, low nibble first.

One encoded row is self-contained, so the KV cache can append and read single token rows:

    [ceil(m·b/8) packed code bytes][G fp16 minimums][G fp16 steps]      G = ceil(m / group)

With min-max, the stored minimum is rounded down to fp16 and the stored step up, so every value of a
group lies inside [min, min + (2^b − 1)·Δ] as stored and the round-trip error is at most Δ/2 plus fp32 noise.
Inputs beyond the fp16 range (|x| > 65504) are clamped to it, so no group parameter becomes inf or nan.
All work is whole-tensor torch ops over blocks of rows (no Python loop over rows or groups), on any
device. Grouping along a weight's output dimension (dim=0) encodes its transpose, which costs one
transposed copy of the weight at encode time and nothing at decode time.
"""

from __future__ import annotations

import functools
import math
import threading
from dataclasses import dataclass

import torch

from engine.errors import UserError
from engine.quant.fit import FITS, WORK_TENSORS, fitted_params, minmax_params

_ROUND_MAGIC = float(1 << 23)


@dataclass(frozen=True)
class QuantSpec:
    """Bit width (2..8) and group size of the quantizer, and how each group's (min, step) is chosen.

    `fit` changes only encoding (engine.quant.fit): "minmax" is FlexGen's; "mse" and "weighted" minimize a
    squared reconstruction error, costlier, so they are for weights encoded once, not for the KV cache.
    """

    bits: int = 4
    group: int = 64
    fit: str = "minmax"

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise UserError(f"compression bits must be an integer from 2 to 8, got {self.bits!r}")
        if not isinstance(self.group, int) or self.group < 1:
            raise UserError(f"compression group size must be a positive integer, got {self.group!r}")
        if self.fit not in FITS:
            raise UserError(f"compression fit must be one of {', '.join(FITS)}, got {self.fit!r}")

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
# Eight b-bit codes fill exactly b bytes. Eight one-byte codes are viewed as one int64 and squeezed in
# doubling lanes: after stage s every lane of 8·2^s bits holds 2^s codes in its low b·2^s bits. Packing
# stops at the first stage whose lane value is whole bytes (stage 1 at 4 bits, none at 8 bits) and keeps
# those bytes of each lane; unpacking reverses the stages. All shifts and masks are whole-tensor ops.

def _lane_mask(lane_bits: int, lo: int, hi: int) -> int:
    """Bits [lo, hi) of every lane_bits-wide lane of an int64, as a (non-negative) Python int."""
    return sum(((1 << hi) - (1 << lo)) << offset for offset in range(0, 64, lane_bits))


@functools.cache
def _stages(bits: int) -> tuple[list[tuple[int, int, int, int, int]], int, int]:
    """Stages (value bits in, lane bits out, keep mask, pack mask, unpack mask), lane bytes, value bytes."""
    stages, value_bits, lane_bits = [], bits, 8
    while value_bits % 8:
        half, lane_bits = lane_bits, 2 * lane_bits
        stages.append((value_bits, lane_bits, _lane_mask(lane_bits, 0, value_bits),
                       _lane_mask(lane_bits, value_bits, 2 * value_bits),
                       _lane_mask(lane_bits, half, half + value_bits)))
        value_bits *= 2
    return stages, lane_bits // 8, value_bits // 8


_LANE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _pack(codes: torch.Tensor, bits: int, dest: torch.Tensor, moved: torch.Tensor) -> None:
    """Pack uint8 codes (n, 8k) into dest, the first bytes of each packed row.

    `codes` is overwritten and `moved` (int64, (n, k)) is scratch, so a block allocates nothing.
    """
    n, width = codes.shape
    lanes = codes.view(torch.int64)
    stages, lane_bytes, value_bytes = _stages(bits)
    for value_bits, lane_bits, keep, move, _ in stages:
        torch.bitwise_right_shift(lanes, lane_bits // 2 - value_bits, out=moved).bitwise_and_(move)
        lanes.bitwise_and_(keep).bitwise_or_(moved)
    if value_bytes == 1:  # one byte per lane (2, 4 and 8 bits): a narrowing integer copy keeps it
        dest.copy_(codes.view(_LANE_INT[lane_bytes])[:, :dest.shape[1]])
    else:
        packed = codes.view(n, width // lane_bytes, lane_bytes)[..., :value_bytes]
        dest.copy_(packed.reshape(n, width * bits // 8)[:, :dest.shape[1]])


def _unpack(packed: torch.Tensor, bits: int, codes: torch.Tensor, moved: torch.Tensor) -> None:
    """Unpack the packed part of rows (n, ≤ bits·k) into uint8 codes (n, 8k); `moved` as in _pack.

    Nothing is zeroed first: the stages' masks drop whatever sits above a lane's value bytes, and
    lanes past the packed bytes only yield codes past the row's end, which the caller discards.
    """
    n, packed_len = packed.shape
    stages, lane_bytes, value_bytes = _stages(bits)
    if value_bytes == 1:  # a widening integer copy puts each byte at the bottom of its lane
        codes.view(_LANE_INT[lane_bytes])[:, :packed_len] = packed
    else:
        lanes = codes.view(n, codes.shape[1] // lane_bytes, lane_bytes)
        full, rest = divmod(packed_len, value_bytes)
        lanes[:, :full, :value_bytes] = packed[:, :full * value_bytes].view(n, full, value_bytes)
        if rest:
            lanes[:, full, :rest] = packed[:, full * value_bytes:]
    lanes = codes.view(torch.int64)
    for value_bits, lane_bits, keep, _, back in reversed(stages):
        torch.bitwise_left_shift(lanes, lane_bits // 2 - value_bits, out=moved).bitwise_and_(back)
        lanes.bitwise_and_(keep).bitwise_or_(moved)


# -- rows --------------------------------------------------------------------------------------------
# Rows go through in blocks whose fp32 scratch is allocated once per call and reused: on a CPU a block
# stays cache-sized and no large buffer is freshly allocated (page faults) per step; on a GPU the block
# bounds the temporary memory. The loop runs over blocks of many rows, never over single rows or groups.
_BLOCK_VALUES = {"cpu": 1 << 20}  # 4 MB of fp32 scratch: stays in L3
_DEFAULT_BLOCK_VALUES = 1 << 24


_held = threading.local()


def scratch_tensors(device: torch.device, *specs: tuple[tuple[int, ...], torch.dtype]) -> list[torch.Tensor]:
    """Scratch tensors of the given shapes and dtypes for one call, carved from one buffer.

    On a CPU each thread keeps that buffer between calls: a fresh MB-sized allocation pays its page
    faults on every call, which for a cache-sized chunk costs a tenth of decoding it. On a GPU the
    caching allocator already reuses memory.
    """
    sizes = [-(-math.prod(shape) * dtype.itemsize // 64) * 64 for shape, dtype in specs]
    if device.type == "cpu":
        buf = getattr(_held, "buf", None)
        if buf is None or buf.numel() < sum(sizes):
            buf = _held.buf = torch.empty(sum(sizes), dtype=torch.uint8)
    else:
        buf = torch.empty(sum(sizes), dtype=torch.uint8, device=device)
    out, at = [], 0
    for (shape, dtype), size in zip(specs, sizes, strict=True):
        out.append(buf[at:at + math.prod(shape) * dtype.itemsize].view(dtype).view(shape))
        at += size
    return out


def row_blocks(n: int, m: int, device: torch.device, align: int = 1) -> tuple[int, list[slice]]:
    """Rows per block (a multiple of `align` where n is) and the blocks' row slices, for n rows of m values."""
    rows = max(align, min(n, _BLOCK_VALUES.get(device.type, _DEFAULT_BLOCK_VALUES) // m) // align * align)
    return rows, [slice(start, start + rows) for start in range(0, n, rows)]


def code_bits_(values: torch.Tensor, mn: torch.Tensor, step: torch.Tensor, levels: int) -> torch.Tensor:
    """Turn fp32 values into their codes in place, for fp16 (min, step) broadcast against them; returns the
    values' int32 view, whose low byte is each code (what a narrowing integer copy takes)."""
    inv = torch.where(step > 0, 1.0 / step.float(), 0.0)  # a constant group has step 0: codes 0
    values.sub_(mn.float()).mul_(inv).clamp_(0, levels)
    # Adding 2^23 rounds to the nearest integer (ties to even, as round() does) and leaves the code in the
    # low byte of the float's bits.
    return values.add_(_ROUND_MAGIC).view(torch.int32)


def pack_codes(codes: torch.Tensor, mn: torch.Tensor, step: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Coded rows (n, row_nbytes(m)) from codes (n, m) (any integer dtype, each below 2^bits) and fp16
    (minimums, steps) (n, groups): for a caller whose groups are not runs of consecutive values."""
    n, m = codes.shape
    packed_len, num_groups = _packed_nbytes(m, spec), _num_groups(m, spec)
    width = -(-m // 8) * 8
    scratch = torch.zeros(n, width, dtype=torch.uint8, device=codes.device)
    scratch[:, :m] = codes
    out = torch.empty(n, row_nbytes(m, spec), dtype=torch.uint8, device=codes.device)
    _pack(scratch, spec.bits, out[:, :packed_len], torch.empty(n, width // 8, dtype=torch.int64, device=codes.device))
    out[:, packed_len:packed_len + 2 * num_groups] = mn.contiguous().view(torch.uint8)
    out[:, packed_len + 2 * num_groups:] = step.contiguous().view(torch.uint8)
    return out


def encode_rows(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Quantize float rows (..., m) into uint8 (..., row_nbytes(m)) on x's device."""
    if not x.is_floating_point() or x.dim() < 1:
        raise UserError(f"encode_rows needs a floating-point tensor of rows, got {x.dtype} {tuple(x.shape)}")
    m = x.shape[-1]
    nbytes, num_groups, g = row_nbytes(m, spec), _num_groups(m, spec), spec.group
    packed_len = _packed_nbytes(m, spec)
    rows = x.reshape(-1, m)
    if rows.stride(-1) != 1:  # e.g. a weight's columns: one whole transpose beats gathering every block
        rows = rows.contiguous()
    out = torch.empty(rows.shape[0], nbytes, dtype=torch.uint8, device=x.device)
    block_rows, blocks = row_blocks(rows.shape[0], m, x.device)
    fit_rows = block_rows if spec.fit != "minmax" else 0
    scratch, codes_scratch, moved_scratch, *fit_work = scratch_tensors(
        x.device, ((block_rows, num_groups * g), torch.float32), ((block_rows, -(-m // 8) * 8), torch.uint8),
        ((block_rows, -(-m // 8)), torch.int64), *[((fit_rows, num_groups, g), torch.float32)] * WORK_TENSORS)
    codes_scratch.zero_()
    for block in blocks:
        n = rows[block].shape[0]
        values = scratch[:n]
        values[:, :m] = rows[block]
        if num_groups * g != m:  # pad the short last group with its own last value: min/max unchanged
            values[:, m:] = values[:, m - 1:m]
        groups = values.view(n, num_groups, g)
        if spec.fit != "minmax":
            mn, step = fitted_params(groups, spec.levels, spec.fit, tuple(w[:n] for w in fit_work))
        else:
            mn, step = minmax_params(groups.amin(-1), groups.amax(-1), spec.levels)
        code_bits_(groups, mn.unsqueeze(-1), step.unsqueeze(-1), spec.levels)
        codes = codes_scratch[:n]
        codes[:, :m] = values.view(torch.int32)[:, :m]  # the zero tail stays zero: packing moves bits down
        _pack(codes, spec.bits, out[block, :packed_len], moved_scratch[:n])
        out[block, packed_len:packed_len + 2 * num_groups] = mn.view(torch.uint8)
        out[block, packed_len + 2 * num_groups:] = step.view(torch.uint8)
    return out.reshape(*x.shape[:-1], nbytes)


def _group_fields(raw: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (minimums, steps) (n, G) from the fp16 field bytes (n, 4G) that end each row.

    The copy gives the even offset an fp16 view needs."""
    both = raw.clone(memory_format=torch.contiguous_format).view(torch.float16).float()
    return both[:, :num_groups], both[:, num_groups:]


def unpack_codes(data: torch.Tensor, m: int, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The uint8 codes (..., m) and fp32 (minimums, steps) (..., groups) of coded rows (..., row_nbytes(m)):
    what decode_rows computes from, for a caller that lays the decoded values out its own way."""
    nbytes, num_groups = row_nbytes(m, spec), _num_groups(m, spec)
    rows, packed_len = data.reshape(-1, nbytes), _packed_nbytes(m, spec)
    width = -(-num_groups * spec.group // 8) * 8
    codes = torch.empty(rows.shape[0], width, dtype=torch.uint8, device=data.device)
    moved = torch.empty(rows.shape[0], width // 8, dtype=torch.int64, device=data.device)
    _unpack(rows[:, :packed_len], spec.bits, codes, moved)
    mn, step = _group_fields(rows[:, packed_len:], num_groups)
    lead = data.shape[:-1]
    return codes[:, :m].reshape(*lead, m), mn.reshape(*lead, num_groups), step.reshape(*lead, num_groups)


def decode_rows(data: torch.Tensor, m: int, spec: QuantSpec, dtype: torch.dtype,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantize uint8 rows (..., row_nbytes(m)) into (..., m) of `dtype` on data's device.

    The arithmetic is fp32 and the result is rounded once to `dtype`. `out`, a contiguous tensor of
    that shape, dtype and device, receives the result instead of a new tensor: reusing one buffer
    saves the page faults of a fresh allocation, which on a CPU can cost more than decoding.
    """
    nbytes, num_groups, g = row_nbytes(m, spec), _num_groups(m, spec), spec.group
    if data.dtype != torch.uint8 or data.dim() < 1 or data.shape[-1] != nbytes:
        raise UserError(f"decode_rows expects uint8 rows of {nbytes} bytes ({m} values at {spec.bits} "
                        f"bits, group {spec.group}), got {data.dtype} {tuple(data.shape)}")
    packed_len = _packed_nbytes(m, spec)
    width = -(-num_groups * g // 8) * 8  # whole chunks of eight codes covering every group
    rows = data.reshape(-1, nbytes)
    shape = (*data.shape[:-1], m)
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=data.device)
    elif out.shape != shape or out.dtype != dtype or out.device != data.device or not out.is_contiguous():
        raise UserError(f"decode output must be a contiguous {dtype} tensor of shape {shape} on "
                        f"{data.device}, got {out.dtype} {tuple(out.shape)} on {out.device}")
    result, out = out, out.view(-1, m)
    direct = dtype == torch.float32 and num_groups * g == m  # no scratch: compute in the output
    block_rows, blocks = row_blocks(rows.shape[0], m, data.device)
    codes_scratch, moved_scratch, scratch = scratch_tensors(
        data.device, ((block_rows, width), torch.uint8), ((block_rows, width // 8), torch.int64),
        ((0 if direct else block_rows, num_groups * g), torch.float32))
    for block in blocks:
        n = rows[block].shape[0]
        values = out[block] if direct else scratch[:n]
        _unpack(rows[block, :packed_len], spec.bits, codes_scratch[:n], moved_scratch[:n])
        codes = codes_scratch[:n, :num_groups * g]
        mn, step = _group_fields(rows[block, packed_len:], num_groups)
        groups = values.view(n, num_groups, g)
        groups.copy_(codes.view(n, num_groups, g)).mul_(step.unsqueeze(-1)).add_(mn.unsqueeze(-1))
        if not direct:
            out[block] = values[:, :m]
    return result


def decode_columns(data: torch.Tensor, m: int, spec: QuantSpec, dtype: torch.dtype,
                   columns: torch.Tensor) -> torch.Tensor:
    """Values `columns` (k,) of every encoded row (n, row_nbytes(m)), as (k, n): an embedding lookup in
    a table quantized along its vocabulary, which decodes only the groups holding those columns.

    A group's codes start on a byte boundary when group·bits is a multiple of 8 (any group of 64, say);
    each wanted group of each row is then cut out as a one-group row of its own and decoded. Otherwise
    the rows are decoded whole.
    """
    n, g = data.shape[0], spec.group
    if g * spec.bits % 8:
        return decode_rows(data, m, spec, dtype)[:, columns].t()
    groups, which = torch.unique(torch.div(columns, g, rounding_mode="floor"), return_inverse=True)
    code_bytes, packed_len, num_groups = g * spec.bits // 8, _packed_nbytes(m, spec), _num_groups(m, spec)
    # a short last group's codes may run past the packed bytes (clamped into the row): the codes read
    # there belong to columns past m, which are never asked for
    codes = (groups[:, None] * code_bytes + torch.arange(code_bytes, device=data.device)).clamp_(max=packed_len - 1)
    fields = groups[:, None] * 2 + torch.arange(2, device=data.device)
    parts = (codes, packed_len + fields, packed_len + 2 * num_groups + fields)
    one_group_rows = torch.cat([data[:, p.reshape(-1)].view(n, len(groups), -1) for p in parts], dim=-1)
    values = decode_rows(one_group_rows, g, spec, dtype)  # (n, groups, g)
    return values[:, which, columns % g].t()


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
                  dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantize a flat encoded weight back to `shape` and `dtype`.

    With dim=0 the result is a transposed view of a contiguous (in, out) tensor, which `F.linear`
    takes without a copy; call .contiguous() where a row-major copy is needed. `out` is a buffer to
    reuse, laid out like the result (with dim=0, the .t() of a contiguous (in, out) tensor).
    """
    n, m = _weight_rows(tuple(shape), dim)
    if data.numel() != n * row_nbytes(m, spec):
        raise UserError(f"encoded weight has {data.numel()} bytes, but shape {tuple(shape)} at {spec.bits} "
                        f"bits, group {spec.group}, dim {dim} needs {weight_nbytes(shape, spec, dim)}")
    if out is not None and dim == 0:
        out = out.t()
    rows = decode_rows(data.reshape(n, -1), m, spec, dtype, out)
    return rows.t() if dim == 0 else rows
