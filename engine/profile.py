"""`python -m engine.profile`: measure this machine for the cost model and write its hardware profile.

    python -m engine.profile [--out PATH] [--offload-dir DIR] [--disk-bytes 512MiB]
"""

from __future__ import annotations

from pathlib import Path

from engine.errors import UserError, cli_main
from engine.flags import ArgumentParser
from engine.planner.hardware import local_cache, write_profile
from engine.planner.measure import measure
from engine.policy import parse_size


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m engine.profile", description=__doc__.split("\n")[0])
    parser.add_argument("--out", help=f"where to write the profile JSON (default: {local_cache()})")
    parser.add_argument("--offload-dir", help="folder on the disk to measure (default: the temp folder)")
    parser.add_argument("--disk-bytes", default="512MiB", help="size of the disk test file")
    args = parser.parse_args(argv)
    disk_bytes = parse_size(args.disk_bytes)
    if disk_bytes < 16 << 20:
        raise UserError("--disk-bytes must be at least 16MiB for a meaningful disk figure")
    profile = measure(args.offload_dir, disk_bytes)
    out = Path(args.out) if args.out else local_cache()
    write_profile(profile, out)
    for key, value in profile.measured.items():
        print(f"{key:26s} {value}")
    print(f"wrote {out.expanduser()}")


if __name__ == "__main__":
    cli_main(main)()
