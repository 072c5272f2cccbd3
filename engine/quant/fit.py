"""Each group's fp16 (minimum, step): FlexGen's min-max, or a (weighted) squared-error minimizing fit.

Min-max spends the grid's 2^b levels on the full range of a group, so one outlier stretches the step for
every other value. The fits instead minimize Σ wᵢ (qᵢ·Δ + min − xᵢ)² over the group, the way llama.cpp's
k-quants (make_qkx2_quants) do: for candidate steps around the min-max one it rounds the group to codes q,
solves the 2×2 weighted least-squares problem for (min, Δ) given those codes, and keeps the best; then it
alternates rounding and refitting (each round can only lower the error). The result is rounded to fp16
and compared, exactly as decoding will see it, with min-max's: a group never ends up worse than min-max.

- `mse`: wᵢ = 1, the least squared error. It gets there by clipping groups' extremes, and a model's few
  outlier weights are what some of its answers need (issue 19: SmolLM2 then answered "\n" to few-shot MMLU).
- `weighted`: wᵢ = rms(group) + |xᵢ|, llama.cpp's weighting without an importance matrix: an error on a
  large weight costs more, so the extremes stay close while the bulk of the group gets the finer grid.

The byte format is the same either way, so only encoding changes.
All work is whole-tensor torch ops over a block of groups (n, G, g); per-group scalars are (n, G).
"""

from __future__ import annotations

import torch

FP16_MAX = 65504.0
FITS = ("minmax", "mse", "weighted")
# Candidate steps range / (levels + c), c from -0.5 (wider than the extremes) to 1.5 (clipping them) by 0.1,
# as llama.cpp's search; then refits from the best.
_CANDIDATES = tuple(round(-0.5 + 0.1 * i, 1) for i in range(21))
_REFITS = 3
WORK_TENSORS = 4  # fp32 scratch tensors shaped like a block of groups that fitted_params needs


def fit_signature(fit: str) -> str:
    """The fit with the constants that decide its result, for keys of cached encodings: changing them misses."""
    return fit if fit == "minmax" else f"{fit}{_CANDIDATES}x{_REFITS}"


def minmax_params(lo: torch.Tensor, hi: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 (min, step) per group from its fp32 extremes, rounded so that they cover the group."""
    lo, hi = lo.clamp(-FP16_MAX, FP16_MAX), hi.clamp(-FP16_MAX, FP16_MAX)
    mn = lo.to(torch.float16)
    down = torch.nextafter(mn, torch.full_like(mn, -torch.inf))
    mn = torch.where(mn.float() > lo, down, mn)
    step = ((hi - mn.float()) / levels).to(torch.float16)  # at most 131008 / 3: no overflow
    up = torch.nextafter(step, torch.full_like(step, torch.inf))  # also lifts a step that underflowed to 0
    step = torch.where(mn.float() + levels * step.float() < hi, up, step)
    return mn, step


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ a·b over the last dimension of (n, G, g) tensors, as (n, G): a batched matmul, the fastest on a CPU."""
    n, groups, g = a.shape
    return torch.bmm(a.view(-1, 1, g), b.view(-1, g, 1)).view(n, groups)


def _codes(x: torch.Tensor, mn: torch.Tensor, inv: torch.Tensor, levels: int, out: torch.Tensor) -> torch.Tensor:
    """Nearest codes clamp(round((x − min)·inv), 0, levels) into `out`, the encoder's own arithmetic."""
    return torch.sub(x, mn.unsqueeze(-1), out=out).mul_(inv.unsqueeze(-1)).round_().clamp_(0, levels)


def _importance(x: torch.Tensor, fit: str, out: torch.Tensor) -> torch.Tensor:
    """Each value's weight in the fit's error, into `out`: 1 (mse), or rms(group) + |x| (weighted)."""
    if fit == "mse":
        return out.fill_(1.0)
    return torch.abs(x, out=out).add_(x.pow(2).mean(-1, keepdim=True).sqrt_())


def squared_error(x: torch.Tensor, mn: torch.Tensor, step: torch.Tensor, levels: int, weight: torch.Tensor,
                  work: torch.Tensor) -> torch.Tensor:
    """Σ w·(decoded − x)² per group for fp16 (min, step), as encoding and then decoding would give it."""
    mn, step = mn.float(), step.float()
    q = _codes(x, mn, torch.where(step > 0, 1.0 / step, 0.0), levels, work)
    q.mul_(step.unsqueeze(-1)).add_(mn.unsqueeze(-1)).sub_(x)
    return _dot(q * weight, q)


def fitted_params(x: torch.Tensor, levels: int, fit: str,
                  work: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 (min, step) per group of x (n, G, g) minimizing the fit's weighted squared reconstruction error.

    `work` is WORK_TENSORS fp32 scratch tensors shaped like x. Weighted least squares for codes q, with x
    centred on the group's weighted mean m (so Σw·x = 0) and sums Sw, Swq, Swqq, Swqx:
    Δ = Sw·Swqx / (Sw·Swqq − Swq²), min = m − Δ·Swq/Sw, and the error is Swxx − Δ·Swqx.
    """
    weight, centred, q, wq = work
    _importance(x, fit, weight)
    lo, hi = x.amin(-1), x.amax(-1)
    sw = weight.sum(-1)
    mean = _dot(weight, x) / sw
    torch.sub(x, mean.unsqueeze(-1), out=centred)
    sxx, span = _dot(weight * centred, centred), (hi - lo).clamp_min(1e-30)
    best_err = torch.full_like(lo, torch.inf)
    best_mn, best_step = lo.clone(), span / levels

    def refit(mn: torch.Tensor, inv: torch.Tensor) -> None:
        codes = _codes(x, mn, inv, levels, q)
        torch.mul(codes, weight, out=wq)
        swq, swqq, swqx = wq.sum(-1), _dot(wq, codes), _dot(wq, centred)
        det = sw * swqq - swq * swq
        step = sw * swqx / det.clamp_min(1e-30)
        err = sxx - step * swqx
        better = (det > 0) & (step > 0) & (err < best_err)
        best_err.copy_(torch.where(better, err, best_err))
        best_step.copy_(torch.where(better, step, best_step))
        best_mn.copy_(torch.where(better, mean - step * swq / sw, best_mn))

    for c in _CANDIDATES:
        refit(lo, (levels + c) / span)
    for _ in range(_REFITS):
        refit(best_mn, 1.0 / best_step)
    fit_mn, fit_step = best_mn.to(torch.float16), best_step.to(torch.float16)
    mm_mn, mm_step = minmax_params(lo, hi, levels)
    fit_err = squared_error(x, fit_mn, fit_step, levels, weight, q)
    use_fit = (fit_err < squared_error(x, mm_mn, mm_step, levels, weight, q)) & (fit_step > 0)  # nan/inf: min-max
    return torch.where(use_fit, fit_mn, mm_mn), torch.where(use_fit, fit_step, mm_step)
