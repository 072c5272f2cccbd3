"""Scale-out without Ray: `--shard I/N` computes a fixed I-th of the blocks into its own cache file,
`--merge` folds every shard's file into the run's request cache.

Any scheduler that starts N processes (a Slurm array, plain shells) can then split a suite. Every
shard plans the same blocks from the same cache, so the split is deterministic; a shard writes
only its own files, so shards never contend for one SQLite file.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

from engine.errors import UserError
from harness.blocks import Block, longest_first
from harness.files import write_json_atomic
from harness.generation import CallStats
from harness.helm.request_cache import RequestCache

SHARD_DIR = "shards"


def parse_shard(text: str) -> tuple[int, int]:
    """'I/N' -> (I, N), with 0 <= I < N (Slurm's array indices start at 0)."""
    match = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not match or int(match[2]) < 1 or int(match[1]) >= int(match[2]):
        raise UserError(f"--shard {text!r} is not I/N with 0 <= I < N; e.g. --shard 0/4 ... --shard 3/4")
    return int(match[1]), int(match[2])


def assign(blocks: list[Block], shards: int) -> list[list[Block]]:
    """Blocks split into `shards` parts of nearly equal cost: longest first, each to the lightest part."""
    parts: list[list[Block]] = [[] for _ in range(shards)]
    load = [0] * shards
    for block in longest_first(blocks):
        lightest = min(range(shards), key=lambda i: (load[i], i))
        parts[lightest].append(block)
        load[lightest] += block.cost
    return parts


def shard_files(output: Path, index: int, shards: int) -> tuple[Path, Path]:
    """(cache file, figures file) of shard `index` of `shards`."""
    stem = output / SHARD_DIR / f"shard-{index}-of-{shards}"
    return stem.with_suffix(".sqlite"), stem.with_suffix(".json")


class ShardFigures:
    """A shard's figures file, rewritten after every block so a killed shard keeps what it computed."""

    def __init__(self, path: Path, index: int, shards: int, identity: dict, host: str):
        self.path = path
        self.data = json.loads(path.read_text()) if path.is_file() else {
            "shard": index, "of": shards, "identity": identity, "host": host, "wall_s": 0.0, "runs": {},
            "finished": False}
        if self.data["identity"] != identity:
            raise UserError(f"{path} was computed by an engine of other settings; delete {path.parent} to start over")

    def add(self, block: Block, stats: CallStats, wall_s: float) -> None:
        run = self.data["runs"].setdefault(block.run, {"stats": dataclasses.asdict(CallStats()),
                                                       "computed_requests": 0})
        total = CallStats(**run["stats"])
        total.merge(stats)
        run["stats"], run["computed_requests"] = dataclasses.asdict(total), run["computed_requests"] + len(block.keys)
        self.data["wall_s"] += wall_s
        write_json_atomic(self.path, self.data)

    def finish(self) -> None:
        self.data["finished"] = True
        write_json_atomic(self.path, self.data)


def merge(output: Path, cache: RequestCache) -> tuple[dict, list[dict]]:
    """Fold every shard's cache into `cache`; (the shards' identity, their figures). Refuses unfinished sets."""
    files = sorted((output / SHARD_DIR).glob("shard-*-of-*.json"))
    if not files:
        raise UserError(f"{output / SHARD_DIR} holds no shards; run every --shard I/N into {output} first")
    figures = [json.loads(f.read_text()) for f in files]
    counts = {f["of"] for f in figures}
    if len(counts) != 1:
        raise UserError(f"{output / SHARD_DIR} mixes shard counts {sorted(counts)}; delete it and rerun the shards")
    shards = counts.pop()
    done = {f["shard"] for f in figures if f["finished"]}
    missing = [i for i in range(shards) if i not in done]
    if missing:
        raise UserError(f"shard {missing[0]}/{shards} has not finished ({len(missing)} of {shards} missing); "
                        f"run --shard {missing[0]}/{shards} into {output}, then --merge")
    if len({json.dumps(f["identity"], sort_keys=True) for f in figures}) != 1:
        raise UserError("the shards ran engines of different devices or dtypes; rerun them on one kind of device")
    for f in figures:
        cache.absorb(shard_files(output, f["shard"], shards)[0])
    return figures[0]["identity"], figures
