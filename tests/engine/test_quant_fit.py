"""Issue 19: the error-minimizing fits beat min-max at the same bytes, and decode through the unchanged decoders."""

from __future__ import annotations

import pytest
import torch

from engine.bench.quant_error import grid_ceiling, heavy_tailed
from engine.config import load_folder_config
from engine.errors import UserError
from engine.memory import layout
from engine.policy import Policy
from engine.quant import int4_kernel
from engine.quant.fit import WORK_TENSORS, fitted_params
from engine.quant.groupwise import QuantSpec, decode_rows, decode_weight, encode_rows, encode_weight

HEAVY = dict(heavy_tailed((256, 512), seed=3))


def _rms(w: torch.Tensor, spec: QuantSpec, dim: int) -> float:
    w_hat = decode_weight(encode_weight(w, spec, dim), tuple(w.shape), spec, dim, torch.float32)
    return (w_hat - w).pow(2).mean().sqrt().item()


@pytest.mark.parametrize("fit", ["mse", "weighted"])
@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("name", sorted(HEAVY))
def test_fits_beat_minmax_on_heavy_tailed_tensors(name, dim, bits, fit):
    w = HEAVY[name]
    fitted, minmax = _rms(w, QuantSpec(bits, 64, fit), dim), _rms(w, QuantSpec(bits, 64), dim)
    assert fitted < 0.95 * minmax, (fitted, minmax)


def _group_errors(groups: torch.Tensor, fit: str) -> torch.Tensor:
    spec = QuantSpec(4, 64, fit)
    return decode_rows(encode_rows(groups, spec), 64, spec, torch.float32) - groups


@pytest.mark.parametrize("fit", ["mse", "weighted"])
def test_no_group_is_worse_than_minmax(fit):
    """A fit keeps min-max's grid wherever it would not lower a group's error (weighted by the fit's own
    weights: rms(group) + |x|), as decoding measures it."""
    groups = HEAVY["student-t3"][:64].reshape(-1, 64)
    weight = 1.0 if fit == "mse" else groups.pow(2).mean(-1, keepdim=True).sqrt() + groups.abs()
    errors = {f: (weight * _group_errors(groups, f).pow(2)).sum(-1) for f in ("minmax", fit)}
    assert (errors[fit] <= errors["minmax"] * (1 + 1e-6)).all()
    assert (errors[fit] < errors["minmax"]).float().mean() > 0.5  # and it lowers most of them


def test_weighted_fit_keeps_the_extremes_that_mse_clips():
    """What makes `weighted` the default: on heavy-tailed groups it clips each group's largest weight half as
    much as mse does (min-max keeps it on the grid's end), while its RMS error is still well below min-max's
    (test_fits_beat_minmax_on_heavy_tailed_tensors)."""
    groups = HEAVY["student-t3"].reshape(-1, 64)
    extreme = groups.abs().argmax(-1, keepdim=True)
    at_extreme = {f: _group_errors(groups, f).gather(-1, extreme).abs().mean().item()
                  for f in ("minmax", "mse", "weighted")}
    assert at_extreme["minmax"] < at_extreme["weighted"] < 0.6 * at_extreme["mse"], at_extreme


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
    for fit in ("mse", "weighted"):
        mn, step = fitted_params(x.view(4, 1, 64), 15, fit, tuple(torch.empty(4, 1, 64) for _ in range(WORK_TENSORS)))
        assert torch.isfinite(mn.float()).all() and torch.isfinite(step.float()).all()
    err = {}
    for fit in ("minmax", "mse", "weighted"):
        spec = QuantSpec(4, 64, fit)
        x_hat = decode_rows(encode_rows(x, spec), 64, spec, torch.float32)
        assert torch.isfinite(x_hat).all()
        err[fit] = (x_hat - x.clamp(-65504, 65504)).pow(2).sum(-1)
    for fit in ("mse", "weighted"):
        assert err[fit][0] == 0 and err[fit][3] == 0 and (err[fit][:2] <= err["minmax"][:2]).all()


def test_unknown_fit_is_a_user_error():
    with pytest.raises(UserError, match="fit must be one of minmax, mse"):
        QuantSpec(4, 64, "gptq")


@pytest.mark.parametrize("name", ["opt", "llama"])
def test_the_lm_head_keeps_minmax_under_a_fit(tiny_models, name):
    """Every other 2-D weight takes the policy's fit; the LM head (tied or not) keeps min-max's extremes."""
    cfg = load_folder_config(tiny_models[name])
    policy = Policy(compress_weight=True, comp_weight_fit="weighted")
    lay = layout(cfg, policy, torch.device("cpu"), torch.float32, torch.float32)
    fits = {(spec.kind, weight): codec.quant.fit for spec, placed in zip(lay.specs, lay.placed, strict=True)
            for weight, (_, codec) in placed.items() if codec.quant is not None}
    assert fits.pop(("head", "lm_head")) == "minmax"
    assert fits and set(fits.values()) == {"weighted"}, fits


def test_the_fits_come_within_a_few_percent_of_the_grid_ceiling():
    """The exhaustive search bounds what any (min, step) reaches: it is never worse than min-max (whose grid
    it contains), and the fits' RMS error lies within 3% of it: better fits of this format are not left."""
    groups = HEAVY["student-t3"].to(torch.float16).float().reshape(-1, 64)[:48]
    ceiling = grid_ceiling(groups, 4)
    errors = {fit: _group_errors(groups, fit).pow(2).sum().item() for fit in ("minmax", "mse")}
    assert ceiling <= errors["minmax"]
    assert (errors["mse"] / ceiling) ** 0.5 < 1.03, (errors, ceiling)
