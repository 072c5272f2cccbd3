"""Quantize and dequantize throughput of the group-wise codec on weight-sized tensors.

Throughput is GB/s of fp32 values (4 bytes per element) in either direction: quantize reads an fp32
weight, dequantize writes one. The peer in the same run is a plain copy of the same fp32 tensor, into
a fresh tensor (clone) and into a reused buffer (copy_), so the ratios show what the codec costs
beyond moving the bytes. Dequantize is timed both into a fresh tensor and into a reused buffer (`out=`),
because on a CPU the page faults of a fresh allocation can cost as much as the decoding itself.

    python -m engine.bench.codec                       # 2048x8192, 4/64 3/64 2/64 8/64, both dims
    python -m engine.bench.codec --specs 4/64,4/128 --shape 4096x4096 --threads 2
    python -m engine.bench.codec --specs 4/64,4/64/weighted   # the fitted grid's encode cost (load time)
    python -m engine.bench.codec --fused 1,8,32,48,64,256 --threads 2   # 4-bit products by rows

`--fused` times a 4-bit/64 product x @ W.T (W grouped along the input dimension) by rows of x, three
ways: torch's fused int4 kernel on the packed bytes (engine.quant.int4_kernel), decoding W into a buffer
then an fp32 F.linear (what the engine does otherwise), and, as the peer, the F.linear alone on an
fp32 W already in memory. It sets engine.quant.int4_kernel.FUSED_MAX_ROWS.
"""

from __future__ import annotations

import functools
import os

import torch
from tqdm import tqdm

from engine.errors import UserError, cli_main
from engine.flags import ArgumentParser
from engine.markdown import markdown_table
from engine.planner.measure import median_seconds
from engine.quant import int4_kernel
from engine.quant.groupwise import QuantSpec, decode_weight, encode_weight, weight_nbytes


def parse_shape(text: str) -> tuple[int, int]:
    try:
        rows, cols = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UserError(f"--shape must look like 2048x8192, got {text!r}") from None
    if rows < 1 or cols < 1:
        raise UserError(f"--shape needs positive sizes, got {text!r}")
    return rows, cols


def parse_specs(text: str) -> list[QuantSpec]:
    specs = []
    for item in text.split(","):
        bits, group, *fit = item.split("/")
        try:
            specs.append(QuantSpec(int(bits), int(group), *fit[:1]))
        except ValueError:
            raise UserError(f"--specs takes bits/group[/fit] such as 4/64,3/64,4/64/mse, got {item!r}") from None
        if len(fit) > 1:
            raise UserError(f"--specs takes bits/group[/fit] such as 4/64,3/64,4/64/mse, got {item!r}")
    return specs


def parse_devices(text: str) -> list[torch.device]:
    devices = []
    for name in text.split(","):
        if name == "cuda" and not torch.cuda.is_available():
            raise UserError("--devices asks for cuda, but no CUDA device is available; use --devices cpu")
        if name not in ("cpu", "cuda"):
            raise UserError(f"--devices takes cpu and/or cuda, got {name!r}")
        devices.append(torch.device(name))
    return devices


def bench_device(device: torch.device, shape: tuple[int, int], specs: list[QuantSpec], warmup: int,
                 repeats: int) -> list[list[str]]:
    """Table rows for one device: the copy peers, then every spec and grouping dimension."""
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)
    gb = w.numel() * 4 / 1e9
    buffer = torch.empty_like(w)
    clone_s = median_seconds(w.clone, device, warmup, repeats)
    copy_s = median_seconds(lambda: buffer.copy_(w), device, warmup, repeats)
    rows = [[device.type, "fp32 copy (peer)", "—", "4.0000", f"{gb / clone_s:.2f}", f"{gb / clone_s:.2f}",
             f"{gb / copy_s:.2f}", "1.00", "1.00", "—"]]
    cases = [(spec, dim) for spec in specs for dim in (0, 1)]
    for spec, dim in tqdm(cases, desc=f"codec on {device.type}", leave=False):
        data = encode_weight(w, spec, dim)
        out = torch.empty(shape[::-1], device=device).t() if dim == 0 else torch.empty(shape, device=device)
        enc_s = median_seconds(functools.partial(encode_weight, w, spec, dim), device, warmup, repeats)
        decode = functools.partial(decode_weight, data, shape, spec, dim, torch.float32)
        dec_s = median_seconds(decode, device, warmup, repeats)
        reuse_s = median_seconds(functools.partial(decode, out=out), device, warmup, repeats)
        w_hat = decode_weight(data, shape, spec, dim, torch.float32)
        rel_rms = ((w_hat - w).pow(2).mean() / w.pow(2).mean()).sqrt().item()
        rows.append([device.type, f"{spec.bits}-bit, group {spec.group}, {spec.fit}", str(dim),
                     f"{weight_nbytes(shape, spec, dim) / w.numel():.4f}", f"{gb / enc_s:.2f}",
                     f"{gb / dec_s:.2f}", f"{gb / reuse_s:.2f}", f"{clone_s / enc_s:.2f}",
                     f"{copy_s / reuse_s:.2f}", f"{rel_rms:.4f}"])
    return rows


