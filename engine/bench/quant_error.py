"""`python -m engine.bench.quant_error`: reconstruction error at equal bytes against FlexGen 0.1.8's quantizer.

Every quantizer here stores, per group of `group` values, b-bit codes and an fp16 minimum and step (FlexGen
stores the step's inverse), so all spend the same bytes; only the choice of each group's grid differs. The
peer is FlexGen's own `flexgen.compression.compress`/`decompress` (group-wise min-max, computed in fp16 as
its engine stores weights), loaded from its wheel (engine.bench.flexgen_peer). All three quantize the same
fp16-rounded values. Tensors: heavy-tailed random ones (Student's t, 3 degrees of freedom, and a Gaussian
with a few outlier input channels, as LLM activations and weights have), and SmolLM2-135M's weights.
The error is the relative RMS error sqrt(Σ(x̂ − x)² / Σx²), pooled over a set's tensors.

`--ceiling N` adds the best any grid of this format can do on each set's first N groups: an exhaustive
search over each group's (range covered, offset), which bounds what a better fit could still gain.

    python -m engine.bench.quant_error                      # 4 and 3 bits, groups of 64, both dims
    python -m engine.bench.quant_error --layers all --bits 4
    python -m engine.bench.quant_error --bits 4 --ceiling 400
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch
from tqdm import tqdm

from engine.bench.flexgen_peer import load_flexgen
from engine.errors import UserError, cli_main
from engine.flags import ArgumentParser
from engine.markdown import markdown_table
from engine.models.registry import adapter_for
from engine.quant.groupwise import QuantSpec, decode_weight, encode_weight
from engine.weights import resolve, stream_folder

_OURS = ("minmax", "mse", "weighted")


def heavy_tailed(shape: tuple[int, int], seed: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """Student's t (ν = 3) values, and Gaussian ones whose 1% outlier input channels are 20× larger."""
    gen = torch.Generator().manual_seed(seed)
    normal = torch.randn((4, *shape), generator=gen)
    yield "student-t3", normal[0] / normal[1:].pow(2).mean(0).sqrt()  # z / sqrt(χ²₃ / 3)
    outliers = torch.randperm(shape[1], generator=gen)[:max(1, shape[1] // 100)]
    channels = torch.randn(shape, generator=gen)
    channels[:, outliers] *= 20
    yield "outlier-channels", channels


def model_weights(model: str, layers: str) -> Iterator[tuple[str, torch.Tensor]]:
    """The 2-D weights of a checkpoint's chosen layers ('all', or comma-separated indices)."""
    cfg, folder = resolve(model, None)
    if folder is None:
        raise UserError(f"{model} has no real weights here; pass a checkpoint folder or smollm2-135m")
    specs = adapter_for(cfg).layer_specs(cfg)
    try:
        wanted = set(range(len(specs))) if layers == "all" else {int(i) for i in layers.split(",")}
    except ValueError:
        raise UserError(f"--layers takes 'all' or layer positions such as 1,15,30, got {layers!r}") from None
    found: list[tuple[str, torch.Tensor]] = []
    stream_folder(folder, specs, lambda pos, name, t: found.append((f"{specs[pos].name}.{name}", t))
                  if pos in wanted and t.dim() == 2 else None)
    yield from found


def flexgen_reconstruct(x: torch.Tensor, bits: int, group: int, dim: int) -> torch.Tensor:
    """FlexGen's group-wise min-max round trip of an fp16 tensor, grouped along `dim`."""
    load_flexgen()
    from flexgen.compression import CompressionConfig, compress_and_decompress

    config = CompressionConfig(num_bits=bits, group_size=group, group_dim=dim, symmetric=False)
    return compress_and_decompress(x, config).float()


def squared_errors(w: torch.Tensor, bits: int, group: int, dim: int) -> dict[str, float]:
    """Σ(x̂ − x)² of FlexGen and of each of our fits, and Σx², for one weight."""
    x16 = w.to(torch.float16)
    x = x16.float()
    out = {"flexgen": (flexgen_reconstruct(x16, bits, group, dim) - x).pow(2).sum().item(),
           "norm": x.pow(2).sum().item()}
    for fit in _OURS:
        spec = QuantSpec(bits, group, fit)
        x_hat = decode_weight(encode_weight(x, spec, dim), tuple(x.shape), spec, dim, torch.float32)
        out[fit] = (x_hat - x).pow(2).sum().item()
    return out


def compare(sets: dict[str, list[tuple[str, torch.Tensor]]], bits: list[int], group: int) -> list[list[str]]:
    """Table rows: per tensor set, dim and bit width, the pooled relative RMS error of each quantizer."""
    rows = []
    cases = [(name, dim, b) for name in sets for dim in (0, 1) for b in bits]
    for name, dim, b in tqdm(cases, desc="quantizers", leave=False, disable=None):
        total = {"flexgen": 0.0, "norm": 0.0, **dict.fromkeys(_OURS, 0.0)}
        for _, w in sets[name]:
            for k, v in squared_errors(w, b, group, dim).items():
                total[k] += v
        rel = {k: (total[k] / total["norm"]) ** 0.5 for k in ("flexgen", *_OURS)}
        rows.append([name, str(dim), str(b), f"{rel['flexgen']:.5f}", *(f"{rel[f]:.5f}" for f in _OURS),
                     *(f"{rel[f] / rel['flexgen']:.3f}" for f in _OURS)])
    return rows


def grid_ceiling(groups: torch.Tensor, bits: int) -> float:
    """Σ over groups (n, g) of each one's least squared error on a fine grid of (range covered, offset), with
    nearest codes: what any (min, step) of this format reaches, to the grid's resolution (fp32 parameters,
    so if anything optimistic against fp16 ones)."""
    levels = (1 << bits) - 1
    lo, hi = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    span = hi - lo
    best = torch.full((groups.shape[0],), torch.inf)
    for cover in torch.linspace(0.35, 1.05, 141):
        step = (span * cover / levels).clamp_min(1e-30)
        for offset in torch.linspace(-0.2, 1.0, 121):
            mn = lo + offset * (span - levels * step)
            codes = ((groups - mn) / step).round_().clamp_(0, levels)
            best = torch.minimum(best, (codes * step + mn - groups).pow(2).sum(-1))
    return best.sum().item()


def ceiling_rows(sets: dict[str, list[tuple[str, torch.Tensor]]], bits: list[int], group: int,
                 count: int) -> list[list[str]]:
    """Per set, dim and bit width: each fit's and the grid ceiling's RMS error ÷ min-max's on the first
    `count` groups (min-max equals FlexGen's to within fp16 rounding, see the main table)."""
    rows = []
    cases = [(name, dim, b) for name in sets for dim in (0, 1) for b in bits]
    for name, dim, b in tqdm(cases, desc="grid ceiling", leave=False, disable=None):
        w = sets[name][0][1].to(torch.float16).float()
        groups = (w.T if dim == 0 else w).contiguous().reshape(-1, group)[:count]
        error = {}
        for fit in _OURS:
            spec = QuantSpec(b, group, fit)
            error[fit] = (decode_weight(encode_weight(groups, spec, 1), tuple(groups.shape), spec, 1,
                                        torch.float32) - groups).pow(2).sum().item()
        error["ceiling"] = grid_ceiling(groups, b)
        rows.append([name, str(dim), str(b), str(groups.shape[0]),
                     *(f"{(error[k] / error['minmax']) ** 0.5:.3f}" for k in (*_OURS[1:], "ceiling"))])
    return rows


@cli_main
def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(prog="python -m engine.bench.quant_error", description=__doc__)
    p.add_argument("--bits", default="4,3", help="bit widths, comma-separated (default %(default)s)")
    p.add_argument("--group", type=int, default=64, help="group size (default %(default)s)")
    p.add_argument("--model", default="smollm2-135m", help="checkpoint whose weights are measured")
    p.add_argument("--layers", default="0,15,30", help="its layer positions, or 'all' (default %(default)s: "
                   "the embedding, a middle block, the last block)")
    p.add_argument("--random-shape", default="1024x1024", help="shape of the random tensors (default %(default)s)")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's)")
    p.add_argument("--ceiling", type=int, metavar="N", help="also the grid ceiling on each set's first N groups")
    args = p.parse_args(argv)
    try:
        bits = [int(b) for b in args.bits.split(",")]
        shape = tuple(int(v) for v in args.random_shape.lower().split("x"))
    except ValueError:
        raise UserError("--bits takes integers such as 4,3 and --random-shape a shape such as 1024x1024") from None
    if len(shape) != 2 or min(shape) < 1 or any(not 2 <= b <= 8 for b in bits):
        raise UserError("--random-shape needs two positive sizes and --bits values from 2 to 8")
    if args.threads:
        torch.set_num_threads(args.threads)
    sets = {name: [(name, t)] for name, t in heavy_tailed(shape)}
    weights = list(model_weights(args.model, args.layers))
    # the decoder blocks' weights apart from the vocabulary tables, whose larger norm would dominate a pooled error
    for part, keep in (("decoder layers", True), ("vocabulary tables", False)):
        chosen = [(n, t) for n, t in weights if n.startswith("layer") == keep]
        if chosen:
            sets[f"{args.model} {part}"] = chosen
    print(f"groups of {args.group}; {sum(t.numel() for _, t in weights) / 1e6:.1f}M weights of "
          f"{args.model} (layers {args.layers}); random tensors {shape[0]}x{shape[1]}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} cores")
    header = ["tensors", "dim", "bits", "FlexGen 0.1.8 rel. RMS", *(f"ours {f}" for f in _OURS),
              *(f"{f} ÷ FlexGen" for f in _OURS)]
    print(markdown_table(header, compare(sets, bits, args.group)))
    print("dim 0 groups along the output dimension (FlexGen's weight default), dim 1 along the input dimension; "
          "equal bytes: b-bit codes plus two fp16 numbers per group for every quantizer.")
    if args.ceiling:
        print(f"\nRMS error ÷ min-max's on each set's first {args.ceiling} groups (its first tensor), and the grid "
              "ceiling: the least error any (min, step) reaches on each group\n")
        print(markdown_table(["tensors", "dim", "bits", "groups", *(f"{f} ÷ min-max" for f in _OURS[1:]),
                              "grid ceiling ÷ min-max"], ceiling_rows(sets, bits, args.group, args.ceiling)))


if __name__ == "__main__":
    main()
