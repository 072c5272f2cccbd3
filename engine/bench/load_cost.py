"""`python -m engine.bench.load_cost`: what compressed weights cost at load time, once and then from the cache.

Three loads of the same checkpoint, each in a fresh child process so that its peak memory is its own:
uncompressed (the peer), compressed with an empty encoded-weight cache (every weight quantized, then
cached), and compressed again (read back from the cache). Each reports the seconds `Engine.load` took and
the process's peak resident memory (VmHWM). The cache lives in a temporary folder removed at the end.

    python -m engine.bench.load_cost --model opt-1.3b            # dummy weights: the issue's measurement
    python -m engine.bench.load_cost --model smollm2-135m --weights real
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from engine import Engine, Policy
from engine.errors import UserError, cli_main
from engine.flags import ArgumentParser
from engine.markdown import markdown_table
from engine.quant.fit import FITS
from engine.storage.host_memory import process_memory

_RUNS = (("uncompressed (peer)", False), ("compressed, cache empty", True), ("compressed, from cache", True))


def one_load(model: str, weights: str | None, compress: bool, dim: int, fit: str) -> dict:
    """Load once in this process; seconds and peak resident bytes."""
    policy = Policy(compress_weight=compress, comp_weight_dim=dim, comp_weight_fit=fit)
    start = time.perf_counter()
    with Engine.load(model, policy=policy, weights=weights) as eng:
        seconds, stored = time.perf_counter() - start, eng.stored_weight_bytes
    return {"seconds": seconds, "peak_bytes": process_memory("VmHWM"), "stored_bytes": stored}


@cli_main
def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(prog="python -m engine.bench.load_cost", description=__doc__)
    p.add_argument("--model", default="opt-1.3b")
    p.add_argument("--weights", choices=("dummy", "real"), default="dummy")
    p.add_argument("--comp-dim", type=int, choices=(0, 1), default=1)
    p.add_argument("--fit", choices=FITS, default=Policy().comp_weight_fit, help="default: the engine's")
    p.add_argument("--one", choices=("plain", "compressed"), help="internal: one load in this process, as JSON")
    args = p.parse_args(argv)
    weights = None if args.weights == "real" else "dummy"
    if args.one:
        print(json.dumps(one_load(args.model, weights, args.one == "compressed", args.comp_dim, args.fit)))
        return
    rows, results = [], []
    with tempfile.TemporaryDirectory(prefix="flexhelm-load-cost-") as cache:
        for name, compress in _RUNS:
            cmd = [sys.executable, "-m", "engine.bench.load_cost", "--model", args.model, "--weights", args.weights,
                   "--comp-dim", str(args.comp_dim), "--fit", args.fit, "--one", "compressed" if compress else "plain"]
            done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "FLEXHELM_CACHE": cache})
            if done.returncode:
                raise UserError(f"the {name} load failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
            r = json.loads(done.stdout.strip().splitlines()[-1])
            results.append(r)
            rows.append([name, f"{r['seconds']:.1f}", f"{r['peak_bytes'] / 2**30:.2f}",
                         f"{r['stored_bytes'] / 2**30:.2f}", f"{r['seconds'] / results[0]['seconds']:.2f}"])
    print(f"{args.model} ({args.weights} weights), 4-bit groups of 64 along dim {args.comp_dim}, fit {args.fit}; "
          f"{os.cpu_count()} cores")
    print(markdown_table(["load", "seconds", "peak RSS GiB", "stored weights GiB", "÷ uncompressed"], rows))


if __name__ == "__main__":
    main()
