"""How much host memory this process may still use: the machine's, or its memory cgroup's if that is less.

Inside a capped cgroup (a container, or the benchmark's own), MemAvailable overstates the room:
the cap is what the kernel enforces, so the budgets and the up-front checks must see it.
"""

from __future__ import annotations

import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
_UNLIMITED = 1 << 60  # v1 reports "no limit" as a page-rounded 2^63


def own_cgroup_path(proc_cgroup: str, version: str) -> str:
    """Our cgroup inside the hierarchy, from /proc/self/cgroup text ('0::/a/b' or 'N:memory:/a/b')."""
    for line in proc_cgroup.splitlines():
        _, controllers, path = line.split(":", 2)
        names = controllers.split(",")
        if (version == "v2" and controllers == "") or (version == "v1" and "memory" in names):
            return path.lstrip("/")
    return ""


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _stat(path: Path, key: str) -> int:
    for line in (_read(path / "memory.stat") or "").splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            return int(value)
    return 0


def cgroup_room(root: Path = CGROUP_ROOT, proc_cgroup: str | None = None) -> int | None:
    """The least room left under the memory limits of our cgroup and its ancestors (page cache counts
    as room, since the kernel reclaims it); None where no limit applies or none can be read."""
    try:
        proc = proc_cgroup if proc_cgroup is not None else Path("/proc/self/cgroup").read_text()
    except OSError:
        return None
    if (root / "cgroup.controllers").is_file():
        base, files = root, ("memory.max", "memory.current", "file")
        rel = own_cgroup_path(proc, "v2")
    else:
        base, files = root / "memory", ("memory.limit_in_bytes", "memory.usage_in_bytes", "cache")
        rel = own_cgroup_path(proc, "v1")
    rooms = []
    parts = [p for p in rel.split("/") if p]
    for depth in range(len(parts), -1, -1):
        group = base.joinpath(*parts[:depth])
        limit, usage = _read(group / files[0]), _read(group / files[1])
        if limit is None or usage is None or limit == "max" or int(limit) >= _UNLIMITED:
            continue
        rooms.append(int(limit) - int(usage) + _stat(group, files[2]))
    return max(0, min(rooms)) if rooms else None


def available_ram() -> int:
    """Bytes of host memory available to this process now."""
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except OSError:
        pass
    if available is None:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    room = cgroup_room()
    return available if room is None else min(available, room)


def process_memory(field: str) -> int:
    """Bytes of this process's `field` in /proc/self/status (VmRSS now, VmHWM its peak so far)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(f"{field} not in /proc/self/status")
