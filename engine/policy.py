"""The placement and scheduling policy, its validation, and the shared CLI option group.

One `Policy` describes everything that changes *how* the engine runs a model (never *what* it
computes): where weights, KV cache and activations live, how rows are batched, and whether
tensors are compressed. Every field has a default, so `Policy()` runs everything on the compute
device.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from dataclasses import dataclass, field

from engine.errors import UserError

TIERS = ("gpu", "cpu", "disk")

_DTYPES = {"fp32": "float32", "float32": "float32", "fp16": "float16", "float16": "float16",
           "bf16": "bfloat16", "bfloat16": "bfloat16"}


@dataclass
class Policy:
    """Where tensors live and how rows are batched. Percentages are 0..100; disk takes the rest."""

    gpu_batch_size: int = 8
    num_gpu_batches: int = 1
    w_gpu_percent: float = 100.0
    w_cpu_percent: float = 0.0
    cache_gpu_percent: float = 100.0
    cache_cpu_percent: float = 0.0
    act_gpu_percent: float = 100.0
    act_cpu_percent: float = 0.0
    overlap: bool = True
    cpu_cache_compute: bool = False
    pin_weight: bool = True
    compress_weight: bool = False
    compress_cache: bool = False
    comp_weight_bits: int = 4
    comp_weight_group: int = 64
    comp_weight_dim: int = 0
    # On a CPU, 4-bit weights grouped along dim 1 run small products (decode steps) in torch's fused int4
    # kernel with bf16 activations (engine.int4_matmul); False keeps every product in compute_dtype.
    fused_int4: bool = True
    comp_cache_bits: int = 4
    comp_cache_group: int = 64
    compute_dtype: str | None = None  # None: fp32 on CPU, fp16 on a GPU
    storage_dtype: str | None = None  # None: same rule as compute_dtype
    direct_io: bool = False
    threads: int | None = None
    extra: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.validate()

    # -- derived views -------------------------------------------------------------------------
    @property
    def block_size(self) -> int:
        return self.gpu_batch_size * self.num_gpu_batches

    def split(self, kind: str) -> dict[str, float]:
        """Fractions per tier for 'weight', 'cache' or 'act'."""
        prefix = {"weight": "w", "cache": "cache", "act": "act"}[kind]
        g = getattr(self, f"{prefix}_gpu_percent") / 100
        c = getattr(self, f"{prefix}_cpu_percent") / 100
        return {"gpu": g, "cpu": c, "disk": max(0.0, 1.0 - g - c)}

    @property
    def percent(self) -> tuple[float, ...]:
        return (self.w_gpu_percent, self.w_cpu_percent, self.cache_gpu_percent,
                self.cache_cpu_percent, self.act_gpu_percent, self.act_cpu_percent)

    def with_percent(self, *values: float) -> Policy:
        names = ("w_gpu_percent", "w_cpu_percent", "cache_gpu_percent", "cache_cpu_percent",
                 "act_gpu_percent", "act_cpu_percent")
        return dataclasses.replace(self, **dict(zip(names, values, strict=True)))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("extra")
        return d

    def compression_label(self) -> str:
        """Short name used in output folder names and reports: none, w4, c4, w4c4, ..."""
        parts = []
        if self.compress_weight:
            parts.append(f"w{self.comp_weight_bits}")
        if self.compress_cache:
            parts.append(f"c{self.comp_cache_bits}")
        return "".join(parts) or "none"

    # -- validation ----------------------------------------------------------------------------
    def validate(self) -> None:
        for name in ("gpu_batch_size", "num_gpu_batches"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise UserError(f"policy: {name} must be a positive integer, got {value!r}")
        for kind, (g, c) in {"weights": self.percent[0:2], "cache": self.percent[2:4],
                             "activations": self.percent[4:6]}.items():
            for v in (g, c):
                if not 0 <= v <= 100:
                    raise UserError(f"policy: {kind} percentages must lie in [0, 100], got {v}")
            if g + c > 100 + 1e-9:
                raise UserError(f"policy: {kind} gpu+cpu percentages sum to {g + c:g} > 100; "
                                "disk takes the rest, so the two must sum to at most 100")
        for kind in ("weight", "cache"):
            bits, group = getattr(self, f"comp_{kind}_bits"), getattr(self, f"comp_{kind}_group")
            if not 2 <= bits <= 8:
                raise UserError(f"policy: comp_{kind}_bits must be between 2 and 8, got {bits}")
            if group < 2:
                raise UserError(f"policy: comp_{kind}_group must be at least 2, got {group}")
        if self.comp_weight_dim not in (0, 1):
            raise UserError(f"policy: comp_weight_dim must be 0 (output) or 1 (input), got "
                            f"{self.comp_weight_dim}")
        for name in ("compute_dtype", "storage_dtype"):
            value = getattr(self, name)
            if value is not None and value not in _DTYPES:
                raise UserError(f"policy: {name} must be one of {sorted(set(_DTYPES))}, got {value!r}")
        if self.threads is not None and self.threads < 1:
            raise UserError(f"policy: threads must be positive, got {self.threads}")


def torch_dtype_name(name: str) -> str:
    """Map a user dtype spelling (fp16, bf16, fp32, ...) to torch's attribute name."""
    return _DTYPES[name]


