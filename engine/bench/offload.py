"""`python -m engine.bench`: offloading throughput against HF transformers and Accelerate, in one run.

Workloads:
  offload      OPT-1.3B shapes (fp16 checkpoint, fp32 compute), prompt 128, 16 new tokens:
               (a) HF generate in RAM, uncapped; (b) Accelerate with decoder layers on disk, under the
               cap; (c) this engine in RAM at the peers' batch sizes and under the cap with its best
               policy, plus the ablations overlap off and num_gpu_batches 1.
  compression  decode-heavy and disk-bound (prompt 32, 64 new tokens, weights 100% on disk, O_DIRECT):
               4-bit weights grouped along the output (dim 0) and the input (dim 1, which on a CPU runs
               decode steps in torch's fused int4 kernel) against uncompressed, at batch 8, 32, 64,
               under the cap.

Every run is a child process in one memory cgroup, pinned to the same CPUs, started after the
page cache is dropped; runs are interleaved A B C A B C; a run that overruns --timeout is killed.
The roofline (fp32 GEMM FLOP/s, O_DIRECT disk bandwidth) is measured in the same invocation.

    python -m engine.bench --quick
    python -m engine.bench --workload offload --repeats 2
    python -m engine.bench --workload compression
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from tqdm import tqdm

from engine.bench.checkpoints import (
    CACHE_ROOT,
    checkpoint_bytes,
    checkpoint_files,
    checkpoint_param_count,
    ensure_opt_checkpoint,
)
from engine.bench.isolation import create_memory_cgroup, drop_page_cache, run_child
from engine.bench.report import (
    GiB,
    Row,
    RunConfig,
    RunRecord,
    aggregate,
    best_row,
    expected_disk_read,
    fmt,
    interleave,
    ratio,
    save_outputs,
)
from engine.bench.roofline import (
    compute_bound_tokens_per_s,
    disk_bound_tokens_per_s,
    measure_gemm,
    measure_roofline,
)
from engine.config import load_folder_config
from engine.errors import UserError, cli_main
from engine.flags import ArgumentParser, add_policy_args, policy_from_args
from engine.markdown import markdown_table
from engine.planner.measure import load_hardware
from engine.planner.search import search_policy
from engine.policy import Policy, parse_size

SYSTEMS = ("hf", "accelerate", "engine-ram", "engine")
ALL_ON_DEVICE = (100.0, 0.0, 100.0, 0.0, 100.0, 0.0)
WEIGHTS_ON_DISK = (0.0, 0.0, 100.0, 0.0, 100.0, 0.0)
# Accelerate returns freed memory to the kernel only with this; without it, it thrashes under a cap.
ACCELERATE_ENV = {"MALLOC_MMAP_THRESHOLD_": "1048576"}


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m engine.bench", description=__doc__)
    p.add_argument("--workload", choices=["offload", "compression"], default="offload")
    p.add_argument("--model", default="opt-1.3b", help="named OPT config (shapes of the dummy checkpoint)")
    p.add_argument("--checkpoint", type=Path, help="checkpoint folder (default: written once under "
                   f"{CACHE_ROOT})")
    p.add_argument("--systems", default=",".join(SYSTEMS),
                   help="a comma-separated subset of these (engine-ram: the engine in RAM at --batches)")
    p.add_argument("--prompt-len", type=int, help="default: 128 (offload), 32 (compression)")
    p.add_argument("--gen-len", type=int, help="default: 16 (offload), 64 (compression)")
    p.add_argument("--batches", help="batch sizes: the peers' and the in-RAM engine's (offload, default 1,8) "
                   "or both engine variants' (compression, default 8,32,64)")
    p.add_argument("--cap", default="3GiB", help="memory cap of the capped runs (default 3GiB)")
    p.add_argument("--reserve", default="1GiB", help="part of the cap kept for the runtime when the engine's "
                   "budgets are derived from it (default 1GiB); --gpu-mem/--cpu-mem override")
    p.add_argument("--repeats", type=int, default=2, help="interleaved repeats (default 2)")
    p.add_argument("--timeout", type=float, default=1500.0, help="seconds before a run is killed")
    p.add_argument("--no-ablation", action="store_true", help="skip overlap off / num_gpu_batches 1")
    p.add_argument("--accelerate-uncapped", action="store_true", help="also run Accelerate without the cap")
    p.add_argument("--quick", action="store_true",
                   help="a few-minute smoke run: opt-125m shapes, prompt 32, gen 8, batches 1,4, 1 repeat")
    p.add_argument("--out", type=Path, default=Path("results/bench"), help="where tables are written")
    p.add_argument("--no-save", action="store_true", help="print the tables only")
    add_policy_args(p)
    p.set_defaults(policy="auto")
    return p


def resolve_defaults(args: argparse.Namespace) -> None:
    """Fill the workload-dependent defaults (and the --quick ones) into `args`."""
    offload = args.workload == "offload"
    if args.quick:
        args.model, args.repeats, args.no_ablation = "opt-125m", 1, True
        args.prompt_len = args.prompt_len or 32
        args.gen_len = args.gen_len or 8
        args.batches = args.batches or ("1,4" if offload else "4,8")
    args.prompt_len = args.prompt_len or (128 if offload else 32)
    args.gen_len = args.gen_len or (16 if offload else 64)
    args.batches = [int(b) for b in (args.batches or ("1,8" if offload else "8,32,64")).split(",")]
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = sorted(set(args.systems) - set(SYSTEMS))
    if unknown:
        raise UserError(f"--systems: unknown {unknown}; choose from {','.join(SYSTEMS)}")
    if not offload and "engine" not in args.systems:
        raise UserError("the compression workload runs the engine only; drop --systems or include engine")
    if min(args.batches) < 1 or args.repeats < 1 or args.prompt_len < 1 or args.gen_len < 1:
        raise UserError("--batches, --repeats, --prompt-len and --gen-len must be positive")
    args.threads = args.threads or len(os.sched_getaffinity(0))
    args.cap_bytes = parse_size(args.cap)
    args.notes = []


# -- the engine's policies -------------------------------------------------------------------------

def engine_budgets(args: argparse.Namespace) -> tuple[int | None, int | None]:
    """gpu_mem and cpu_mem for capped engine runs: the user's, else the cap less the runtime reserve."""
    gpu, cpu = parse_size(args.gpu_mem), parse_size(args.cpu_mem)
    if gpu is None and cpu is None:
        room = args.cap_bytes - parse_size(args.reserve)
        if room <= 0:
            raise UserError(f"--cap {args.cap} leaves nothing after --reserve {args.reserve}; raise the cap")
        return room, room  # on a CPU the two tiers share host memory; the search counts them together
    return gpu, cpu


