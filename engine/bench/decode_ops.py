"""`python -m engine.bench.decode_ops`: what one decode step costs the host, against HF eager at the same shapes.

On a GPU a decode step at small batch is bound by the host: by how many ops it issues and how often it
waits, not by the device's arithmetic. So this counts the ATen ops of one decode step, for the engine
(everything on the compute device) and for HF transformers' `generate` at the same shapes, two ways:

- dispatcher calls, as torch.profiler records them: every `aten::` call the host makes, composite ops
  and calls that do nothing (a `.to()` to where a tensor already is) included;
- ops below autograd, as a `TorchDispatchMode` sees them: what composite ops decompose into.

A step's count is the difference between generating n+1 and n tokens, so it holds whatever a call
does once (tokenizing, prefill, setup). Counts are deterministic: tests bound them
(tests/engine/test_decode_step.py). Then throughput, engine in RAM against HF `generate`, runs
alternating in one process, best of `--repeat`.

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
    """The engine and HF at the same shapes, each a function generating `n` tokens for the same prompts."""

    engine: Callable[[int], object]
    hf: Callable[[int], object]


def build(folder: Path, batch: int, prompt: int, overrides: dict | None = None, seed: int = 0) -> Systems:
    """HF's OPT with random weights and the engine with dummy weights, at `transformers.OPTConfig(**overrides)`
    shapes (OPT-125m by default), everything in RAM; the config is saved to `folder` for the engine."""
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(**(overrides or {}))
    config.save_pretrained(folder)
    torch.manual_seed(seed)
    hf = OPTForCausalLM(config).eval()
    eng = Engine.load(folder, weights="dummy", policy=Policy(gpu_batch_size=batch), device="cpu", seed=seed)
    ids = torch.randint(4, config.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(seed))
    rows = ids.tolist()

    def hf_generate(n: int) -> object:
        with torch.no_grad():
            return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                               do_sample=False, pad_token_id=config.pad_token_id)

    return Systems(lambda n: eng.generate(rows, max_new_tokens=n), hf_generate)


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


def throughput(systems: Systems, batch: int, gen: int, repeat: int) -> tuple[float, float]:
    """Best tokens/s of engine and HF over `repeat` alternating runs (after one warm-up each)."""
    best = {"engine": 0.0, "hf": 0.0}
    for i in range(repeat + 1):
        for name, generate in (("engine", systems.engine), ("hf", systems.hf)):
            start = time.perf_counter()
            generate(gen)
            if i:
                best[name] = max(best[name], batch * gen / (time.perf_counter() - start))
    return best["engine"], best["hf"]


@cli_main
def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m engine.bench.decode_ops", description=__doc__)
    parser.add_argument("--batch", type=int, default=8, help="rows (one GPU batch)")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens per row")
    parser.add_argument("--gen", type=int, default=16, help="new tokens per row, for throughput")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per system; the best counts")
    args = parser.parse_args(argv)
    print(f"OPT-125m shapes, batch {args.batch}, prompt {args.prompt}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads\n")
    with tempfile.TemporaryDirectory() as tmp:
        systems = build(Path(tmp), args.batch, args.prompt)
        print(markdown_table(["ATen ops per decode step", "engine", "HF eager", "engine / HF"],
                             op_counts(systems), floatfmt=".2f"))
        eng, hf = throughput(systems, args.batch, args.gen, args.repeat)
    print(f"\nthroughput, gen {args.gen}, best of {args.repeat} alternating runs\n")
    print(markdown_table(["system", "tok/s", "× HF"], [("engine, in RAM", eng, eng / hf), ("HF generate", hf, 1.0)],
                         floatfmt=".2f"))


if __name__ == "__main__":
    main()
