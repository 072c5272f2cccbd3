"""The placement and scheduling policy and its validation.

One `Policy` describes everything that changes *how* the engine runs a model (never *what* it
computes): where weights, KV cache and activations live, how rows are batched, and whether
tensors are compressed. Every field has a default, so `Policy()` runs everything on the compute
device. Each field's metadata carries its help text, from which engine.flags builds the CLI.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.errors import UserError

KEY_GROUPINGS = ("channel", "token")  # how a compressed cache groups keys: engine.channel_keys

TIERS = ("gpu", "cpu", "disk")
PERCENT_FIELDS = ("w_gpu_percent", "w_cpu_percent", "cache_gpu_percent", "cache_cpu_percent",
                  "act_gpu_percent", "act_cpu_percent")

# Every spelling of a precision the engine takes; the short names are the ones its flags offer.
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_DTYPE_ALIASES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def _opt(help: str, **cli: Any) -> Any:
    """Field metadata: its help text, and how engine.flags turns it into a flag (cli=False: none)."""
    return {"help": help, **cli}


@dataclass
class Policy:
    """Where tensors live and how rows are batched. Percentages are 0..100; disk takes the rest."""

    gpu_batch_size: int = field(default=8, metadata=_opt("rows per GPU batch"))
    num_gpu_batches: int = field(default=1, metadata=_opt("GPU batches per block, sharing each layer's weight load"))
    w_gpu_percent: float = field(default=100.0, metadata=_opt("weights on the gpu tier", cli=False))
    w_cpu_percent: float = field(default=0.0, metadata=_opt("weights on the cpu tier", cli=False))
    cache_gpu_percent: float = field(default=100.0, metadata=_opt("KV cache on the gpu tier", cli=False))
    cache_cpu_percent: float = field(default=0.0, metadata=_opt("KV cache on the cpu tier", cli=False))
    act_gpu_percent: float = field(default=100.0, metadata=_opt("activations on the gpu tier", cli=False))
    act_cpu_percent: float = field(default=0.0, metadata=_opt("activations on the cpu tier", cli=False))
    overlap: bool = field(default=True, metadata=_opt("overlap I/O with compute (off: one after another)"))
    cpu_cache_compute: bool = field(default=False, metadata=_opt("run attention next to a host-memory KV cache"))
    pin_weight: bool = field(default=True, metadata=_opt("pin host-memory weights for faster uploads"))
    compress_weight: bool = field(default=False, metadata=_opt("group-wise quantized weights"))
    compress_cache: bool = field(default=False, metadata=_opt("group-wise quantized KV cache"))
    comp_weight_bits: int = field(default=4, metadata=_opt("bits per compressed weight (2-8)"))
    comp_weight_group: int = field(default=64, metadata=_opt("group size of compressed weights"))
    # dim 1 (the GPTQ/AWQ/torchao convention, and the fused int4 kernel's) measured better than FlexGen's dim 0 on
    # SmolLM2 (docs/measurements.md, issue 19); --comp-dim 0 replicates FlexGen.
    comp_weight_dim: int = field(default=1, metadata=_opt(
        "group weights along the output (0) or input (1) dimension", choices=(0, 1), aliases=("--comp-dim",)))
    # How each group's (min, step) is chosen (engine.quant.fit); same bytes. weighted: least squared error with
    # errors on large weights costing more (llama.cpp's k-quants); mse: least squared error, which clips groups'
    # extremes and made SmolLM2 answer "\n" to HELM's 5-shot MMLU; minmax: FlexGen's. docs/measurements.md.
    comp_weight_fit: str = field(default="weighted", metadata=_opt(
        "how compressed weights' groups are fitted: error-minimizing with large weights kept close (weighted), "
        "least squared error (mse), or FlexGen's min-max", type=str, choices=("weighted", "mse", "minmax")))
    # On a CPU, 4-bit weights grouped along dim 1 run small products (decode steps) in torch's fused int4
    # kernel with bf16 activations (engine.quant.int4_kernel); False keeps every product in compute_dtype.
    fused_int4: bool = field(default=True, metadata=_opt(
        "on a CPU, run decode-step products of 4-bit dim-1 weights in torch's fused int4 kernel (bf16 activations)"))
    comp_cache_bits: int = field(default=4, metadata=_opt("bits per compressed KV-cache value (2-8)"))
    comp_cache_group: int = field(default=64, metadata=_opt("group size of the compressed KV cache"))
    # channel: keys grouped per channel over blocks of comp_cache_group tokens, the unfinished block kept in
    # the storage dtype (KIVI; engine.channel_keys): keys' outlier channels get groups of their own, which took
    # most of a 4-bit cache's perplexity cost away on SmolLM2 (docs/measurements.md); token: FlexGen's groups
    # along each token's head dimension, no window.
    comp_cache_keys: str = field(default="channel", metadata=_opt(
        "group compressed keys per channel over blocks of tokens (KIVI) or per token (FlexGen)", type=str,
        choices=KEY_GROUPINGS))
    compute_dtype: str | None = field(default=None, metadata=_opt(
        "precision of compute (default: fp32 on a CPU, fp16 on a GPU)", type=str, choices=tuple(DTYPES)))
    storage_dtype: str | None = field(default=None, metadata=_opt(
        "precision of stored tensors (default: the compute dtype)", type=str, choices=tuple(DTYPES)))
    direct_io: bool = field(default=False, metadata=_opt("bypass the page cache on the disk tier (O_DIRECT)"))
    threads: int | None = field(default=None, metadata=_opt("torch compute threads (default: torch's)", type=int))
    # Process-wide, like `threads`: glibc's mmap threshold is the C library's, not the engine's. Off by default,
    # since it slows every other library in the process (HF transformers by about 20%) and the engine by 8%.
    return_freed_memory: bool = field(default=False, metadata=_opt(
        "have glibc return freed blocks of 1 MiB or more to the kernel at once, for this whole process: peak RSS "
        "then stays within Engine.plan's bound, at some speed (engine.memory.return_freed_memory)"))
    cuda_graphs: bool = field(default=True, metadata=_opt(
        "on a GPU, replay each decode step's compute as a CUDA graph where everything is resident "
        "(falls back to eager, once said, if capture fails)"))

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
        return tuple(getattr(self, name) for name in PERCENT_FIELDS)

    def with_percent(self, *values: float) -> Policy:
        """A copy with FlexGen's six percentages: weights, cache, activations on gpu and cpu."""
        return dataclasses.replace(self, **dict(zip(PERCENT_FIELDS, values, strict=True)))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def label(self, block: bool = True) -> str:
        """Short text for tables and logs: block shape, gpu/cpu percent of weights, cache and activations,
        then whatever else differs from the defaults (e.g. `8x4 w20/80 c0/100 a0/100 cpu-attn w4-dim0`)."""
        pct = " ".join(f"{kind}{self.percent[2 * i]:g}/{self.percent[2 * i + 1]:g}" for i, kind in enumerate("wca"))
        flags = (("cpu-attn", self.cpu_cache_compute), ("no-overlap", not self.overlap),
                 (f"w{self.comp_weight_bits}-dim{self.comp_weight_dim}", self.compress_weight),
                 (f"c{self.comp_cache_bits}", self.compress_cache),
                 ("token-keys", self.compress_cache and self.comp_cache_keys == "token"), ("direct-io", self.direct_io),
                 ("no-fused-int4", not self.fused_int4 and self.compress_weight))
        parts = ([f"{self.gpu_batch_size}x{self.num_gpu_batches}"] if block else []) + [pct]
        return " ".join(parts + [name for name, on in flags if on])

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
        if self.comp_cache_keys not in KEY_GROUPINGS:
            raise UserError(f"policy: comp_cache_keys must be one of {', '.join(KEY_GROUPINGS)}, got "
                            f"{self.comp_cache_keys!r}")
        if self.comp_weight_dim not in (0, 1):
            raise UserError(f"policy: comp_weight_dim must be 0 (output) or 1 (input), got "
                            f"{self.comp_weight_dim}")
        for name in ("compute_dtype", "storage_dtype"):
            value = getattr(self, name)
            if value is not None and _DTYPE_ALIASES.get(value, value) not in DTYPES:
                raise UserError(f"policy: {name} must be one of {sorted(DTYPES)}, got {value!r}")
        if self.threads is not None and self.threads < 1:
            raise UserError(f"policy: threads must be positive, got {self.threads}")


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a user's spelling (fp16, bf16, fp32, float16, ...)."""
    return DTYPES[_DTYPE_ALIASES.get(name, name)]


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