def base_policy(args: argparse.Namespace, capped: bool) -> Policy:
    """The user's policy options; capped runs store weights in fp16 and fix glibc's mmap threshold (each run is
    its own child, so no other system shares the setting) unless told otherwise."""
    policy = dataclasses.replace(policy_from_args(args), threads=args.threads)
    if capped and args.storage_dtype is None:
        policy = dataclasses.replace(policy, storage_dtype="fp16")
    if capped and args.return_freed_memory is None:
        policy = dataclasses.replace(policy, return_freed_memory=True)
    return policy


def best_capped_policy(args: argparse.Namespace, checkpoint: Path) -> Policy:
    """--policy manual: the options as given; auto: the policy search for the cap's budgets."""
    policy = base_policy(args, capped=True)
    if args.policy != "auto":
        return policy

    gpu, cpu = engine_budgets(args)
    found = search_policy(load_folder_config(checkpoint), load_hardware(args.hardware),
                          prompt_len=args.prompt_len, gen_len=args.gen_len, gpu_mem=gpu, cpu_mem=cpu,
                          compress_weight=policy.compress_weight, compress_cache=policy.compress_cache,
                          base=policy)
    return found.policy


# -- the plans --------------------------------------------------------------------------------------

def offload_plan(args: argparse.Namespace, checkpoint: Path) -> list[RunConfig]:
    """(a) HF in RAM, (b) Accelerate under the cap, (c) the engine in RAM and under the cap, + ablations."""
    cap = args.cap_bytes
    configs: list[RunConfig] = []
    if "hf" in args.systems:
        configs += [RunConfig(f"hf/ram/B{b}", "HF transformers, in RAM", "hf", b, None, tags=("hf",))
                    for b in args.batches]
    if "accelerate" in args.systems:
        caps = [cap, None] if args.accelerate_uncapped else [cap]
        configs += [RunConfig(f"accelerate/{'cap' if c else 'ram'}/B{b}", "Accelerate, layers on disk",
                              "accelerate", b, c, tags=("accelerate",)) for c in caps for b in args.batches]
    if "engine-ram" in args.systems:
        in_ram = base_policy(args, capped=False).with_percent(*ALL_ON_DEVICE)
        for b in args.batches:
            p = dataclasses.replace(in_ram, gpu_batch_size=b, num_gpu_batches=1)
            configs.append(RunConfig(f"engine/ram/B{b}", f"engine in RAM ({p.label()})", "engine", b,
                                     None, policy=p.to_dict(), tags=("engine",)))
    if "engine" in args.systems:
        best = best_capped_policy(args, checkpoint)
        gpu, cpu = engine_budgets(args)
        variants = [("best", "engine, best policy", best)]
        if not args.no_ablation:
            variants.append(("no-overlap", "ablation: overlap off", dataclasses.replace(best, overlap=False)))
            if best.num_gpu_batches > 1:
                variants.append(("ngb1", "ablation: num_gpu_batches 1",
                                 dataclasses.replace(best, num_gpu_batches=1)))
            else:
                args.notes.append("ablation num_gpu_batches 1 skipped: the best policy already has it")
        for key, label, p in variants:
            configs.append(RunConfig(f"engine/cap/{key}", f"{label} ({p.label()})", "engine",
                                     p.block_size, cap, policy=p.to_dict(), gpu_mem=gpu, cpu_mem=cpu,
                                     tags=("engine", "best") if key == "best" else ("engine", "ablation")))
    return configs


