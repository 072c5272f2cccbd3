"""`python -m engine.bench.decode_ops`: what one decode step costs the host, against HF eager at the same shapes.

On a GPU a decode step at small batch is bound by the host: by how many ops it issues and how often it
waits, not by the device's arithmetic. So this counts the ATen ops of one decode step, for the engine
(everything on the compute device) and for HF transformers' `generate` at the same shapes, two ways:

- dispatcher calls, as torch.profiler records them: every `aten::` call the host makes, composite ops
  and calls that do nothing (a `.to()` to where a tensor already is) included;
- ops below autograd, as a `TorchDispatchMode` sees them: what composite ops decompose into.

A step's count is the difference between generating n+1 and n tokens, so it holds whatever a call
does once (tokenizing, prefill, setup). Counts are deterministic: tests bound them
(tests/engine/test_decode_step.py). Then throughput: the engine in RAM against HF `generate` on the same
weights (HF's, saved and loaded by the engine), fp32, the same thread count, in one process, runs
alternating, best of `--repeat`; every run's greedy tokens must equal HF's. Nothing process-wide is
changed for either (the engine's `return_freed_memory` stays off, as by default).

    python -m engine.bench.decode_ops                 OPT-125m shapes, random weights, B=8, prompt 128, gen 16
    python -m engine.bench.decode_ops --repeat 5 --batch 8 --prompt 128 --gen 16
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

from engine.api import Engine
from engine.errors import cli_main
from engine.flags import ArgumentParser
from engine.markdown import markdown_table
from engine.policy import Policy


class _Dispatched(TorchDispatchMode):
    """Counts the ops that reach below autograd on this thread."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def dispatched_ops(fn: Callable[[], object]) -> int:
    with _Dispatched() as mode:
        fn()
    return mode.count


def profiled_ops(fn: Callable[[], object]) -> int:
    """`aten::` calls torch.profiler records while `fn` runs, on every thread (I/O workers included)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.name.startswith("aten::") for e in prof.events())


@dataclass
class Systems:
    """The engine and HF on the same weights, each a function generating `n` greedy tokens per row for the same
    prompts, returning them as lists."""

    engine: Callable[[int], list[list[int]]]
    hf: Callable[[int], list[list[int]]]
    eng: Engine


def build(folder: Path, batch: int, prompt: int, overrides: dict | None = None, seed: int = 0) -> Systems:
    """HF's OPT with random weights at `transformers.OPTConfig(**overrides)` shapes (OPT-125m by default), saved
    to `folder` and loaded from there by the engine, everything in RAM, fp32."""
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(**(overrides or {}))
    torch.manual_seed(seed)
    hf = OPTForCausalLM(config).eval()
    hf.save_pretrained(folder)
    eng = Engine.load(folder, policy=Policy(gpu_batch_size=batch, compute_dtype="fp32"), device="cpu")
    ids = torch.randint(4, config.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(seed))
    rows = ids.tolist()

    def hf_generate(n: int) -> list[list[int]]:
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, pad_token_id=config.pad_token_id)
        return out[:, prompt:].tolist()

    return Systems(lambda n: [o.token_ids for o in eng.generate(rows, max_new_tokens=n)], hf_generate, eng)


def step_ops(generate: Callable[[int], object], count: Callable[[Callable[[], object]], int], n: int = 3) -> int:
    """Ops of one decode step: those of generating n+1 tokens less those of generating n."""
    return count(lambda: generate(n + 1)) - count(lambda: generate(n))


def op_counts(systems: Systems) -> list[tuple[str, int, int, float]]:
    """(way of counting, engine ops, HF ops, engine / HF) per decode step."""
    rows = []
    for name, count in (("dispatcher calls (torch.profiler)", profiled_ops),
                        ("ops below autograd (TorchDispatchMode)", dispatched_ops)):
        eng, hf = step_ops(systems.engine, count), step_ops(systems.hf, count)
        rows.append((name, eng, hf, eng / hf))
    return rows


@dataclass
class Throughput:
    """Best tokens/s of each system over alternating runs, and the engine's prefill and decode seconds in its
    best run."""

    engine: float
    hf: float
    prefill_s: float
    decode_s: float


def throughput(systems: Systems, batch: int, gen: int, repeat: int) -> Throughput:
    """Best of `repeat` alternating runs (after one warm-up each); a run whose tokens differ from HF's fails."""
    best = {"engine": 0.0, "hf": 0.0}
    split = (0.0, 0.0)
    for i in range(repeat + 1):
        tokens = {}
        for name, generate in (("engine", systems.engine), ("hf", systems.hf)):
            start = time.perf_counter()
            tokens[name] = generate(gen)
            rate = batch * gen / (time.perf_counter() - start)
            if i and rate > best[name]:
                best[name] = rate
                if name == "engine":
                    split = (systems.eng.stats.prefill_s, systems.eng.stats.decode_s)
        if tokens["engine"] != tokens["hf"]:
            raise SystemExit(f"run {i}: the engine's greedy tokens differ from HF's")
    return Throughput(best["engine"], best["hf"], *split)


@cli_main
def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m engine.bench.decode_ops", description=__doc__)
    parser.add_argument("--batch", type=int, default=8, help="rows (one GPU batch)")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens per row")
    parser.add_argument("--gen", type=int, default=16, help="new tokens per row, for throughput")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per system; the best counts")
    parser.add_argument("--no-ops", action="store_true", help="skip counting ops: throughput only")
    args = parser.parse_args(argv)
    print(f"OPT-125m shapes, batch {args.batch}, prompt {args.prompt}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads\n")
    with tempfile.TemporaryDirectory() as tmp:
        systems = build(Path(tmp), args.batch, args.prompt)
        if not args.no_ops:
            print(markdown_table(["ATen ops per decode step", "engine", "HF eager", "engine / HF"],
                                 op_counts(systems), floatfmt=".2f"))
        t = throughput(systems, args.batch, args.gen, args.repeat)
    print(f"\nthroughput, fp32, gen {args.gen}, best of {args.repeat} alternating runs, the same greedy tokens\n")
    print(markdown_table(["system", "tok/s", "× HF"], [("engine, in RAM", t.engine, t.engine / t.hf),
                                                        ("HF generate", t.hf, 1.0)], floatfmt=".2f"))
    print(f"\nengine's best run: prefill {t.prefill_s:.3f} s, decode {t.decode_s:.3f} s "
          f"({t.decode_s / max(1, args.gen - 1) * 1e3:.1f} ms per step)")


if __name__ == "__main__":
    main()
