"""`python -m engine.bench.offload_checks overlap|memory`: two measured claims of the offloading engine.

overlap: with weights 100% on disk (buffered reads), how much of its own all-in-memory throughput
    the engine keeps, with overlap on and off (OPT-125m shapes, batch 8, prompt 128, 16 new tokens).
memory:  peak resident memory (VmHWM) of runs the engine's plan accepts, against the plan's peak of the
    host's tiers plus the memory in use right after imports: the issue's large-block repro (OPT-125m,
    256x12 rows, cache on cpu and disk with CPU attention), small and mid-size batches, sampling, and
    weights 100% on disk with --direct-io. Each run is a fresh child process.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import tempfile

import torch

from engine import Engine, Policy
from engine.config import named_config
from engine.errors import cli_main
from engine.flags import ArgumentParser
from engine.markdown import markdown_table
from engine.storage.host_memory import process_memory
from engine.weights import load_tokenizer

ALL_IN_MEMORY = (100, 0, 100, 0, 100, 0)
WEIGHTS_ON_DISK = (0, 0, 100, 0, 100, 0)
MiB = 2**20


@dataclasses.dataclass(frozen=True)
class Case:
    """One measured run: a model (dummy weights) under a policy and budgets, `prompts` rows of `prompt` tokens."""

    name: str
    model: str
    policy: dict
    prompts: int
    prompt: int
    gen: int
    gpu_mem: str | None = None
    cpu_mem: str | None = None
    temperature: float = 0.0

    def spec(self, threads: int) -> dict:
        return {**dataclasses.asdict(self), "threads": threads}


def memory_cases(repro_prompts: int) -> list[Case]:
    """The issue's repro (at `repro_prompts` rows; 3,072 as filed) and accepted plans at other batch sizes."""
    def policy(percent, **kw) -> dict:  # the bound holds with glibc's threshold fixed (Policy.return_freed_memory)
        return Policy(return_freed_memory=True, **kw).with_percent(*percent).to_dict()

    return [
        Case("repro: 256x12, cache cpu 28.1% / disk, cpu-attn", "opt-125m",
             policy((100, 0, 0, 28.1, 100, 0), gpu_batch_size=256, num_gpu_batches=12, cpu_cache_compute=True,
                    storage_dtype="fp16"), repro_prompts, 32, 8, "2GiB", "2GiB"),
        Case("batch 8, all in memory", "opt-125m", policy(ALL_IN_MEMORY, gpu_batch_size=8), 8, 128, 16),
        Case("64x4, cache half on disk, sampling", "opt-125m",
             policy((100, 0, 50, 0, 100, 0), gpu_batch_size=64, num_gpu_batches=4, storage_dtype="fp16"),
             256, 64, 16, "1GiB", "1GiB", temperature=0.8),
        Case("batch 4, weights on disk, direct-io", "opt-350m",
             policy(WEIGHTS_ON_DISK, gpu_batch_size=4, direct_io=True, storage_dtype="fp16"), 4, 64, 8,
             "256MiB", "160MiB"),
    ]


def _run_one(spec: dict) -> dict:
    """One run in this (fresh) process: the plan, then, if the plan fits, the run; stats and memory figures.

    The baseline is taken after the imports a run makes and a tokenizer (about 100 MiB, transformers
    included), which is no part of what the engine's plan counts; the engine then loads its own, which
    counts against the plan, so the check errs on the strict side.
    """
    tokenizer = load_tokenizer(None, named_config(spec["model"]))
    torch.set_num_threads(spec["threads"])
    after_imports = process_memory("VmRSS")
    policy = Policy(**spec["policy"])
    budgets = dict(gpu_mem=spec.get("gpu_mem"), cpu_mem=spec.get("cpu_mem"))
    with tempfile.TemporaryDirectory() as offload:
        plan = Engine.plan(spec["model"], policy, weights="dummy", device="cpu", offload_dir=offload,
                           prompt_len=spec["prompt"], gen_len=spec["gen"], num_prompts=spec["prompts"], **budgets)
        out = {"after_imports": after_imports, "plan": plan.to_dict(), "shortfall": plan.shortfall}
        if plan.fits:
            with Engine.load(spec["model"], weights="dummy", policy=policy, offload_dir=offload, device="cpu",
                             **budgets) as eng:
                prompts = torch.randint(10, 50000, (spec["prompts"], spec["prompt"]),
                                        generator=torch.Generator().manual_seed(0)).tolist()
                eng.generate(prompts, max_new_tokens=spec["gen"], temperature=spec.get("temperature", 0.0))
                out["stats"] = eng.stats.to_dict()
    del tokenizer  # alive until now, so the baseline holds throughout
    return {**out, "vmhwm": process_memory("VmHWM")}


