"""GPU check: the policy matrix on CUDA against HF, then a short OPT-1.3B throughput table.

Runs on a GPU machine as it is (its own torch and transformers, no crfm-helm):
    bash scripts/gpu_check.sh      (python -m engine.bench.gpu_check from the repository root)
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import torch

from engine import Engine, Policy
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


def throughput(offload: Path) -> None:
    from transformers import OPTConfig, OPTForCausalLM

    prompt, gen = 128, 16
    print(f"\nOPT-1.3B dummy weights, fp16, prompt {prompt}, gen {gen}\n")
    print("| system | policy (wg wc cg cc hg hc) | batch | tok/s |\n|---|---|---|---|")
    torch.manual_seed(0)
    hf = OPTForCausalLM(OPTConfig.from_dict({**OPTConfig().to_dict(), "hidden_size": 2048, "ffn_dim": 8192,
                                               "num_hidden_layers": 24, "num_attention_heads": 32}))
    hf = hf.half().cuda().eval()
    for batch in (32,):
        ids = torch.randint(10, 50000, (batch, prompt), device="cuda")
        hf.generate(ids, max_new_tokens=2, min_new_tokens=2, do_sample=False)
        torch.cuda.synchronize()
        t = time.perf_counter()
        hf.generate(ids, max_new_tokens=gen, min_new_tokens=gen, do_sample=False)
        torch.cuda.synchronize()
        print(f"| HF transformers (all on GPU) | - | {batch} | {batch * gen / (time.perf_counter() - t):.1f} |")
    del hf
    torch.cuda.empty_cache()
    for percent in [(100, 0, 100, 0, 100, 0), (0, 100, 100, 0, 100, 0), (0, 50, 0, 100, 100, 0)]:
        for gbs, ngb in ((32, 1),):
            policy = Policy(gpu_batch_size=gbs, num_gpu_batches=ngb, cpu_cache_compute=percent[3] == 100)
            with Engine.load("opt-1.3b", weights="dummy", policy=policy.with_percent(*percent),
                             offload_dir=offload) as eng:
                ids = torch.randint(10, 50000, (gbs * ngb, prompt)).tolist()
                eng.generate(ids[:gbs], max_new_tokens=2)
                eng.generate(ids, max_new_tokens=gen)
                print(f"| flexhelm engine | {' '.join(map(str, percent))} | {gbs}x{ngb} | "
                      f"{eng.stats.tokens_per_s:.1f} |", flush=True)


def main() -> None:
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    with tempfile.TemporaryDirectory() as tmp:
        failures = correctness(checkpoints(Path(tmp) / "ckpt"), Path(tmp))
        throughput(Path(tmp))
    print(f"\ncorrectness failures: {failures}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
