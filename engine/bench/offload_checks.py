"""`python -m engine.bench.offload_checks overlap|memory`: two measured claims of the offloading engine.

overlap: with weights 100% on disk (buffered reads), how much of its own all-in-memory throughput
    the engine keeps, with overlap on and off (OPT-125m shapes, batch 8, prompt 128, 16 new tokens).
memory:  peak resident memory (VmHWM) of a run with weights 100% on disk, --direct-io and small
    budgets, against the budgets plus the memory in use right after imports (OPT-350m shapes, fp16).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile

import torch

from engine import Engine, Policy
from engine.errors import cli_main
from engine.flags import ArgumentParser
from engine.policy import parse_size
from engine.storage.host_memory import process_memory

ALL_IN_MEMORY = (100, 0, 100, 0, 100, 0)
WEIGHTS_ON_DISK = (0, 0, 100, 0, 100, 0)


def _run_one(spec: dict) -> dict:
    """One measured run in this (fresh) process; returns stats and memory figures."""

    torch.set_num_threads(spec["threads"])
    after_imports = process_memory("VmRSS")
    policy = Policy(gpu_batch_size=spec["batch"], overlap=spec["overlap"], direct_io=spec["direct_io"],
                    storage_dtype=spec["storage"]).with_percent(*spec["percent"])
    with tempfile.TemporaryDirectory() as offload:
        with Engine.load(spec["model"], weights="dummy", policy=policy, offload_dir=offload,
                         gpu_mem=spec.get("gpu_mem"), cpu_mem=spec.get("cpu_mem")) as eng:
            prompts = torch.randint(10, 50000, (spec["batch"], spec["prompt"]), generator=torch.Generator()
                                    .manual_seed(0)).tolist()
            eng.generate(prompts, max_new_tokens=spec["gen"])
            stats = eng.stats
    return {"stats": stats.to_dict(), "after_imports": after_imports, "vmhwm": process_memory("VmHWM")}


def run_child(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, "-m", "engine.bench.offload_checks", "child", json.dumps(spec)],
                          capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"child run failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def overlap(repeats: int, threads: int, storage: str) -> None:
    base = dict(model="opt-125m", batch=8, prompt=128, gen=16, direct_io=False, storage=storage, threads=threads)
    cases = {"all in memory": dict(percent=ALL_IN_MEMORY, overlap=True),
             "weights on disk, overlap on": dict(percent=WEIGHTS_ON_DISK, overlap=True),
             "weights on disk, overlap off": dict(percent=WEIGHTS_ON_DISK, overlap=False)}
    results: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):  # interleaved, so load on this shared machine hits every case alike
        for name, case in cases.items():
            results[name].append(run_child({**base, **case})["stats"]["tokens_per_s"])
    ref = max(results["all in memory"])
    print(f"OPT-125m shapes (dummy, {storage} storage, fp32 compute), batch 8, prompt 128, gen 16, {threads} threads, "
          f"best of {repeats}\n")
    print("| case | tok/s | ratio to all in memory |\n|---|---|---|")
    for name, values in results.items():
        print(f"| {name} | {max(values):.2f} | {max(values) / ref:.2f} |")


def memory(gpu_mem: str, cpu_mem: str, threads: int) -> None:
    spec = dict(model="opt-350m", batch=4, prompt=64, gen=8, direct_io=True, storage="fp16", threads=threads,
                percent=WEIGHTS_ON_DISK, overlap=True, gpu_mem=gpu_mem, cpu_mem=cpu_mem)
    r = run_child(spec)
    budgets = parse_size(gpu_mem) + parse_size(cpu_mem)
    limit = r["after_imports"] + budgets + 300 * 2**20
    mib = 2**20
    print("OPT-350m shapes (dummy, fp16 storage: 663 MB of weights), weights 100% on disk, --direct-io\n")
    print("| after imports | budgets (gpu+cpu) | VmHWM | limit (imports + budgets + 300 MiB) | within |")
    print("|---|---|---|---|---|")
    print(f"| {r['after_imports'] / mib:.0f} MiB | {budgets / mib:.0f} MiB | {r['vmhwm'] / mib:.0f} MiB | "
          f"{limit / mib:.0f} MiB | {r['vmhwm'] <= limit} |")
    print(f"\nengine peaks: { {t: f'{v / mib:.0f} MiB' for t, v in r['stats']['peak_bytes'].items()} }")


@cli_main
def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(prog="python -m engine.bench.offload_checks", description=__doc__)
    sub = p.add_subparsers(dest="check", required=True)
    o = sub.add_parser("overlap")
    o.add_argument("--repeats", type=int, default=2)
    o.add_argument("--threads", type=int, default=2)
    o.add_argument("--storage", choices=["fp32", "fp16"], default="fp32",
                   help="how weights are stored on every tier (compute is fp32 either way)")
    m = sub.add_parser("memory")
    m.add_argument("--gpu-mem", default="256MiB")
    m.add_argument("--cpu-mem", default="160MiB")
    m.add_argument("--threads", type=int, default=2)
    c = sub.add_parser("child")
    c.add_argument("spec")
    args = p.parse_args(argv)
    if args.check == "child":
        print(json.dumps(_run_one(json.loads(args.spec))))
    elif args.check == "overlap":
        overlap(args.repeats, args.threads, args.storage)
    else:
        memory(args.gpu_mem, args.cpu_mem, args.threads)


if __name__ == "__main__":
    main()