def compression_plan(args: argparse.Namespace) -> list[RunConfig]:
    """Uncompressed vs 4-bit weights grouped along each dimension, weights 100% on disk with O_DIRECT,
    at each batch, under the cap."""
    base = dataclasses.replace(base_policy(args, capped=True), direct_io=True, num_gpu_batches=1)
    if not args.percent:
        base = base.with_percent(*WEIGHTS_ON_DISK)
    gpu, cpu = engine_budgets(args)
    variants = [("uncompressed", {"compress_weight": False}),
                *[(f"compressed-dim{d}", {"compress_weight": True, "comp_weight_dim": d}) for d in (0, 1)]]
    configs = []
    for b in args.batches:
        for name, change in variants:
            p = dataclasses.replace(base, gpu_batch_size=b, **change)
            configs.append(RunConfig(f"engine/{name}/B{b}", f"engine, {name} ({p.label()})", "engine",
                                     b, args.cap_bytes, policy=p.to_dict(), gpu_mem=gpu, cpu_mem=cpu,
                                     tags=(name,)))
    return configs


# -- running ----------------------------------------------------------------------------------------

def run_one(config: RunConfig, repeat: int, args: argparse.Namespace, checkpoint: Path, workdir: Path,
            cgroup, cpus: set[int]) -> RunRecord:
    """Drop the page cache, then run `config` once in a pinned child inside the cgroup."""
    tag = f"{config.key.replace('/', '_')}_r{repeat}"
    offload = workdir / f"offload_{tag}"
    spec = {"system": config.system, "checkpoint": str(checkpoint), "batch": config.batch,
            "prompt_len": args.prompt_len, "gen_len": args.gen_len, "vocab": args.vocab, "seed": 0,
            "threads": args.threads, "policy": config.policy, "gpu_mem": config.gpu_mem,
            "cpu_mem": config.cpu_mem,
            "offload_dir": str(args.offload_dir or offload), "result": str(workdir / f"{tag}.json")}
    spec_path = workdir / f"{tag}.spec.json"
    spec_path.write_text(json.dumps(spec))
    threads = str(args.threads)
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, TQDM_DISABLE="1")
    if config.system == "accelerate":
        env.update(ACCELERATE_ENV)
    cache_drop = drop_page_cache(checkpoint_files(checkpoint))
    outcome = run_child([sys.executable, "-m", "engine.bench.child", str(spec_path)], env=env, cpus=cpus,
                        cgroup=cgroup, limit_bytes=config.cap_bytes, timeout_s=args.timeout,
                        log_path=workdir / f"{tag}.log")
    shutil.rmtree(offload, ignore_errors=True)
    result_path = Path(spec["result"])
    result = json.loads(result_path.read_text()) if result_path.is_file() else {}
    if outcome.timed_out:
        status = "timeout"
    elif outcome.oom_killed:
        status = "oom"
    elif "error" in result:
        status = "error"
    elif outcome.returncode != 0 or not result:
        status = "crashed"
    else:
        status = "ok"
    return RunRecord(config.key, repeat, status, outcome.wall_s, outcome.max_rss_bytes,
                     outcome.disk_read_bytes, outcome.cgroup_peak_bytes, cache_drop, result)