def run_child(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, "-m", "engine.bench.offload_checks", "child", json.dumps(spec)],
                          capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"child run failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def overlap(repeats: int, threads: int, storage: str) -> None:
    def case(percent, overlap: bool) -> dict:
        policy = Policy(gpu_batch_size=8, overlap=overlap, storage_dtype=storage).with_percent(*percent)
        return Case("overlap", "opt-125m", policy.to_dict(), 8, 128, 16).spec(threads)

    cases = {"all in memory": case(ALL_IN_MEMORY, True),
             "weights on disk, overlap on": case(WEIGHTS_ON_DISK, True),
             "weights on disk, overlap off": case(WEIGHTS_ON_DISK, False)}
    results: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):  # interleaved, so load on this shared machine hits every case alike
        for name, spec in cases.items():
            results[name].append(run_child(spec)["stats"]["tokens_per_s"])
    ref = max(results["all in memory"])
    print(f"OPT-125m shapes (dummy, {storage} storage, fp32 compute), batch 8, prompt 128, gen 16, {threads} threads, "
          f"best of {repeats}\n")
    print("| case | tok/s | ratio to all in memory |\n|---|---|---|")
    for name, values in results.items():
        print(f"| {name} | {max(values):.2f} | {max(values) / ref:.2f} |")


def memory(threads: int, repro_prompts: int) -> bool:
    """Print the table; True when every accepted run stayed within its plan."""
    rows, ok = [], True
    for case in memory_cases(repro_prompts):
        r = run_child(case.spec(threads))
        planned = r["plan"]["host_peak"]
        limit = r["after_imports"] + planned
        within = r["shortfall"] is None and r["vmhwm"] <= limit
        ok &= within
        pol = Policy(**case.policy)
        rows.append([case.name, f"{case.model} {pol.label()}", f"{case.prompts}x{case.prompt}+{case.gen}",
                     r["after_imports"] / MiB, planned / MiB, limit / MiB,
                     r["vmhwm"] / MiB if r["shortfall"] is None else None,
                     f"{r['vmhwm'] / limit:.0%}" if r["shortfall"] is None else "refused",
                     "yes" if within else "NO"])
    print(f"dummy weights, fp32 compute on the CPU, {threads} threads; limit = RSS after the imports and a tokenizer "
          "+ the plan's host peak (the gpu and cpu tiers, both host memory here, or loading a weight)\n")
    print(markdown_table(["case", "model, policy", "prompts", "baseline MiB", "plan MiB", "limit MiB",
                          "VmHWM MiB", "VmHWM / limit", "within"], rows, floatfmt=".0f"))
    return ok


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
    m.add_argument("--threads", type=int, default=2)
    m.add_argument("--repro-prompts", type=int, default=3072,
                   help="rows of the repro case (the issue's 3,072 take minutes on 2 cores)")
    c = sub.add_parser("child")
    c.add_argument("spec")
    args = p.parse_args(argv)
    if args.check == "child":
        print(json.dumps(_run_one(json.loads(args.spec))))
    elif args.check == "overlap":
        overlap(args.repeats, args.threads, args.storage)
    elif not memory(args.threads, args.repro_prompts):
        sys.exit(1)


if __name__ == "__main__":
    main()
