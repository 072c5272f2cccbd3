"""Encoded weights kept on disk, so a checkpoint pays its (error-minimizing) quantization once per scheme.

An entry is a folder named by the SHA-256 of a JSON key (the checkpoint's fingerprint and every weight's
codec) holding one safetensors file of uint8 tensors per layer and a manifest: the key itself and each
file's CRC-32. Nothing is ever unpickled. An entry is built in a temporary folder and renamed into place
whole, so a crashed or concurrent load never leaves a half-written entry behind. A damaged entry (bad
manifest, checksum, header or size) is reported in one line, removed, and the weights are encoded again.
Only the most recently used entries are kept.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

KEEP_ENTRIES = 16  # most recently used entries kept; older ones are removed when a new one is written
_MANIFEST = "manifest.json"

# put(layer, weight_name, data): receives each weight's encoded bytes (uint8)
Put = Callable[[int, str, torch.Tensor], None]


class _Damaged(Exception):
    """An entry that cannot be trusted; the message says why."""


def _warn(message: str) -> None:
    print(f"flexhelm: {message}", file=sys.stderr, flush=True)


class EncodedCache:
    """The entry of one key under `root`. `expected` lists, per layer, each weight's name and byte count."""

    def __init__(self, root: Path, key: dict, expected: list[dict[str, int]]):
        self.root, self.key, self.expected = root, key, expected
        text = json.dumps(key, sort_keys=True)
        self.folder = root / hashlib.sha256(text.encode()).hexdigest()[:32]

    def load(self, put: Put) -> bool:
        """Hand every cached weight to `put`; False, having handed none or some, when there is no usable entry."""
        if not (self.folder / _MANIFEST).is_file():
            return False
        try:
            for pos, name, data in self._read():
                put(pos, name, data)
        except _Damaged as why:
            _warn(f"encoded-weight cache entry {self.folder} is damaged ({why}); removed, encoding again")
            shutil.rmtree(self.folder, ignore_errors=True)
            return False
        os.utime(self.folder / _MANIFEST)  # recently used: kept longest
        return True

    def _read(self) -> Iterator[tuple[int, str, torch.Tensor]]:
        try:
            manifest = json.loads((self.folder / _MANIFEST).read_text())
            crcs = manifest["crc32"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise _Damaged(f"unreadable manifest: {type(err).__name__}") from None
        if manifest.get("key") != self.key or len(crcs) != len(self.expected):
            raise _Damaged("manifest does not match the checkpoint and scheme")
        for pos, (want, crc) in enumerate(zip(self.expected, crcs, strict=True)):
            try:
                raw = (self.folder / f"layer-{pos:05d}.safetensors").read_bytes()
            except OSError as err:
                raise _Damaged(f"layer {pos}: {err.strerror or type(err).__name__}") from None
            if zlib.crc32(raw) != crc:
                raise _Damaged(f"layer {pos}: checksum mismatch")
            try:
                tensors = load_bytes(raw)
            except Exception as err:  # safetensors raises several types for a bad header
                raise _Damaged(f"layer {pos}: {type(err).__name__}") from None
            got = {n: t.numel() for n, t in tensors.items() if t.dtype == torch.uint8 and t.dim() == 1}
            if got != want:
                raise _Damaged(f"layer {pos}: tensors or sizes differ from the scheme's")
            for name in want:
                yield pos, name, tensors[name]

    @contextmanager
    def writer(self) -> Iterator[Put]:
        """A `put` that collects weights and writes each layer once all its weights arrived; the entry is
        published when the block exits normally. A disk error only costs the entry, never the load."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=".building-"))
        pending: list[dict[str, torch.Tensor]] = [{} for _ in self.expected]
        crcs: list[int | None] = [None] * len(self.expected)
        failed = False

        def put(pos: int, name: str, data: torch.Tensor) -> None:
            nonlocal failed
            layer = pending[pos]
            layer[name] = data.detach().to("cpu").reshape(-1)
            if failed or len(layer) < len(self.expected[pos]):
                return
            raw = save_bytes(layer)
            pending[pos] = {}
            try:
                (tmp / f"layer-{pos:05d}.safetensors").write_bytes(raw)
            except OSError as err:
                failed = True
                _warn(f"cannot write the encoded-weight cache under {self.root} ({err.strerror}); "
                      "the weights will be encoded again next time")
            crcs[pos] = zlib.crc32(raw)

        try:
            yield put
            if not failed and None not in crcs:
                (tmp / _MANIFEST).write_text(json.dumps({"key": self.key, "crc32": crcs}))
                self._publish(tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _publish(self, tmp: Path) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)  # a damaged or stale entry of the same key
        try:
            os.replace(tmp, self.folder)
        except OSError:  # a concurrent load published the same entry first
            return
        entries = sorted((p for p in self.root.iterdir() if (p / _MANIFEST).is_file()),
                         key=lambda p: (p / _MANIFEST).stat().st_mtime, reverse=True)
        for old in entries[KEEP_ENTRIES:]:
            shutil.rmtree(old, ignore_errors=True)