# -- tables -----------------------------------------------------------------------------------------

def table(rows: list[Row], args: argparse.Namespace, roof: dict,
          ckpt_bytes: int) -> tuple[list[str], list[list[str]]]:
    bound = compute_bound_tokens_per_s(roof["gemm_flops"], args.params, args.prompt_len, args.gen_len)
    if args.workload == "offload":
        accel = best_row(rows, lambda r: r.config.system == "accelerate" and r.config.cap_bytes is not None)
        refs = [("× HF same B", lambda r: next((x for x in rows if x.config.system == "hf"
                                                 and x.config.batch == r.batch), None)),
                ("× Accel. capped (best)", lambda r: accel)]
    else:
        refs = [("× uncompressed same B", lambda r: next((x for x in rows if "uncompressed" in x.config.tags
                                                           and x.config.batch == r.config.batch), None))]
    header = ["system", "cap", "batch", "tok/s (median)", "min–max", *[t for t, _ in refs], "% compute bound",
              "disk-bound tok/s", "load s", "prefill / decode s", "disk read GB", "needed GB", "peak RSS GiB",
              "status"]
    body = []
    for row in rows:
        speeds = [r.tokens_per_s for r in row.ok]
        disk_bytes = row.median_of(lambda r: r.result.get("system_disk_read_bytes"))
        gen_tokens = row.median_of(lambda r: r.result.get("generated_tokens"))
        disk_bound = (disk_bound_tokens_per_s(roof["disk_read_bw"], disk_bytes, gen_tokens)
                      if disk_bytes and gen_tokens else None)
        tps = row.tokens_per_s
        body.append([
            row.config.label,
            fmt(row.config.cap_bytes, ".1f", GiB, " GiB") if row.config.cap_bytes else "none",
            str(row.batch), fmt(tps), f"{min(speeds):.2f}–{max(speeds):.2f}" if speeds else "—",
            *[fmt(ratio(row, ref(row)), ".2f", suffix="×") for _, ref in refs],
            fmt(100 * tps / bound if tps else None, ".0f", suffix="%"), fmt(disk_bound),
            fmt(row.median_of(lambda r: r.result.get("load_s"))),
            phases(row),
            fmt(row.median_of(lambda r: r.disk_read_bytes), ".2f", 1e9),
            fmt(row.median_of(lambda r: expected_disk_read(r.result, ckpt_bytes)), ".2f", 1e9),
            fmt(max((r.max_rss_bytes for r in row.records), default=None), ".2f", GiB),
            row.status(ckpt_bytes)])
    return header, body


def phases(row: Row) -> str:
    """The engine's own prefill and decode seconds (median), which say where its time went."""
    times = [row.median_of(lambda r, k=k: r.result.get("engine_stats", {}).get(k)) for k in ("prefill_s", "decode_s")]
    return "—" if None in times else f"{times[0]:.1f} / {times[1]:.1f}"


