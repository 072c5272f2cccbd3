"""Round-trip bound, packed sizes and layout of the group-wise quantizer (engine.quant.groupwise)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from engine.errors import UserError
from engine.quant.groupwise import (
    _BLOCK_VALUES,
    QuantSpec,
    decode_rows,
    decode_weight,
    encode_rows,
    encode_weight,
    row_nbytes,
    weight_nbytes,
)

FP16_TINY = 2.0**-24  # spacing of fp16 subnormals


def stored_params(data: torch.Tensor, m: int, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp32 (min, step) per group, read from the documented row layout."""
    groups, packed = math.ceil(m / spec.group), math.ceil(m * spec.bits / 8)
    fields = data[:, packed:].clone(memory_format=torch.contiguous_format).view(torch.float16).float()
    return fields[:, :groups], fields[:, groups:]


def per_element(params: torch.Tensor, m: int, spec: QuantSpec) -> torch.Tensor:
    return params.repeat_interleave(spec.group, dim=1)[:, :m]


def group_extremes(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    n, m = x.shape
    pad = (-m) % spec.group
    padded = torch.cat([x, x[:, -1:].expand(n, pad)], dim=1).view(n, -1, spec.group)
    return padded.amin(-1), padded.amax(-1)


def assert_round_trip_bound(x: torch.Tensor, spec: QuantSpec) -> None:
    """|x − x̂| ≤ Δ/2 + 2⁻¹⁰·(|min| + (2^b − 1)·Δ), with min and Δ as stored, and Δ close to the ideal step."""
    x = x.float()
    n, m = x.shape
    data = encode_rows(x, spec)
    assert data.dtype == torch.uint8 and data.shape == (n, row_nbytes(m, spec))
    x_hat = decode_rows(data, m, spec, torch.float32)
    assert torch.isfinite(x_hat).all()
    mn, step = stored_params(data, m, spec)
    lo, hi = group_extremes(x, spec)
    # The stored min and step cover the group and are no coarser than fp16 rounding makes them.
    assert (mn <= lo).all() and (mn >= lo - 2**-10 * lo.abs() - FP16_TINY).all()
    ideal = (hi - lo + 2**-10 * lo.abs()) / spec.levels
    assert (step <= ideal * (1 + 2**-9) + 2 * FP16_TINY).all()
    d, mn_e = per_element(step, m, spec), per_element(mn, m, spec)
    bound = d / 2 + 2**-10 * (mn_e.abs() + spec.levels * d)
    err = (x - x_hat).abs()
    assert (err <= bound).all(), f"worst excess {(err - bound).max().item()} at {spec}"


specs = st.builds(QuantSpec, bits=st.integers(2, 8), group=st.sampled_from([1, 2, 3, 7, 8, 16, 33, 64, 128]))


@st.composite
def float_rows(draw: st.DrawFn) -> torch.Tensor:
    """Rows with |x| < 6e4: arbitrary floats, or scaled noise with some groups made constant."""
    n, m = draw(st.integers(1, 4)), draw(st.integers(1, 300))
    if draw(st.booleans()):
        elements = st.floats(-6e4, 6e4, width=32, allow_subnormal=True)
        return torch.from_numpy(draw(hnp.arrays(np.float32, (n, m), elements=elements)))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    scale = 10.0 ** draw(st.integers(-8, 4))
    offset = draw(st.sampled_from([0.0, -3.0, 1000.0, -5e4, 1e-6]))
    x = torch.randn(n, m, generator=gen) * scale + offset
    const = draw(st.integers(0, m - 1))
    x[:, const:const + draw(st.integers(0, 130))] = offset  # a run of equal values: constant groups
    return x.clamp(-5.99e4, 5.99e4)


@settings(max_examples=200, deadline=None)
@given(x=float_rows(), spec=specs)
def test_round_trip_within_bound(x: torch.Tensor, spec: QuantSpec) -> None:
    assert_round_trip_bound(x, spec)


@settings(max_examples=60, deadline=None)
@given(x=float_rows(), spec=specs)
def test_rows_are_independent(x: torch.Tensor, spec: QuantSpec) -> None:
    together = encode_rows(x, spec)
    alone = torch.cat([encode_rows(row[None], spec) for row in x])
    assert torch.equal(together, alone)
    back = decode_rows(together, x.shape[1], spec, torch.float32)
    assert torch.equal(back[1:], decode_rows(together[1:], x.shape[1], spec, torch.float32))


def test_many_rows_match_single_rows() -> None:
    """Enough rows for the codec to work in several blocks; every row still encodes on its own."""
    n = 2 * _BLOCK_VALUES["cpu"] // 70 + 5
    x = torch.randn(n, 70, generator=torch.Generator().manual_seed(4))
    spec = QuantSpec(3, 32)
    data = encode_rows(x, spec)
    for i in (0, n // 2, n - 1):
        assert torch.equal(data[i], encode_rows(x[i:i + 1], spec)[0])
    assert torch.equal(data, torch.cat([encode_rows(x[:4321], spec), encode_rows(x[4321:], spec)]))
    back = decode_rows(data, 70, spec, torch.float32)
    assert torch.equal(back[n - 1], decode_rows(data[n - 1:], 70, spec, torch.float32)[0])
    assert_round_trip_bound(x, spec)


@pytest.mark.parametrize("value", [0.0, -7.5, 3.3, 1e-30, -5.9e4, 6e4])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_constant_groups_are_finite_and_close(value: float, bits: int) -> None:
    x = torch.full((3, 100), value)
    x_hat = decode_rows(encode_rows(x, QuantSpec(bits)), 100, QuantSpec(bits), torch.float32)
    assert torch.isfinite(x_hat).all()
    assert ((x - x_hat).abs() <= 2**-10 * abs(value) + FP16_TINY).all()


def test_fp16_representable_constants_are_exact() -> None:
    x = torch.tensor([[0.5] * 64 + [-2.0] * 64])
    assert torch.equal(decode_rows(encode_rows(x, QuantSpec()), 128, QuantSpec(), torch.float32), x)


def test_out_of_fp16_range_saturates_instead_of_inf() -> None:
    x = torch.tensor([[1e6, -1e6, 7e4, 0.0]])
    x_hat = decode_rows(encode_rows(x, QuantSpec(4, 4)), 4, QuantSpec(4, 4), torch.float32)
    assert torch.isfinite(x_hat).all() and x_hat.abs().max() <= 65504 * 1.01


def test_sizes() -> None:
    spec = QuantSpec(4, 64)
    for m in (64, 4096, 64 * 1000):
        assert row_nbytes(m, spec) / m == 0.5625
    assert weight_nbytes((4096, 16384), spec, 0) / (4096 * 16384) == 0.5625
    assert weight_nbytes((4096, 16384), spec, 1) / (4096 * 16384) == 0.5625
    for bits in range(2, 9):  # b/8 bytes of codes plus two fp16 (4 bytes) per group
        assert row_nbytes(128 * 8, QuantSpec(bits, 128)) == 128 * bits + 4 * 8
    assert row_nbytes(70, spec) == 35 + 2 * 4  # 70 nibbles, two groups (64 + 6)
    assert row_nbytes(5, QuantSpec(3, 64)) == 2 + 4  # 15 bits round up to 2 bytes
    assert weight_nbytes((100, 70), spec, 0) == 70 * row_nbytes(100, spec)
    assert weight_nbytes((100, 70), spec, 1) == 100 * row_nbytes(70, spec)


def test_four_bit_layout_two_codes_per_byte_low_nibble_first() -> None:
    data = encode_rows(torch.arange(16.0)[None], QuantSpec(4, 16))[0]
    assert data[:8].tolist() == [2 * k | (2 * k + 1) << 4 for k in range(8)]
    assert data[8:10].view(torch.float16).item() == 0.0  # min
    assert data[10:12].view(torch.float16).item() == 1.0  # step (15 − 0) / 15


@pytest.mark.parametrize("bits", [2, 3, 5, 6, 7, 8])
def test_general_packing_uses_bits_per_value(bits: int) -> None:
    levels = 2**bits - 1
    codes = (torch.arange(40) * 7) % (levels + 1)  # every code reachable, min 0 and max levels
    codes[0], codes[1] = 0, levels
    spec = QuantSpec(bits, 40)
    data = encode_rows(codes.float()[None], spec)
    assert data.shape[1] == 5 * bits + 4
    bit_string = "".join(format(byte, "08b")[::-1] for byte in data[0, :5 * bits].tolist())
    assert [int(bit_string[bits * i:bits * (i + 1)][::-1], 2) for i in range(40)] == codes.tolist()


@pytest.mark.parametrize("dim", [0, 1])
def test_weight_groups_follow_dim(dim: int) -> None:
    gen = torch.Generator().manual_seed(0)
    values = torch.randint(-8, 8, (96,), generator=gen).float()  # fp16-exact constants
    # constant along `dim`: every group of a weight grouped along `dim` is constant, so exact
    w = values[None, :].expand(130, 96) if dim == 0 else values[:, None].expand(96, 130)
    w = w + 0.0
    spec = QuantSpec(2, 64)
    data = encode_weight(w, spec, dim)
    assert data.dtype == torch.uint8 and data.shape == (weight_nbytes(tuple(w.shape), spec, dim),)
    assert torch.equal(decode_weight(data, tuple(w.shape), spec, dim, torch.float32), w)
    other = decode_weight(encode_weight(w, spec, 1 - dim), tuple(w.shape), spec, 1 - dim, torch.float32)
    assert not torch.equal(other, w)  # grouped across the varying dimension, 2 bits cannot be exact


@pytest.mark.parametrize("dim", [0, 1])
def test_weight_round_trip_bound(dim: int) -> None:
    w = torch.randn(200, 72, generator=torch.Generator().manual_seed(1)) * 0.05
    spec = QuantSpec(4, 64)
    w_hat = decode_weight(encode_weight(w, spec, dim), tuple(w.shape), spec, dim, torch.float32)
    assert w_hat.shape == w.shape
    rows = w.t() if dim == 0 else w
    assert_round_trip_bound(rows.contiguous(), spec)
    expected = decode_rows(encode_rows(rows, spec), rows.shape[1], spec, torch.float32)
    assert torch.equal(w_hat, expected.t() if dim == 0 else expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtypes_and_leading_dims(dtype: torch.dtype) -> None:
    x = (torch.randn(2, 3, 100, generator=torch.Generator().manual_seed(2)) * 4).to(dtype)
    spec = QuantSpec(4, 64)
    data = encode_rows(x, spec)
    assert data.shape == (2, 3, row_nbytes(100, spec)) and data.device == x.device
    assert torch.equal(data.reshape(6, -1), encode_rows(x.float().reshape(6, 100), spec))
    out = decode_rows(data, 100, spec, dtype)
    assert out.dtype == dtype and out.shape == x.shape and out.device == x.device
    assert torch.equal(out, decode_rows(data, 100, spec, torch.float32).to(dtype))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("bits", [3, 4, 8])
def test_cuda_matches_cpu(bits: int) -> None:
    x = torch.randn(33, 1000, generator=torch.Generator().manual_seed(3))
    spec = QuantSpec(bits, 64)
    data = encode_rows(x.cuda().half(), spec)
    assert data.is_cuda and torch.equal(data.cpu(), encode_rows(x.half(), spec))
    out = decode_rows(data, 1000, spec, torch.float16)
    assert out.is_cuda and out.dtype == torch.float16
    assert torch.equal(out.cpu(), decode_rows(data.cpu(), 1000, spec, torch.float16))


@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_into_reused_buffer(dim: int, dtype: torch.dtype) -> None:
    w = torch.randn(130, 70, generator=torch.Generator().manual_seed(5))
    spec = QuantSpec(4, 64)
    data = encode_weight(w, spec, dim)
    fresh = decode_weight(data, (130, 70), spec, dim, dtype)
    buffer = torch.empty(70, 130, dtype=dtype).t() if dim == 0 else torch.empty(130, 70, dtype=dtype)
    result = decode_weight(data, (130, 70), spec, dim, dtype, out=buffer)
    assert result.data_ptr() == buffer.data_ptr() and torch.equal(buffer, fresh)
    wrong_layout = torch.empty(130, 70, dtype=dtype) if dim == 0 else torch.empty(70, 130, dtype=dtype).t()
    with pytest.raises(UserError, match="contiguous"):
        decode_weight(data, (130, 70), spec, dim, dtype, out=wrong_layout)


def test_bad_input_is_a_user_error() -> None:
    with pytest.raises(UserError, match="bits"):
        QuantSpec(bits=1)
    with pytest.raises(UserError, match="group"):
        QuantSpec(group=0)
    with pytest.raises(UserError, match="floating-point"):
        encode_rows(torch.ones(2, 3, dtype=torch.int32), QuantSpec())
    with pytest.raises(UserError, match="bytes"):
        decode_rows(torch.zeros(2, 10, dtype=torch.uint8), 64, QuantSpec(), torch.float32)
    with pytest.raises(UserError, match="2-D"):
        encode_weight(torch.ones(4), QuantSpec())
