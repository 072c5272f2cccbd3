"""`python -m engine.bench.gpu_bench` (or `python scripts/gpu_bench.py`): the GPU path's checks in one run.

    python -m engine.bench.gpu_bench                  # on a GPU machine; about 8 minutes
    python -m engine.bench.gpu_bench --cpu --out DIR  # the same steps at tiny shapes, to test the script

1. Exactness: the placement-policy matrix on CUDA against HF (engine.bench.gpu_check).
2. OPT-1.3B shapes in fp16, everything on the GPU, prompt 128, 32 new tokens, B=1 and B=32: the engine
   against HF `generate`, in one process, with decode steps replayed as CUDA graphs and without
   (`--no-cuda-graphs`).
3. OPT-30B shapes on dummy weights with the GPU capped at 16 GiB for both systems, FlexGen's paper policy
   (20 80 0 100 0 100, 48x3, CPU attention), prompt 512: the engine against FlexGen 0.1.8, each in a
   process of its own. Both run the same `--layers` (a host cannot hold the full model's 48 layers next
   to the paper block's 108 GB KV cache) and the same batch.
4. `harness.run --suite flexgen-paper` on OPT-30B dummy weights, where crfm-helm is installed.

Every row goes to `OUT/gpu_bench.json` and the table to `OUT/gpu_bench.md` (default results/reference/gpu).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from engine import Engine, Policy
from engine.bench import flexgen_peer, gpu_check
from engine.config import named_config
from engine.flags import ArgumentParser
from engine.markdown import markdown_table

GIB = 1 << 30
PAPER_PERCENT = (20, 80, 0, 100, 0, 100)
OPT_30B = {"model_type": "opt", "hidden_size": 7168, "ffn_dim": 28672, "num_attention_heads": 56,
           "vocab_size": 50272, "max_position_embeddings": 2048, "do_layer_norm_before": True}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def hf_tokens_per_s(model, batch: int, prompt_len: int, gen_len: int, device: str) -> float:
    """HF greedy generate of `gen_len` tokens for a batch of random prompts, after a short warm-up."""
    ids = torch.randint(10, 50000, (batch, prompt_len), device=device)
    model.generate(ids, max_new_tokens=2, min_new_tokens=2, do_sample=False)
    _sync()
    start = time.perf_counter()
    model.generate(ids, max_new_tokens=gen_len, min_new_tokens=gen_len, do_sample=False)
    _sync()
    return batch * gen_len / (time.perf_counter() - start)


def engine_tokens_per_s(eng: Engine, batch: int, prompt_len: int, gen_len: int) -> float:
    prompts = torch.randint(10, 50000, (batch, prompt_len)).tolist()
    eng.generate(prompts, max_new_tokens=2)
    eng.generate(prompts, max_new_tokens=gen_len)
    return eng.stats.tokens_per_s


def in_gpu_rows(model: str, batches: tuple[int, ...], prompt_len: int, gen_len: int, device: str) -> list[dict]:
    """Everything on the device: HF eager `generate` and the engine, one after the other in this process."""
    from transformers import OPTConfig, OPTForCausalLM

    cfg = named_config(model)
    hf_cfg = {**OPT_30B, "hidden_size": cfg.hidden, "ffn_dim": cfg.ffn, "num_attention_heads": cfg.n_heads,
              "num_hidden_layers": cfg.n_layers}
    dtype = torch.float16 if device == "cuda" else torch.float32
    hf = OPTForCausalLM(OPTConfig(**{k: v for k, v in hf_cfg.items() if k != "model_type"})).to(device, dtype).eval()
    hf_rate = {b: hf_tokens_per_s(hf, b, prompt_len, gen_len, device) for b in batches}
    del hf
    if device == "cuda":
        torch.cuda.empty_cache()
    rows = []
    for b in batches:
        for graphs, system in ((True, "engine vs HF generate"), (False, "engine --no-cuda-graphs vs HF generate")):
            policy = Policy(gpu_batch_size=b, cuda_graphs=graphs)
            with Engine.load(model, weights="dummy", policy=policy, device=device) as eng:
                rate = engine_tokens_per_s(eng, b, prompt_len, gen_len)
                failed = eng._rt.graph_failures  # a capture that failed ran eagerly: the row says so
            rows.append({"check": f"{model} all on {device}", "system": system, "batch": b, "tok/s": rate,
                         "peer tok/s": hf_rate[b], "ratio": rate / hf_rate[b],
                         **({"error": f"graph capture failed: {failed[0]}"} if failed else {})})
    return rows


def offload_child(spec: dict) -> dict:
    """One system on OPT-30B shapes with `spec['layers']` layers, in this (fresh) process."""
    device = spec["device"]
    if device == "cuda":
        torch.cuda.set_per_process_memory_fraction(min(1.0, 16 * GIB / torch.cuda.mem_get_info()[1]), 0)
    percent, (gbs, ngb) = tuple(spec["percent"]), spec["block"]
    with tempfile.TemporaryDirectory() as tmp:
        if spec["system"] == "flexgen":
            run = flexgen_peer.run_opt("facebook/opt-30b", spec["layers"], percent, gbs, ngb, True, spec["compress"],
                                       spec["prompt_len"], spec["gen_len"], Path(tmp))
            return {**asdict(run), "tokens_per_s": run.tokens_per_s}
        folder = Path(tmp) / "opt-30b-shapes"
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({**OPT_30B, **spec.get("shape", {}),
                                                        "num_hidden_layers": spec["layers"]}))
        policy = Policy(gpu_batch_size=gbs, num_gpu_batches=ngb, cpu_cache_compute=True,  # FlexGen's cache scheme
                        compress_weight=spec["compress"], compress_cache=spec["compress"],
                        comp_cache_keys="token").with_percent(*percent)
        with Engine.load(folder, weights="dummy", policy=policy, device=device, offload_dir=tmp,
                         gpu_mem=spec["gpu_mem"]) as eng:
            prompts = [[2] * spec["prompt_len"]] * (gbs * ngb)
            eng.generate([[2] * 32] * (gbs * ngb), max_new_tokens=1)
            eng.generate(prompts, max_new_tokens=spec["gen_len"])
            s = eng.stats
            return {"prefill_s": s.prefill_s, "decode_s": s.decode_s, "generated_tokens": s.generated_tokens,
                    "tokens_per_s": s.tokens_per_s, "peak_bytes": s.peak_bytes}


def in_child(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, "-m", "engine.bench.gpu_bench", "--child", json.dumps(spec)],
                          capture_output=True, text=True, timeout=spec.get("timeout", 600))
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def offload_rows(args, device: str) -> list[dict]:
    rows = []
    for compress in (False, True) if args.compress else (False,):
        spec = {"device": device, "layers": args.layers, "percent": PAPER_PERCENT, "block": args.block,
                "prompt_len": args.prompt_len, "gen_len": args.gen_len, "compress": compress, "gpu_mem": "16GiB"}
        if device == "cpu":  # the script's own test: tiny shapes, and no peer (FlexGen needs CUDA)
            spec.update(shape={"hidden_size": 64, "ffn_dim": 256, "num_attention_heads": 4}, gpu_mem="1GiB")
        mine = in_child({**spec, "system": "engine"})
        peer = in_child({**spec, "system": "flexgen"}) if device == "cuda" else {"error": "FlexGen needs CUDA"}
        ratio = mine["tokens_per_s"] / peer["tokens_per_s"] if "error" not in mine and "error" not in peer else None
        rows.append({"check": f"OPT-30B shapes, {args.layers} layers, 16 GiB GPU, paper policy"
                              + (", 4-bit" if compress else ""),
                     "system": "engine vs FlexGen 0.1.8", "batch": args.block[0] * args.block[1],
                     "tok/s": mine.get("tokens_per_s"), "peer tok/s": peer.get("tokens_per_s"), "ratio": ratio,
                     "engine": mine, "flexgen": peer})
    return rows


def harness_row(device: str) -> dict:
    if importlib.util.find_spec("helm") is None:  # the engine never imports HELM; the harness runs as a command
        return {"check": "harness.run flexgen-paper, opt-30b dummy", "system": "harness", "error": "crfm-helm missing"}
    cmd = [sys.executable, "-m", "harness.run", "--suite", "flexgen-paper", "--model", "opt-30b", "--weights", "dummy",
           "--gpu-mem", "16GiB", "--policy", "auto", "--max-eval-instances", "5"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    return {"check": "harness.run flexgen-paper, opt-30b dummy", "system": "harness", "returncode": proc.returncode,
            "seconds": time.perf_counter() - start, "tail": proc.stdout[-2000:] + proc.stderr[-1000:]}


def _note(row: dict) -> str:
    """Why a row has no figure: its own error, or either system's."""
    errors = [row.get("error")] + [f"{k}: {row[k]['error']}" for k in ("engine", "flexgen")
                                   if isinstance(row.get(k), dict) and "error" in row[k]]
    return "; ".join(e for e in errors if e)


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m engine.bench.gpu_bench", description=__doc__)
    p.add_argument("--cpu", action="store_true", help="run every step at tiny shapes on the CPU (tests the script)")
    p.add_argument("--out", default="results/reference/gpu", help="folder for gpu_bench.json and gpu_bench.md")
    p.add_argument("--layers", type=int, default=8, help="decoder layers of the OPT-30B-shaped model, both systems")
    p.add_argument("--block", type=int, nargs=2, default=(48, 3), metavar=("GBS", "NGB"))
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--gen-len", type=int, default=32)
    p.add_argument("--compress", action="store_true", help="also run 4-bit weights and cache")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(offload_child(json.loads(args.child))))
        return 0
    device = "cpu" if args.cpu else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device; run with --cpu to test the script here", file=sys.stderr)
        return 1
    if args.cpu:
        args.layers, args.block, args.prompt_len, args.gen_len = 2, (2, 2), 16, 4
    meta = {"torch": torch.__version__, "host": platform.node(), "date": time.strftime("%Y-%m-%d %H:%M"),
            "gpu": torch.cuda.get_device_name() if device == "cuda" else "none"}
    failures = 0
    if device == "cuda":
        with tempfile.TemporaryDirectory() as tmp:
            folders = gpu_check.checkpoints(Path(tmp) / "ckpt")
            failures = gpu_check.correctness(folders, Path(tmp)) + gpu_check.compressed_cache(folders, Path(tmp))
    meta["exactness_failures"] = failures
    rows = in_gpu_rows("opt-1.3b" if device == "cuda" else "opt-125m", (1, 32) if device == "cuda" else (1, 4),
                       128 if device == "cuda" else 16, 32 if device == "cuda" else 4, device)
    rows += offload_rows(args, device)
    rows.append(harness_row(device) if device == "cuda" else {"check": "harness.run", "system": "harness",
                                                                "error": "GPU only"})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_bench.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
    header = ["check", "system", "batch", "tok/s", "peer tok/s", "ratio", "note"]
    table = markdown_table(header, [[r["check"], r["system"], r.get("batch"), r.get("tok/s"), r.get("peer tok/s"),
                                     r.get("ratio"), _note(r)] for r in rows], floatfmt=".3g")
    (out / "gpu_bench.md").write_text(f"{meta}\n\nexactness failures: {failures}\n\n{table}\n")
    print(table)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
