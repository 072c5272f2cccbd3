"""The three memory tiers (gpu, cpu, disk): byte stores with capacity, accounting and explicit I/O.

The `gpu` tier is the compute device. On a CPU-only machine it is a RAM pool of its own, capped
by its budget, so every policy runs (and is tested) without a GPU. The `disk` tier is a folder of
files read and written explicitly (no mmap: mapped pages hide the tier's cost), optionally with
O_DIRECT so the page cache cannot flatter it.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import os
import shutil
import tempfile
import threading
import weakref
from pathlib import Path

import torch

from engine.errors import UserError
from engine.storage.arena import HostArena
from engine.storage.host_memory import available_ram

ALIGN = 4096
# How to give a tier more room: the CLIs have flags for the memory tiers; the disk tier's room is its folder's.
_RAISE = {"gpu": "raise --gpu-mem", "cpu": "raise --cpu-mem",
          "disk": "raise disk_mem or use a bigger --offload-dir"}


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


class Tier:
    """Capacity and byte accounting for one tier; stores are created through it."""

    def __init__(self, name: str, device: torch.device, capacity: int, pin: bool = False):
        self.name, self.device, self.capacity, self.pin = name, device, capacity, pin
        self.used = self.peak = self.bytes_read = self.bytes_written = 0
        self._lock = threading.Lock()

    def alloc(self, nbytes: int) -> None:
        with self._lock:
            self.used += nbytes
            if self.used > self.capacity:
                used, self.used = self.used, self.used - nbytes
                raise UserError(f"{self.name} tier over budget: needs {human(used)}, budget {human(self.capacity)}; "
                                f"{_RAISE[self.name]}, or move more to another tier with --percent")
            self.peak = max(self.peak, self.used)

    def release(self, nbytes: int) -> None:
        with self._lock:
            self.used -= nbytes

    def count(self, read: int = 0, written: int = 0) -> None:
        with self._lock:
            self.bytes_read += read
            self.bytes_written += written

    def reset_counters(self) -> None:
        self.peak = self.used
        self.bytes_read = self.bytes_written = 0

    def store(self, nbytes: int, tag: str) -> MemoryStore:
        return MemoryStore(self, nbytes)

    def stores(self, sizes: list[int], tags: list[str]) -> list[MemoryStore]:
        """Stores of these sizes made at once (a model's weights): on the host, views of one HostArena,
        pinned once where the tier pins; on a GPU, one allocation each, as its caching allocator serves them."""
        if self.device.type != "cpu":
            return [self.store(n, tag) for n, tag in zip(sizes, tags, strict=True)]
        arena = HostArena(sizes, pin=self.pin)
        return [MemoryStore(self, n, arena.view(i)) for i, n in enumerate(sizes)]


class MemoryStore:
    """A byte buffer on a memory tier: its own allocation, or a view of a HostArena (`buf`)."""

    def __init__(self, tier: Tier, nbytes: int, buf: torch.Tensor | None = None):
        tier.alloc(nbytes)
        self.tier, self.nbytes = tier, nbytes
        pin = tier.pin and tier.device.type == "cpu"
        self.buf = buf if buf is not None else torch.empty(nbytes, dtype=torch.uint8, device=tier.device,
                                                          pin_memory=pin)

    def write(self, offset: int, data: torch.Tensor) -> None:
        flat = data.reshape(-1)
        self.buf[offset:offset + flat.numel()].copy_(flat)
        self.tier.count(written=flat.numel())

    def read(self, offset: int, nbytes: int) -> torch.Tensor:
        if self.tier.name != "gpu":
            self.tier.count(read=nbytes)
        return self.buf[offset:offset + nbytes]

    def close(self) -> None:
        if self.buf is not None:
            self.tier.release(self.nbytes)
            self.buf = None


def aligned_empty(nbytes: int, pin: bool = False) -> torch.Tensor:
    """A uint8 host buffer whose start is 4 KiB aligned, as O_DIRECT requires."""
    raw = torch.empty(nbytes + ALIGN, dtype=torch.uint8, pin_memory=pin)
    shift = (-raw.data_ptr()) % ALIGN
    return raw[shift:shift + nbytes]


class DiskTier(Tier):
    """A folder of files, one per store, made at the first store and removed on every exit path.

    Nothing is created before a store needs it, so a load refused up front (a budget, a bad checkpoint)
    leaves no trace, not even the --offload-dir it named; folders the tier did create are removed on
    close when nothing else was put in them. A folder that cannot be made is refused at once, in one line.
    """

    def __init__(self, root: str | os.PathLike | None, capacity: int | None, direct_io: bool):
        self.parent = Path(root) if root else Path(tempfile.gettempdir())
        try:
            existing = next(p for p in (self.parent, *self.parent.parents) if p.exists())
        except OSError as err:  # e.g. a parent that may not be searched
            raise UserError(f"cannot create offload folder {self.parent} ({err.strerror}); pass a writable "
                            "--offload-dir") from None
        if not existing.is_dir():
            raise UserError(f"cannot create offload folder {self.parent}: {existing} is a file, not a folder; "
                            "pass another --offload-dir")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise UserError(f"cannot create offload folder {self.parent}: {existing} is not writable; "
                            "pass a writable --offload-dir")
        if existing == self.parent:
            clean_stale(self.parent)
        super().__init__("disk", torch.device("cpu"),
                         capacity if capacity is not None else shutil.disk_usage(existing).free)
        self.direct_io = direct_io
        self.folder: Path | None = None  # made by the first store
        # what close removes: this tier's folder, then the parents it made (deepest first) if left empty
        self._tree: list[Path] = []
        self._made: list[Path] = []
        self._finalizer = weakref.finalize(self, _remove, self._tree, self._made)
        atexit.register(self._finalizer)
        self._serial = 0

    def _make_folder(self) -> Path:
        missing = [p for p in (self.parent, *self.parent.parents) if not p.exists()]  # deepest first
        self._made.extend(missing)
        try:
            self.parent.mkdir(parents=True, exist_ok=True)
            self._tree.append(Path(tempfile.mkdtemp(prefix=f"flexhelm-{os.getpid()}-", dir=self.parent)))
        except OSError as err:
            _remove(self._tree, self._made)
            raise _disk_error(err, f"cannot create offload folder {self.parent}",
                              "pass a writable --offload-dir") from None
        return self._tree[0]

    def store(self, nbytes: int, tag: str) -> DiskStore:
        with self._lock:
            if self.folder is None:
                self.folder = self._make_folder()
            self._serial += 1
            path = self.folder / f"{self._serial:06d}-{tag}.bin"
        return DiskStore(self, path, nbytes)

    def stores(self, sizes: list[int], tags: list[str]) -> list[DiskStore]:  # type: ignore[override]
        """A file each: the disk tier has no arena."""
        return [self.store(n, tag) for n, tag in zip(sizes, tags, strict=True)]

    def close(self) -> None:
        self._finalizer()


def _remove(tree: list[Path], made: list[Path]) -> None:
    """Remove a disk tier's folder, then the parents it made, deepest first, unless something else is in them."""
    for folder in tree:
        shutil.rmtree(folder, ignore_errors=True)
    for folder in made:
        with contextlib.suppress(OSError):
            folder.rmdir()
    tree.clear()
    made.clear()


def _disk_error(err: OSError, what: str, fix: str) -> UserError:
    """One line for a failed disk operation; a full disk says so, since freeing space or moving fixes it."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return UserError(f"{what}: the offload disk is full ({err.strerror}); free space or pass another "
                         "--offload-dir")
    return UserError(f"{what} ({err.strerror}); {fix}")


class DiskStore:
    """A file with positional reads and writes; reads may bypass the page cache (O_DIRECT)."""

    def __init__(self, tier: DiskTier, path: Path, nbytes: int):
        tier.alloc(nbytes)
        self.tier, self.path, self.nbytes, self.closed = tier, path, nbytes, False
        self.fd = self.rfd = None
        try:
            self.fd = self.rfd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            os.ftruncate(self.fd, -(-nbytes // ALIGN) * ALIGN)
        except OSError as err:
            self.close()
            raise _disk_error(err, f"cannot make offload file {path}", "pass another --offload-dir") from None
        if tier.direct_io and hasattr(os, "O_DIRECT"):
            try:
                self.rfd = os.open(path, os.O_RDONLY | os.O_DIRECT)
            except OSError:  # e.g. tmpfs: no O_DIRECT; buffered reads are then the truth anyway
                self.rfd = self.fd

    def write(self, offset: int, data: torch.Tensor) -> None:
        view = memoryview(data.reshape(-1).contiguous().cpu().numpy())
        try:
            written = os.pwritev(self.fd, [view], offset)
        except OSError as err:
            raise _disk_error(err, f"writing {self.path} failed", "the offload disk is failing: pass another "
                              "--offload-dir") from None
        if written != len(view):  # only a full disk writes less than asked without an error
            raise _disk_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
                              f"short write to {self.path}", "") from None
        if self.rfd != self.fd:  # keep the page cache honest for later direct reads
            os.posix_fadvise(self.fd, offset, len(view), os.POSIX_FADV_DONTNEED)
        self.tier.count(written=len(view))

    def read(self, offset: int, nbytes: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Read bytes [offset, offset+nbytes) into `out` (a 4 KiB aligned staging buffer) or a new one."""
        direct = self.rfd != self.fd
        start = offset // ALIGN * ALIGN if direct else offset
        end = -(-(offset + nbytes) // ALIGN) * ALIGN if direct else offset + nbytes
        if out is None:
            buf = aligned_empty(end - start) if direct else torch.empty(end - start, dtype=torch.uint8)
        else:
            buf = out[:end - start]
        got = os.preadv(self.rfd, [memoryview(buf.numpy())], start) - (offset - start)
        if got < nbytes:
            raise UserError(f"short read from {self.path}: the offload folder was modified or the disk failed")
        self.tier.count(read=nbytes)
        return buf[offset - start:offset - start + nbytes]

    def prefetch(self, offset: int, nbytes: int) -> None:
        """Ask the kernel to start reading bytes into the page cache, so a later buffered read only copies."""
        if self.rfd == self.fd and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.fd, offset, nbytes, os.POSIX_FADV_WILLNEED)

    @staticmethod
    def staging_bytes(nbytes: int) -> int:
        """Room a read of `nbytes` needs in a staging buffer, keeping the next read aligned."""
        return -(-nbytes // ALIGN) * ALIGN + ALIGN

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.rfd not in (None, self.fd):
            os.close(self.rfd)
        if self.fd is not None:
            os.close(self.fd)
        self.fd = self.rfd = None
        self.path.unlink(missing_ok=True)
        self.tier.release(self.nbytes)


def clean_stale(parent: Path) -> None:
    """Remove offload folders left behind by killed runs (their owning process no longer exists)."""
    for folder in parent.glob("flexhelm-*-*"):
        try:
            pid = int(folder.name.split("-")[1])
        except (IndexError, ValueError):
            continue
        if pid != os.getpid() and not _alive(pid):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def make_tiers(device: torch.device, gpu_mem: int | None, cpu_mem: int | None, offload_dir, disk_mem: int | None,
               direct_io: bool, pin: bool) -> dict[str, Tier]:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        gpu_cap = gpu_mem if gpu_mem is not None else free
    else:
        gpu_cap = gpu_mem if gpu_mem is not None else available_ram()
    cpu_cap = cpu_mem if cpu_mem is not None else available_ram()
    return {
        "gpu": Tier("gpu", device, gpu_cap),
        "cpu": Tier("cpu", torch.device("cpu"), cpu_cap, pin=pin and device.type == "cuda"),  # pinned for uploads
        "disk": DiskTier(offload_dir, disk_mem, direct_io),
    }