_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?)(B?)\s*$", re.IGNORECASE)


def parse_size(text: str | int | None) -> int | None:
    """Parse '16GiB', '512MB', '1.5G' or a plain byte count."""
    if text is None or isinstance(text, int):
        return text
    m = _SIZE.match(str(text))
    if not m:
        raise UserError(f"cannot read memory size {text!r}; write it like 16GiB, 512MiB or 2000000000")
    number, unit, binary, byte = m.groups()
    power = "KMGT".find(unit.upper()) + 1 if unit else 0
    base = 1000 if (byte and not binary) else 1024  # GB is decimal; GiB and a bare G are binary
    return int(float(number) * base**power)


# -- the shared CLI option group -----------------------------------------------------------------

def add_policy_args(parser: argparse.ArgumentParser, *, default_block: tuple[int, int] = (8, 1)) -> None:
    """Add the policy options shared by engine.generate, engine.bench, engine.search, harness.run."""
    g = parser.add_argument_group("policy")
    g.add_argument("--policy", choices=["manual", "auto"], default="manual",
                   help="'auto' chooses the placement with the policy search")
    g.add_argument("--hardware", default="local",
                   help="profile for --policy auto: t4-paper, a100-40gb, a100-80gb, h100-80gb, h200, 'local' "
                        "(this machine, measured once) or a profile JSON path")
    g.add_argument("--percent", nargs=6, type=float, metavar=("WG", "WC", "CG", "CC", "HG", "HC"),
                   help="weights, cache and activations on gpu/cpu, in percent; disk takes the rest")
    g.add_argument("--gpu-batch-size", type=int, default=default_block[0])
    g.add_argument("--num-gpu-batches", type=int, default=default_block[1])
    g.add_argument("--cpu-cache-compute", action="store_true",
                   help="run attention next to a host-memory KV cache")
    g.add_argument("--no-overlap", action="store_true", help="do I/O and compute one after another")
    g.add_argument("--pin-weight", type=int, choices=[0, 1], default=1)
    g.add_argument("--gpu-mem", help="budget of the gpu tier, e.g. 16GiB (default: free memory)")
    g.add_argument("--cpu-mem", help="budget of the cpu tier, e.g. 64GiB (default: available RAM)")
    g.add_argument("--offload-dir", help="folder of the disk tier (default: a temporary folder)")
    g.add_argument("--direct-io", action="store_true", help="bypass the page cache on the disk tier")
    g.add_argument("--threads", type=int, help="torch compute threads")
    g.add_argument("--compute-dtype", choices=["fp32", "fp16", "bf16"])
    g.add_argument("--storage-dtype", choices=["fp32", "fp16", "bf16"])
    g.add_argument("--compress", choices=["none", "weight", "cache", "both"],
                   help="shorthand for --compress-weight / --compress-cache")
    g.add_argument("--compress-weight", action="store_true", help="4-bit group-wise weights")
    g.add_argument("--compress-cache", action="store_true", help="4-bit group-wise KV cache")
    g.add_argument("--comp-bits", type=int, default=4, help="bits for compressed weights and cache")
    g.add_argument("--comp-group", type=int, default=64, help="group size for compression")
    g.add_argument("--comp-dim", type=int, choices=[0, 1], default=0,
                   help="group weights along the output (0) or input (1) dimension")
    g.add_argument("--no-fused-int4", action="store_true",
                   help="on a CPU, decode 4-bit dim-1 weights for every product instead of running "
                        "decode steps in torch's fused int4 kernel (bf16 activations)")


def policy_from_args(args: argparse.Namespace) -> Policy:
    """Build a Policy from parsed policy options (without resolving --policy auto)."""
    compress = getattr(args, "compress", None)
    cw = bool(args.compress_weight or compress in ("weight", "both"))
    cc = bool(args.compress_cache or compress in ("cache", "both"))
    kwargs = dict(
        gpu_batch_size=args.gpu_batch_size, num_gpu_batches=args.num_gpu_batches,
        overlap=not args.no_overlap, cpu_cache_compute=args.cpu_cache_compute,
        pin_weight=bool(args.pin_weight), compress_weight=cw, compress_cache=cc,
        comp_weight_bits=args.comp_bits, comp_weight_group=args.comp_group, comp_weight_dim=args.comp_dim,
        fused_int4=not args.no_fused_int4,
        comp_cache_bits=args.comp_bits, comp_cache_group=args.comp_group,
        compute_dtype=args.compute_dtype, storage_dtype=args.storage_dtype,
        direct_io=args.direct_io, threads=args.threads,
    )
    policy = Policy(**kwargs)
    if args.percent:
        policy = policy.with_percent(*args.percent)
    return policy
