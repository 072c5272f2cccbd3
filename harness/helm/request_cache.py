"""The request cache: finished requests survive a killed run, so `--resume` never runs one twice.

SQLite gives atomic commits (a `kill -9` loses at most the block in flight) and safe access from
HELM's worker threads. The key covers everything that changes an output: the HELM request and the
engine's output identity (`EngineSpec.output_identity`: model, weights, seed, device type, the
effective dtypes, compression and every other policy field that can change numerics). Each row
counts how often its request was computed, so tests can prove nothing ran twice.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sqlite3
import threading
from pathlib import Path

import dacite
from helm.common.general import asdict_without_nones
from helm.common.request import Request, RequestResult

REQUEST_CACHE_FILE = "request_cache.sqlite"


def request_key(identity: dict, request: Request) -> str:
    """The cache key of `request` on an engine of output `identity`."""
    blob = json.dumps({"engine": identity, "request": dataclasses.asdict(request)}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


class RequestCache:
    def __init__(self, path: str | Path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS results "
                         "(key TEXT PRIMARY KEY, result TEXT NOT NULL, computed INTEGER NOT NULL)")

    def get(self, key: str) -> RequestResult | None:
        with self._lock:
            row = self._db.execute("SELECT result FROM results WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        return dataclasses.replace(dacite.from_dict(RequestResult, json.loads(row[0])), cached=True)

    def put_many(self, items: list[tuple[str, RequestResult]]) -> None:
        """Store results of one engine call in one transaction."""
        rows = [(key, json.dumps(asdict_without_nones(result))) for key, result in items]
        with self._lock:
            self._db.execute("BEGIN")
            self._db.executemany(
                "INSERT INTO results (key, result, computed) VALUES (?, ?, 1) "
                "ON CONFLICT(key) DO UPDATE SET result = excluded.result, computed = computed + 1", rows)
            self._db.execute("COMMIT")

    def absorb(self, other: str | Path) -> int:
        """Fold in another cache file (a shard's), one transaction; keys already here stay as they are,
        so folding the same file twice changes nothing. Returns the rows added."""
        with sqlite3.connect(f"file:{other}?mode=ro", uri=True) as src:
            rows = src.execute("SELECT key, result, computed FROM results").fetchall()
        with self._lock:
            before = self._db.total_changes
            self._db.execute("BEGIN")
            self._db.executemany("INSERT INTO results (key, result, computed) VALUES (?, ?, ?) "
                                 "ON CONFLICT(key) DO NOTHING", rows)
            self._db.execute("COMMIT")
            return self._db.total_changes - before

    def compute_counts(self) -> dict[str, int]:
        """How often each cached request was computed (1 everywhere when nothing ran twice)."""
        with self._lock:
            return dict(self._db.execute("SELECT key, computed FROM results").fetchall())

    def close(self) -> None:
        with self._lock:
            self._db.close()
