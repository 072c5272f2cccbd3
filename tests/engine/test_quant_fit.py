"""Issue 19: the error-minimizing fit beats min-max at the same bytes, and decodes through the unchanged decoders."""

from __future__ import annotations

import pytest
import torch

from engine.bench.quant_error import heavy_tailed
from engine.errors import UserError
from engine.quant import int4_kernel
from engine.quant.fit import mse_params
from engine.quant.groupwise import QuantSpec, decode_rows, decode_weight, encode_rows, encode_weight

HEAVY = dict(heavy_tailed((256, 512), seed=3))


def _rms(w: torch.Tensor, spec: QuantSpec, dim: int) -> float:
    w_hat = decode_weight(encode_weight(w, spec, dim), tuple(w.shape), spec, dim, torch.float32)
    return (w_hat - w).pow(2).mean().sqrt().item()


@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("name", sorted(HEAVY))
def test_mse_fit_beats_minmax_on_heavy_tailed_tensors(name, dim, bits):
    w = HEAVY[name]
    mse, minmax = _rms(w, QuantSpec(bits, 64, "mse"), dim), _rms(w, QuantSpec(bits, 64), dim)
    assert mse < 0.95 * minmax, (mse, minmax)


def test_no_group_is_worse_than_minmax():
    """The fit keeps min-max's grid wherever it would not lower a group's error, as decoding measures it."""
    x = HEAVY["student-t3"][:64]
    groups = x.reshape(-1, 64)
    errors = {}
    for fit in ("minmax", "mse"):
        spec = QuantSpec(4, 64, fit)
        errors[fit] = (decode_rows(encode_rows(groups, spec), 64, spec, torch.float32) - groups).pow(2).sum(-1)
    assert (errors["mse"] <= errors["minmax"]).all()
    assert (errors["mse"] < errors["minmax"]).float().mean() > 0.5  # and it lowers most of them


def test_decoded_values_lie_on_each_groups_stored_grid():
    x = HEAVY["outlier-channels"][:8].reshape(-1, 64)
    spec = QuantSpec(3, 64, "mse")
    data = encode_rows(x, spec)
    fields = data[:, 24:].contiguous().view(torch.float16).float()  # 64 three-bit codes: 24 bytes
    mn, step = fields[:, :1], fields[:, 1:]
    codes = (decode_rows(data, 64, spec, torch.float32) - mn) / step
    assert torch.allclose(codes, codes.round(), atol=1e-3) and codes.min() > -1e-3 and codes.max() < 7 + 1e-3


def test_fused_int4_kernel_decodes_mse_weights_exactly_like_the_row_decoder():
    if int4_kernel.kernel_layout() is None:
        pytest.skip("torch's int4 packing on this CPU is not the modelled one")
    spec, shape = QuantSpec(4, 64, "mse"), (2 * int4_kernel.kernel_layout(), 256)
    w = HEAVY["student-t3"][:shape[0], :shape[1]].contiguous()
    rows = encode_weight(w, spec, 1)
    decoded = decode_weight(rows, shape, spec, 1, torch.float32)
    packed = int4_kernel.to_kernel(rows.view(shape[0], -1), shape, spec)
    assert torch.equal(int4_kernel.decode(packed, shape, spec, torch.float32), decoded)
    x = torch.randn(3, shape[1])
    out = int4_kernel.PackedLinear(packed, shape, spec, torch.empty(shape)).fused_product(x).float()
    torch.testing.assert_close(out, x @ decoded.T, rtol=2e-2, atol=2e-2 * decoded.abs().max().item())


def test_degenerate_groups_stay_finite_and_never_worse():
    """Constant groups, fp16-subnormal spreads and values past the fp16 range: never nan, never worse."""
    x = torch.stack([torch.full((64,), 3.0), torch.linspace(0, 1e-6, 64), torch.linspace(-1e6, 1e6, 64),
                     torch.zeros(64)])
    mn, step = mse_params(x.view(4, 1, 64), 15, (torch.empty(4, 1, 64), torch.empty(4, 1, 64)))
    assert torch.isfinite(mn.float()).all() and torch.isfinite(step.float()).all()
    err = {}
    for fit in ("minmax", "mse"):
        spec = QuantSpec(4, 64, fit)
        x_hat = decode_rows(encode_rows(x, spec), 64, spec, torch.float32)
        assert torch.isfinite(x_hat).all()
        err[fit] = (x_hat - x.clamp(-65504, 65504)).pow(2).sum(-1)
    assert err["mse"][0] == 0 and err["mse"][3] == 0 and (err["mse"] <= err["minmax"]).all()


def test_unknown_fit_is_a_user_error():
    with pytest.raises(UserError, match="fit must be one of minmax, mse"):
        QuantSpec(4, 64, "gptq")
