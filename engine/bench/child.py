"""One benchmark run, executed in a child process: load a system, generate once, write a JSON result.

`engine.bench` starts `python -m engine.bench.child SPEC.json` inside the memory cgroup; the
spec names the system ("hf", "accelerate" or "engine"), the checkpoint, the workload and, for
the engine, the policy and budgets. Everything the parent cannot see from outside (load and
generate time, disk bytes read per phase, what the system itself says it read) goes into the
result file named by the spec.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

from engine import Engine, Policy
from engine.bench.checkpoints import module_bytes
from engine.storage.host_memory import process_memory


def proc_io_read_bytes() -> int:
    """Bytes this process (all its threads) made the block layer read so far."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


def make_prompts(batch: int, prompt_len: int, vocab: int, seed: int) -> list[list[int]]:
    """Seeded random token ids, the same for every system (ids 0-3 are OPT's special tokens)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab, (batch, prompt_len), generator=gen).tolist()


def accelerate_device_map(n_layers: int) -> dict[str, str]:
    """Embeddings, final norm and LM head in RAM; every decoder layer offloaded to disk."""
    device_map = {name: "cpu" for name in ("model.decoder.embed_tokens", "model.decoder.embed_positions",
                                           "model.decoder.final_layer_norm", "lm_head")}
    device_map.update({f"model.decoder.layers.{i}": "disk" for i in range(n_layers)})
    return device_map


def run_hf(spec: dict, prompts: list[list[int]]) -> dict:
    """HF transformers (a) in RAM, or (b) through Accelerate with decoder layers on disk."""
    from transformers import AutoConfig, AutoModelForCausalLM


    kwargs: dict = {"dtype": torch.float32}
    disk_modules: list[str] = []
    if spec["system"] == "accelerate":
        cfg = AutoConfig.from_pretrained(spec["checkpoint"])
        device_map = accelerate_device_map(cfg.num_hidden_layers)
        disk_modules = [m for m, d in device_map.items() if d == "disk"]
        kwargs.update(device_map=device_map, offload_folder=spec["offload_dir"])
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(spec["checkpoint"], **kwargs).eval()
    load_s = time.perf_counter() - start
    read_after_load = proc_io_read_bytes()
    ids = torch.tensor(prompts)
    gen_len = spec["gen_len"]
    with torch.inference_mode():
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=gen_len,
                             min_new_tokens=gen_len, do_sample=False, pad_token_id=1)
        generate_s = time.perf_counter() - start
    # Each of the gen_len forward passes reads every offloaded layer once more.
    disk_bytes = gen_len * module_bytes(Path(spec["checkpoint"]), disk_modules)
    return {"load_s": load_s, "generate_s": generate_s, "read_after_load": read_after_load,
            "generated_tokens": int(out.shape[0] * (out.shape[1] - ids.shape[1])),
            "system_disk_read_bytes": disk_bytes, "batch": len(prompts)}


def run_engine(spec: dict, prompts: list[list[int]]) -> dict:
    """This engine through its public API, under the spec's policy and budgets."""
    policy = Policy(**spec["policy"])
    start = time.perf_counter()
    eng = Engine.load(spec["checkpoint"], policy=policy, offload_dir=spec.get("offload_dir"),
                      gpu_mem=spec.get("gpu_mem"), cpu_mem=spec.get("cpu_mem"))
    load_s = time.perf_counter() - start
    read_after_load = proc_io_read_bytes()
    start = time.perf_counter()
    outs = eng.generate(prompts, max_new_tokens=spec["gen_len"], temperature=0.0, logprobs=False,
                        seed=spec["seed"])
    generate_s = time.perf_counter() - start
    stats = eng.stats
    return {"load_s": load_s, "generate_s": generate_s, "read_after_load": read_after_load,
            "generated_tokens": sum(len(o.token_ids) for o in outs),
            "system_disk_read_bytes": stats.bytes_read["disk"],
            "batch": eng.policy.block_size, "policy": eng.policy.to_dict(), "engine_stats": stats.to_dict()}


def run(spec: dict) -> dict:
    torch.set_num_threads(spec["threads"])
    result = {"read_after_import": proc_io_read_bytes()}
    prompts = make_prompts(spec["batch"], spec["prompt_len"], spec["vocab"], spec["seed"])
    runner = run_engine if spec["system"] == "engine" else run_hf
    result.update(runner(spec, prompts))
    result.update(read_total=proc_io_read_bytes(), vm_hwm=process_memory("VmHWM"),
                  tokens_per_s=result["generated_tokens"] / result["generate_s"])
    return result


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    try:
        result = run(spec)
    except Exception as err:  # the parent reports it as this run's error; the log has the traceback
        traceback.print_exc()
        result = {"error": f"{type(err).__name__}: {err}".splitlines()[0][:300]}
    tmp = Path(spec["result"] + ".tmp")
    tmp.write_text(json.dumps(result, default=str))
    os.replace(tmp, spec["result"])


if __name__ == "__main__":
    main()
