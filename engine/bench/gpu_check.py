"""GPU check: the placement-policy matrix on CUDA against HF, and a 4-bit cache's prefill against its decode
steps (throughput: engine.bench.gpu_bench).

Runs on a GPU machine as it is (its own torch and transformers, no crfm-helm):
    bash scripts/gpu_check.sh      (python -m engine.bench.gpu_check from the repository root)
"""

from __future__ import annotations

import dataclasses
import itertools
import sys
import tempfile
from pathlib import Path

import torch

from engine import Engine
from engine.bench.reference import POLICIES, hf_greedy, tiny_configs

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [20, 21, 22, 23, 24, 25, 26, 27, 28], [40, 41, 42, 43]]


def checkpoints(root: Path) -> dict[str, Path]:
    import transformers

    models = dict(tiny_configs())
    models["opt-125m-shape"] = (transformers.OPTConfig(), "OPTForCausalLM")
    out = {}
    for i, (name, (cfg, cls)) in enumerate(models.items()):
        torch.manual_seed(i)
        getattr(transformers, cls)(cfg).eval().save_pretrained(root / name)
        out[name] = root / name
    return out


def correctness(folders: dict[str, Path], offload: Path) -> int:
    from transformers import AutoModelForCausalLM

    failures = 0
    print("| model | policy | tokens equal HF | max logprob diff |\n|---|---|---|---|")
    for name, folder in folders.items():
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        refs = [hf_greedy(hf, p, 6) for p in PROMPTS]
        for pname, policy in POLICIES.items():
            policy = dataclasses.replace(policy, compute_dtype="fp32", storage_dtype="fp32")
            with Engine.load(folder, policy=policy, device="cuda", offload_dir=offload) as eng:
                outs = eng.generate(PROMPTS, max_new_tokens=6)
            same = all(o.token_ids == r[0] for o, r in zip(outs, refs, strict=True))
            pairs = [(a, b) for o, r in zip(outs, refs, strict=True) for a, b in zip(o.logprobs, r[1], strict=True)]
            diff = max(abs(a - b) for a, b in pairs)
            failures += not (same and diff < 1e-4)
            print(f"| {name} | {pname} | {same} | {diff:.2e} |", flush=True)
    return failures


def compressed_cache(folders: dict[str, Path], offload: Path, device: str = "cuda") -> int:
    """A 4-bit cache (groups of 4 positions, so key blocks code) on the device: a prompt scored in one prefill
    gets the log-probs its tokens got when generated one by one, for each key grouping and cache placement;
    fp32 within 1e-4, fp16 (the decode into fp16 keys) within 5e-2."""
    failures = 0
    print("\n| model | cache | keys | compute | prefill = decode (max logprob diff) |\n|---|---|---|---|---|")
    placements = {name: POLICIES[name] for name in ("all-gpu", "cache-cpu-compute", "cache-half-disk")}
    for (name, folder), (pname, policy), keys, dtype in itertools.product(
            list(folders.items())[:1], placements.items(), ("channel", "token"), ("fp32", "fp16")):
        policy = dataclasses.replace(policy, compress_cache=True, comp_cache_group=4, comp_cache_keys=keys,
                                     compute_dtype=dtype, storage_dtype=dtype)
        with Engine.load(folder, policy=policy, device=device, offload_dir=offload) as eng:
            made = eng.generate([PROMPTS[0]], max_new_tokens=9)[0]
            scored = eng.generate([PROMPTS[0] + made.token_ids], max_new_tokens=0, echo_prompt=True)[0]
        diff = max(abs(a - b) for a, b in zip(scored.prompt_logprobs[len(PROMPTS[0]):], made.logprobs, strict=True))
        failures += diff >= (1e-4 if dtype == "fp32" else 5e-2)
        print(f"| {name} | {pname} | {keys} | {dtype} | {diff:.2e} |", flush=True)
    return failures


def main() -> None:
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    with tempfile.TemporaryDirectory() as tmp:
        folders = checkpoints(Path(tmp) / "ckpt")
        failures = correctness(folders, Path(tmp)) + compressed_cache(folders, Path(tmp))
    print(f"\ncorrectness failures: {failures}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
