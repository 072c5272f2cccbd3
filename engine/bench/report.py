"""Benchmark bookkeeping: the runs to do, their interleaved order, aggregation, ratios and tables.

Pure logic only (no torch, no processes), so it is unit-tested on its own. A `RunConfig` is one
table row; every repeat of it yields one `RunRecord`; rows show the median throughput over the
repeats that finished, and ratios compare medians of rows measured in the same invocation.
"""

from __future__ import annotations

import csv
import json
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

GiB = 2**30
THRASH_FACTOR = 2.0  # reads above 2x what the run needs (+ slack) mean the cap makes it re-read
THRASH_SLACK = 256 * 2**20


@dataclass(frozen=True)
class RunConfig:
    """One row of the table: a system under one condition at one batch size."""

    key: str  # unique, e.g. "accelerate/cap/B8"
    label: str  # what the table shows
    system: str  # "hf", "accelerate" or "engine"
    batch: int
    cap_bytes: int | None
    policy: dict | None = None
    gpu_mem: int | None = None
    cpu_mem: int | None = None
    tags: tuple[str, ...] = ()  # e.g. ("baseline",), ("compressed",), ("ablation",)


@dataclass
class RunRecord:
    """One repeat of one RunConfig: what the parent saw from outside plus the child's own report."""

    key: str
    repeat: int
    status: str  # ok, timeout, oom, crashed, error
    wall_s: float
    max_rss_bytes: int
    disk_read_bytes: int
    cgroup_peak_bytes: int | None
    cache_drop: str
    result: dict = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float | None:
        return self.result.get("tokens_per_s") if self.status == "ok" else None


def interleave(configs: Sequence[RunConfig], repeats: int) -> list[tuple[int, RunConfig]]:
    """A B C A B C: every repeat runs each config once, in the given order, before the next repeat."""
    return [(r, c) for r in range(repeats) for c in configs]


def expected_disk_read(result: dict, checkpoint_bytes: int) -> int | None:
    """What a run needs from disk: its imports, one pass over the checkpoint, and its own offload reads."""
    if "read_after_import" not in result:
        return None
    return result["read_after_import"] + checkpoint_bytes + result.get("system_disk_read_bytes", 0)


def is_thrashing(actual: int, expected: int | None) -> bool:
    return expected is not None and actual > THRASH_FACTOR * expected + THRASH_SLACK


@dataclass
class Row:
    """The aggregate of a RunConfig's repeats."""

    config: RunConfig
    records: list[RunRecord]

    @property
    def ok(self) -> list[RunRecord]:
        return [r for r in self.records if r.status == "ok"]

    @property
    def tokens_per_s(self) -> float | None:
        values = [r.tokens_per_s for r in self.ok]
        return statistics.median(values) if values else None

    @property
    def batch(self) -> int:
        """The rows the system actually ran at once (the engine reports its block size)."""
        batches = [r.result["batch"] for r in self.ok if "batch" in r.result]
        return batches[0] if batches else self.config.batch

    def median_of(self, getter: Callable[[RunRecord], float | None]) -> float | None:
        values = [v for v in (getter(r) for r in self.records) if v is not None]
        return statistics.median(values) if values else None

    def thrash_records(self, checkpoint_bytes: int) -> list[RunRecord]:
        return [r for r in self.records
                if is_thrashing(r.disk_read_bytes, expected_disk_read(r.result, checkpoint_bytes))]

    def status(self, checkpoint_bytes: int) -> str:
        bad = [r.status for r in self.records if r.status != "ok"]
        thrash = len(self.thrash_records(checkpoint_bytes))
        parts = [f"{n}/{len(self.records)} {s}" for s in sorted(set(bad)) for n in [bad.count(s)]]
        parts += sorted({r.result["error"][:160] for r in self.records if "error" in r.result})
        if thrash:
            parts.append(f"THRASHING in {thrash}/{len(self.records)}")
        return ", ".join(parts) or "ok"


def aggregate(configs: Sequence[RunConfig], records: Sequence[RunRecord]) -> list[Row]:
    return [Row(c, [r for r in records if r.key == c.key]) for c in configs]


def ratio(row: Row, reference: Row | None) -> float | None:
    a, b = row.tokens_per_s, reference.tokens_per_s if reference else None
    return a / b if a is not None and b else None


def best_row(rows: Sequence[Row], predicate: Callable[[Row], bool]) -> Row | None:
    """The fastest row that satisfies `predicate` (None if none finished)."""
    candidates = [r for r in rows if predicate(r) and r.tokens_per_s is not None]
    return max(candidates, key=lambda r: r.tokens_per_s) if candidates else None


def fmt(value: float | None, spec: str = ".2f", scale: float = 1.0, suffix: str = "") -> str:
    return "—" if value is None else f"{value / scale:{spec}}{suffix}"


def save_outputs(folder: Path, stem: str, markdown: str, header: Sequence[str], body: Sequence[Sequence[str]],
                 meta: dict, records: Sequence[RunRecord]) -> list[Path]:
    """Write the table as .md and .csv and every raw record plus the conditions as .json."""
    folder.mkdir(parents=True, exist_ok=True)
    md, csv_path, js = (folder / f"{stem}.{ext}" for ext in ("md", "csv", "json"))
    md.write_text(markdown + "\n")
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(body)
    js.write_text(json.dumps({"meta": meta, "records": [asdict(r) for r in records]}, indent=1, default=str))
    return [md, csv_path, js]
