"""Fair conditions for benchmark runs: a memory cgroup, a cold page cache, pinned CPUs, timeouts.

The page cache hides the disk tier, so an offloading benchmark is only honest when every
system runs under the same memory cap with a cold cache. Each run is a child process placed
in one shared memory cgroup (v2 or v1, whichever this kernel offers us); its CPU set is fixed,
and it is killed with its whole process group when it overruns its time. The kernel's own
per-process accounting (rusage) gives its peak RSS and the bytes it read from disk, even when
the run was killed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from engine.storage.host_memory import CGROUP_ROOT, own_cgroup_path

POLL_S = 0.2


@dataclass
class MemoryCgroup:
    """One memory cgroup the benchmark's children run in; `path` None means no cap is possible."""

    path: Path | None
    version: str  # "v2", "v1" or "none"
    note: str

    def set_limit(self, limit_bytes: int | None) -> None:
        """Cap the group (None: no cap). Also resets the peak counter where the kernel allows."""
        if self.path is None:
            return
        if self.version == "v2":
            (self.path / "memory.max").write_text("max" if limit_bytes is None else str(limit_bytes))
            with contextlib.suppress(OSError):  # resettable since Linux 6.12
                (self.path / "memory.peak").write_text("0")
        else:
            limit = "-1" if limit_bytes is None else str(limit_bytes)
            (self.path / "memory.limit_in_bytes").write_text(limit)
            with contextlib.suppress(OSError):
                (self.path / "memory.max_usage_in_bytes").write_text("0")

    def peak_bytes(self) -> int | None:
        """The group's peak charge since the last reset, page cache included."""
        if self.path is None:
            return None
        name = "memory.peak" if self.version == "v2" else "memory.max_usage_in_bytes"
        with contextlib.suppress(OSError, ValueError):
            return int((self.path / name).read_text())
        return None

    def oom_kills(self) -> int:
        if self.path is None:
            return 0
        name = "memory.events" if self.version == "v2" else "memory.oom_control"
        with contextlib.suppress(OSError):
            return parse_oom_kills((self.path / name).read_text())
        return 0

    def join(self) -> None:
        """Move the calling process into the group (used in the child before exec)."""
        if self.path is not None:
            (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def remove(self) -> None:
        if self.path is not None:
            with contextlib.suppress(OSError):
                self.path.rmdir()


def parse_oom_kills(text: str) -> int:
    """The `oom_kill N` counter of v2 memory.events or v1 memory.oom_control."""
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill":
            return int(value)
    return 0


def create_memory_cgroup(prefix: str, root: Path = CGROUP_ROOT) -> MemoryCgroup:
    """Create the memory cgroup `prefix-<pid>` below our own one (so the machine's own limits still apply).

    Empty groups of the same prefix left by killed runs are removed. Falls back to no cgroup, with
    the reason in `note`, where the hierarchy is read-only or has no memory controller.
    """
    proc = Path("/proc/self/cgroup").read_text()
    candidates = []
    if (root / "cgroup.controllers").is_file():
        candidates.append(("v2", root / own_cgroup_path(proc, "v2")))
    if (root / "memory" / "memory.limit_in_bytes").is_file():
        candidates.append(("v1", root / "memory" / own_cgroup_path(proc, "v1")))
    reasons = []
    for version, parent in candidates:
        path = parent / f"{prefix}-{os.getpid()}"
        try:
            for stale in parent.glob(f"{prefix}-*"):
                owner = stale.name.rsplit("-", 1)[-1]
                if not (owner.isdigit() and Path(f"/proc/{owner}").exists()):
                    with contextlib.suppress(OSError):  # rmdir refuses a group that still has processes
                        stale.rmdir()
            path.mkdir(exist_ok=True)
            probe = "memory.max" if version == "v2" else "memory.limit_in_bytes"
            if not (path / probe).is_file():
                path.rmdir()
                reasons.append(f"{version}: no memory controller delegated at {parent}")
                continue
            group = MemoryCgroup(path, version, f"cgroup {version} at {path}")
            group.set_limit(None)
            return group
        except OSError as err:
            reasons.append(f"{version}: {err.strerror} at {parent}")
    why = "; ".join(reasons) or f"no memory cgroup hierarchy under {root}"
    return MemoryCgroup(None, "none", f"NO memory cap possible ({why}); capped runs are uncapped")


def drop_page_cache(files: Iterable[Path] = ()) -> str:
    """Evict `files` from the page cache (fadvise) and, where permitted, drop the whole cache.

    Returns how it was done, for the report.
    """
    os.sync()
    evicted = 0
    for path in files:
        with contextlib.suppress(OSError):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                evicted += 1
            finally:
                os.close(fd)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3")
        return "drop_caches"
    except OSError:
        return f"fadvise DONTNEED on {evicted} files only (drop_caches not permitted)"


@dataclass
class ChildOutcome:
    returncode: int
    timed_out: bool
    wall_s: float
    max_rss_bytes: int
    disk_read_bytes: int
    cgroup_peak_bytes: int | None
    oom_killed: bool


def run_child(argv: Sequence[str], *, env: dict[str, str], cpus: set[int], cgroup: MemoryCgroup,
              limit_bytes: int | None, timeout_s: float, log_path: Path) -> ChildOutcome:
    """Run `argv` in `cgroup` under `limit_bytes`, pinned to `cpus`; kill it after `timeout_s`."""
    cgroup.set_limit(limit_bytes)
    ooms = cgroup.oom_kills()

    def enter() -> None:  # runs in the child between fork and exec
        cgroup.join()
        os.sched_setaffinity(0, cpus)

    start = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(list(argv), env=env, stdout=log, stderr=subprocess.STDOUT,
                                preexec_fn=enter, start_new_session=True)
        timed_out, reaped = False, False
        try:
            while True:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    reaped = True
                    break
                if time.monotonic() - start > timeout_s:
                    timed_out = True
                    break
                time.sleep(POLL_S)
        finally:  # on a timeout, and when we are interrupted: the child's session must not outlive us
            if not reaped:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)  # we reaped it; tell Popen
    return ChildOutcome(
        returncode=proc.returncode, timed_out=timed_out, wall_s=time.monotonic() - start,
        max_rss_bytes=usage.ru_maxrss * 1024, disk_read_bytes=usage.ru_inblock * 512,
        cgroup_peak_bytes=cgroup.peak_bytes(), oom_killed=cgroup.oom_kills() > ooms)