def bench_fused(shape: tuple[int, int], rows: list[int], warmup: int, repeats: int) -> list[list[str]]:
    """Table rows: per row count, ms of the fused kernel, of decode + fp32 F.linear, and of F.linear alone."""
    spec, cpu = QuantSpec(4, 64), torch.device("cpu")
    if not int4_kernel.supported(shape, spec, 1, cpu):
        raise UserError(f"torch's fused int4 kernel cannot take a {shape[0]}x{shape[1]} weight at 4 bits, group 64, "
                        "here; --fused needs a CPU whose int4 packing engine.quant.int4_kernel models, "
                        "and sizes that fit")
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    packed = int4_kernel.to_kernel(encode_weight(w, spec, 1).view(shape[0], -1), shape, spec)
    w_hat, buffer = int4_kernel.decode(packed, shape, spec, torch.float32), torch.empty(shape)

    def decode_then_linear(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, int4_kernel.decode(packed, shape, spec, torch.float32, buffer))

    fused, out = int4_kernel.PackedLinear(packed, shape, spec, buffer), []
    for n in tqdm(rows, desc="fused int4", leave=False):
        x = torch.randn(n, shape[1])
        fused_s, decode_s, gemm_s = (
            median_seconds(functools.partial(fn, x), cpu, warmup, repeats)
            for fn in (fused.fused_product, decode_then_linear, functools.partial(torch.nn.functional.linear,
                                                                                  weight=w_hat)))
        out.append([str(n), f"{fused_s * 1e3:.1f}", f"{decode_s * 1e3:.1f}", f"{gemm_s * 1e3:.1f}",
                    f"{decode_s / fused_s:.2f}", f"{gemm_s / fused_s:.2f}",
                    "fused" if n <= int4_kernel.FUSED_MAX_ROWS else "decode + F.linear"])
    return out


@cli_main
def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m engine.bench.codec", description=__doc__)
    parser.add_argument("--shape", default="2048x8192", help="weight shape, out x in (default %(default)s)")
    parser.add_argument("--specs", default="4/64,3/64,2/64,8/64", help="bits/group pairs (default %(default)s)")
    parser.add_argument("--devices", help="cpu and/or cuda, comma-separated (default: cpu, and cuda if any)")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: all cores)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--fused", metavar="ROWS",
                        help="instead of the codec table: 4-bit products by rows of x, e.g. 1,8,32,64")
    args = parser.parse_args(argv)
    shape, specs = parse_shape(args.shape), parse_specs(args.specs)
    devices = parse_devices(args.devices or ("cpu,cuda" if torch.cuda.is_available() else "cpu"))
    if (args.threads is not None and args.threads < 1) or args.repeats < 1 or args.warmup < 0:
        raise UserError("--threads and --repeats must be positive and --warmup non-negative")
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    print(f"weight {shape[0]}x{shape[1]} fp32 ({shape[0] * shape[1] * 4 / 1e9:.3f} GB); torch "
          f"{torch.__version__}, {torch.get_num_threads()} CPU threads; median of {args.repeats} after "
          f"{args.warmup} warmup; GB/s counts fp32 bytes (4 per element) read or written")
    if args.fused:
        try:
            rows = [int(v) for v in args.fused.split(",")]
        except ValueError:
            raise UserError(f"--fused takes row counts such as 1,8,32,64, got {args.fused!r}") from None
        header = ["rows of x", "fused int4 ms", "decode + F.linear ms", "F.linear alone (peer) ms",
                  "fused speed-up vs decode + F.linear", "vs F.linear alone", "engine uses"]
        print(markdown_table(header, bench_fused(shape, rows, args.warmup, args.repeats)))
        return
    for device in devices:
        if device.type == "cuda":
            print(f"cuda: {torch.cuda.get_device_name(device)}")
    header = ["device", "codec", "dim", "bytes/elem", "quantize GB/s", "dequantize GB/s",
              "dequantize into buffer GB/s", "quantize ÷ clone", "dequantize-into ÷ copy_", "rel. RMS error"]
    body = [row for dev in devices for row in bench_device(dev, shape, specs, args.warmup, args.repeats)]
    print(markdown_table(header, body))
    print("dim 0 groups along the output dimension (FlexGen's default), dim 1 along the input dimension; "
          "the peer row is an fp32 clone (fresh tensor) and copy_ (reused buffer); ratios are time of the "
          "copy over time of the codec, so 0.5 means half the copy's speed.")


if __name__ == "__main__":
    main()