def conditions(args: argparse.Namespace, roof: dict, cgroup, records: list[RunRecord], cpus: set[int]) -> str:
    bound = compute_bound_tokens_per_s(roof["gemm_flops"], args.params, args.prompt_len, args.gen_len)
    drops = sorted({r.cache_drop for r in records})
    return "\n".join([
        f"- workload: {args.workload}, {args.model} shapes ({args.params / 1e9:.2f}B params, fp16 "
        f"checkpoint, fp32 compute), prompt {args.prompt_len}, gen {args.gen_len}, "
        f"{args.repeats} interleaved repeat(s)",
        f"- roofline: fp32 GEMM {roof['gemm_flops'] / 1e9:.0f} GFLOP/s (best of {len(roof['gemm_probes'])} "
        f"probes, one before each run; slowest {min(roof['gemm_probes']) / 1e9:.0f}), disk read "
        f"{roof['disk_read_bw'] / 1e9:.2f} GB/s ({roof['disk_method']}); compute bound "
        f"gen·F/(2·P·(prompt+gen)) = {bound:.2f} tok/s",
        f"- isolation: {cgroup.note}; page cache: {', '.join(drops)}; threads {args.threads} pinned to CPUs "
        f"{sorted(cpus)}; Accelerate env {ACCELERATE_ENV}; timeout {args.timeout:.0f} s per run",
        "- disk read = bytes the child made the block layer read (rusage, imports included); needed = its "
        "imports + one checkpoint pass + the system's own offload reads;",
        "  THRASHING = read > 2× needed + 256 MiB",
        *[f"- {note}" for note in args.notes],
    ])


def failures(records: list[RunRecord]) -> str | None:
    """None when every run finished ok, else one line naming those that did not and why (oom, timeout, ...):
    a row that ran out of memory must fail the benchmark, not only show in its table."""
    bad = [f"{r.key} r{r.repeat}: {r.status}" for r in records if r.status != "ok"]
    return f"{len(bad)} of {len(records)} runs did not finish ok ({', '.join(bad)})" if bad else None


@cli_main
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    resolve_defaults(args)

    checkpoint = args.checkpoint or ensure_opt_checkpoint(args.model)
    if not (Path(checkpoint) / "config.json").is_file():
        raise UserError(f"--checkpoint {checkpoint}: no config.json; give a HF checkpoint folder")
    args.params, args.vocab = checkpoint_param_count(checkpoint), json.loads(
        (Path(checkpoint) / "config.json").read_text())["vocab_size"]
    ckpt_bytes = checkpoint_bytes(checkpoint)
    cpus = set(sorted(os.sched_getaffinity(0))[:args.threads])
    configs = offload_plan(args, checkpoint) if args.workload == "offload" else compression_plan(args)
    cgroup = create_memory_cgroup("flexhelm-bench")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the child and the cgroup are cleaned up
    workdir = Path(tempfile.mkdtemp(prefix="flexhelm-bench-"))
    records: list[RunRecord] = []
    try:
        roof = measure_roofline(args.threads, cpus, workdir)
        plan = interleave(configs, args.repeats)
        with tqdm(plan, desc="bench", unit="run") as progress:
            for repeat, config in progress:
                progress.set_postfix_str(config.key)
                roof["gemm_probes"].append(measure_gemm(args.threads, cpus))
                roof["gemm_flops"] = max(roof["gemm_probes"])
                records.append(run_one(config, repeat, args, checkpoint, workdir, cgroup, cpus))
                rec = records[-1]
                tqdm.write(f"{config.key} r{repeat}: {rec.status}, "
                           f"{fmt(rec.tokens_per_s)} tok/s, read {rec.disk_read_bytes / 1e9:.2f} GB, "
                           f"peak RSS {rec.max_rss_bytes / GiB:.2f} GiB")
    finally:  # also when interrupted: a killed child leaves its offload files behind
        cgroup.remove()
        for folder in workdir.glob("offload_*"):
            shutil.rmtree(folder, ignore_errors=True)
    rows = aggregate(configs, records)
    header, body = table(rows, args, roof, ckpt_bytes)
    markdown = markdown_table(header, body) + "\n\n" + conditions(args, roof, cgroup, records, cpus)
    print(markdown)
    failed = failures(records)
    if not failed:
        shutil.rmtree(workdir, ignore_errors=True)
    if not args.no_save:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        stem = f"{args.workload}-{args.model}-p{args.prompt_len}g{args.gen_len}-{stamp}"
        meta = {"argv": sys.argv, "roofline": roof, "cgroup": cgroup.note, "params": args.params,
                "checkpoint": str(checkpoint), "configs": [dataclasses.asdict(c) for c in configs]}
        paths = save_outputs(args.out, stem, markdown, header, body, meta, records)
        print(f"\nwrote {', '.join(str(p) for p in paths)}")
    if failed:
        raise UserError(f"{failed}; their logs are in {workdir}")
