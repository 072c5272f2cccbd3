"""Hardware profiles: the measured or fitted speeds and capacities the cost model prices a policy with.

A profile is a JSON file. Presets ship next to this module (`t4-paper`, `a100-40gb`, ...); "local"
is this machine, measured once (engine.planner.measure) and cached; anything else is a path.
Sizes are written like "16GiB", bandwidths like "12.89GiB" (per second), FLOP rates in TFLOP/s, so
the files stay readable and FlexGen's GiB-based constants can be copied as published.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from engine.errors import UserError
from engine.policy import parse_size
from engine.weights import cache_root

PRESET_DIR = Path(__file__).parent / "presets"


def local_cache() -> Path:
    """Where the measured profile of this machine is kept (under $FLEXHELM_CACHE if set)."""
    return cache_root() / "hardware.json"

_RATE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([KMGT]?)(i?)B?\s*(?:/s)?\s*$", re.IGNORECASE)


def parse_rate(value: str | float | int) -> float:
    """Bytes per second from "12.89GiB", "2GB", "2GB/s" or a plain number."""
    if isinstance(value, int | float):
        return float(value)
    m = _RATE.match(str(value))
    if not m:
        raise UserError(f"cannot read bandwidth {value!r}; write it like 12.89GiB or 2GB (per second)")
    number, unit, binary = m.groups()
    power = "KMGT".find(unit.upper()) + 1 if unit else 0
    return float(number) * (1024 if binary else 1000) ** power


@dataclass(frozen=True)
class HardwareProfile:
    """Capacities (bytes), bandwidths (bytes/s) and compute rates (FLOP/s) of one machine.

    `device` is the compute device: "cuda", or "cpu" on a machine without a GPU, where the "gpu"
    tier is host memory too and both tiers share `cpu_mem`. Bandwidth names follow FlexGen:
    ctog = host->device, gtoc = device->host, dtoc = disk->host, ctod = host->disk.
    """

    name: str
    device: str
    gpu_mem: int
    cpu_mem: int
    disk_mem: int
    ctog_bw: float
    gtoc_cache_bw: float
    gtoc_act_bw: float
    dtoc_bw: float
    ctod_cache_bw: float
    ctod_bw: float
    gpu_mem_bw: float  # device memory read rate, bounds matmuls that stream weights (decode)
    mm_prefill_flops: float
    mm_decode_flops: float
    bmm_prefill_flops: float
    bmm_decode_flops: float
    cpu_attn_flops: float
    dequant_bw: float  # decompressed bytes per second on the compute device
    cpu_dequant_bw: float  # the same next to a host-memory cache (cpu_cache_compute)
    cpu_small_batch: tuple[float, float, float] = (0.0, 0.0, 0.0)  # FlexGen's c1, c2, c3
    layer_overhead_s: float = 0.0  # fixed cost of running one layer for one GPU batch (launches, Python)
    runtime: str = "flexhelm"  # the engine the constants describe: "flexhelm", or "flexgen" for fitted ones
    notes: str = ""
    measured: dict = field(default_factory=dict, compare=False)

    @property
    def shared_host_memory(self) -> bool:
        """True when the "gpu" tier is host memory (CPU-only machine)."""
        return self.device == "cpu"

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        for f in _RATE_FIELDS:
            d[f] = f"{d[f] / 1e9:.4g}GB"
        for f in _FLOP_FIELDS:
            d[f] = round(d[f] / 1e12, 6)
        d["cpu_small_batch"] = list(self.cpu_small_batch)
        return d

    @classmethod
    def from_json(cls, data: dict, source: str) -> HardwareProfile:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        missing = sorted(f.name for f in dataclasses.fields(cls)
                         if f.name not in data and f.default is dataclasses.MISSING
                         and f.default_factory is dataclasses.MISSING)
        if unknown or missing:
            raise UserError(f"hardware profile {source}: " + "; ".join(
                ([f"unknown fields {unknown}"] if unknown else []) + ([f"missing fields {missing}"] if missing else []))
                + f"; see the presets in {PRESET_DIR}")
        for key, allowed in (("device", ("cuda", "cpu")), ("runtime", ("flexhelm", "flexgen"))):
            if data.get(key, allowed[0]) not in allowed:
                raise UserError(f"hardware profile {source}: {key} must be one of {allowed}, got {data[key]!r}")
        values = dict(data)
        for f in ("gpu_mem", "cpu_mem", "disk_mem"):
            values[f] = parse_size(values[f])
        for f in _RATE_FIELDS:
            values[f] = parse_rate(values[f])
        for f in _FLOP_FIELDS:
            values[f] = float(values[f]) * 1e12
        values["cpu_small_batch"] = tuple(float(c) for c in values.get("cpu_small_batch", (0, 0, 0)))
        for f in (*_RATE_FIELDS, *_FLOP_FIELDS, "gpu_mem", "cpu_mem"):
            if not values[f] > 0:
                raise UserError(f"hardware profile {source}: {f} must be positive, got {data[f]!r}")
        return cls(**values)


_RATE_FIELDS = ("ctog_bw", "gtoc_cache_bw", "gtoc_act_bw", "dtoc_bw", "ctod_cache_bw", "ctod_bw",
                "gpu_mem_bw", "dequant_bw", "cpu_dequant_bw")
_FLOP_FIELDS = ("mm_prefill_flops", "mm_decode_flops", "bmm_prefill_flops", "bmm_decode_flops",
                "cpu_attn_flops")


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def read_profile(path: Path) -> HardwareProfile:
    try:
        data = json.loads(Path(path).read_text())
    except OSError as err:
        raise UserError(f"cannot read hardware profile {path}: {err.strerror}") from None
    except json.JSONDecodeError as err:
        raise UserError(f"hardware profile {path} is not valid JSON ({err.msg} at line {err.lineno})") from None
    return HardwareProfile.from_json(data, str(path))


def write_profile(profile: HardwareProfile, path: Path) -> None:
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(profile.to_json(), indent=2) + "\n")
