"""Checks of the cost model and the search: FlexGen's published table, and this machine's engine.

    python -m engine.search --paper-table      paper policies predicted on t4-paper, and searched ones
    python -m engine.search --validate-local   OPT-1.3B dummy policies run here: predicted vs measured
"""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
from dataclasses import dataclass

from engine import Engine, GenerationStats
from engine.config import ModelConfig, named_config
from engine.markdown import markdown_table
from engine.planner.cost_model import Prediction, predict
from engine.planner.hardware import HardwareProfile
from engine.planner.measure import load_hardware
from engine.planner.measure import measure as profile
from engine.planner.search import search_policy
from engine.policy import Policy

# -- the paper's table ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PaperRow:
    model: str
    prompt_len: int
    percent: tuple[float, ...]
    gpu_batch_size: int
    num_gpu_batches: int
    cpu_cache_compute: bool
    pin_weight: bool
    compress: bool
    paper_tok_s: float

    def policy(self) -> Policy:
        """The paper's policy, with FlexGen's cache compression (keys grouped per token, no window)."""
        return Policy(gpu_batch_size=self.gpu_batch_size, num_gpu_batches=self.num_gpu_batches,
                      cpu_cache_compute=self.cpu_cache_compute, pin_weight=self.pin_weight,
                      compress_weight=self.compress, compress_cache=self.compress,
                      comp_cache_keys="token").with_percent(*self.percent)


# FlexGen (Sheng et al., 2023), T4 16 GB, generation length 32. The 30B and 175B figures were
# projected by FlexGen from 20 layer-steps.
PAPER_ROWS = (
    PaperRow("opt-6.7b", 512, (100, 0, 100, 0, 100, 0), 2, 1, False, True, False, 25.26),
    PaperRow("opt-6.7b", 1024, (100, 0, 100, 0, 100, 0), 1, 1, False, True, False, 13.72),
    PaperRow("opt-30b", 512, (20, 80, 0, 100, 0, 100), 48, 3, True, True, False, 7.32),
    PaperRow("opt-30b", 1024, (4, 96, 0, 100, 0, 100), 20, 4, True, True, False, 3.50),
    PaperRow("opt-175b", 512, (0, 50, 0, 0, 0, 100), 32, 8, True, False, False, 0.69),
    PaperRow("opt-175b", 1024, (0, 50, 0, 0, 0, 100), 12, 12, True, False, False, 0.35),
    PaperRow("opt-6.7b", 512, (100, 0, 100, 0, 100, 0), 72, 1, False, True, True, 29.12),
    PaperRow("opt-175b", 512, (0, 100, 0, 100, 0, 100), 48, 3, False, False, True, 1.12),
)
PAPER_GEN_LEN = 32


def paper_table(hardware: HardwareProfile | None = None) -> list[dict]:
    """Each paper policy predicted on the t4-paper profile, and the searched policy for its setup."""
    hw = hardware or load_hardware("t4-paper")
    rows = []
    for row in PAPER_ROWS:
        cfg = named_config(row.model)
        paper = predict(cfg, hw, row.policy(), row.prompt_len, PAPER_GEN_LEN)
        found = search_policy(cfg, hw, prompt_len=row.prompt_len, gen_len=PAPER_GEN_LEN,
                              compress_weight=row.compress, compress_cache=row.compress,
                              base=Policy(comp_cache_keys="token"))
        rows.append({"model": row.model + (" c" if row.compress else ""),
                     "prompt/gen": f"{row.prompt_len}/{PAPER_GEN_LEN}", "paper policy": row.policy().label(),
                     "paper tok/s": row.paper_tok_s, "predicted tok/s": paper.throughput_tok_s,
                     "error": paper.throughput_tok_s / row.paper_tok_s - 1,
                     "searched policy": found.policy.label(), "searched tok/s": found.throughput_tok_s})
    return rows


def markdown(rows: list[dict]) -> str:
    head = list(rows[0])
    return markdown_table(head, ([r[k] for k in head] for r in rows), floatfmt=".3g",
                          formats={"error": lambda v: f"{v:+.1%}"})


# -- this machine ---------------------------------------------------------------------------------

def predict_rows(cfg: ModelConfig, hw: HardwareProfile, policy: Policy, rows: int, prompt_len: int,
                 gen_len: int) -> Prediction:
    """Prediction for `rows` prompts: full blocks, then one smaller block for the remainder."""
    full, rest = divmod(rows, policy.block_size)
    parts = [(full, policy)] if full else []
    if rest:
        gbs = min(policy.gpu_batch_size, rest)
        parts.append((1, dataclasses.replace(policy, gpu_batch_size=gbs, num_gpu_batches=-(-rest // gbs))))
    preds = [(n, predict(cfg, hw, p, prompt_len, gen_len)) for n, p in parts]
    prefill = sum(n * p.prefill_s for n, p in preds)
    decode = sum(n * p.decode_s for n, p in preds)
    peak = {t: max(p.peak_bytes[t] for _, p in preds) for t in preds[0][1].peak_bytes}
    return Prediction(rows * gen_len / (prefill + decode), prefill, decode, peak)


def hand_policies(gpu: bool) -> dict[str, Policy]:
    """Hand-written policies over every tier; disk ones bypass the page cache (direct_io).

    4-bit weights only with a GPU: a CPU decodes every weight at every step, which for OPT-1.3B on
    two cores takes the better part of an hour per run.
    """
    def p(pct: tuple, gbs: int, ngb: int, **kw) -> Policy:
        return Policy(gpu_batch_size=gbs, num_gpu_batches=ngb, **kw).with_percent(*pct)

    policies = {
        "device 4x1": p((100, 0, 100, 0, 100, 0), 4, 1),
        "device 4x2": p((100, 0, 100, 0, 100, 0), 4, 2),
        "half weights host 8x1": p((50, 50, 0, 100, 100, 0), 8, 1),
        "30% weights disk 8x1": p((70, 0, 100, 0, 100, 0), 8, 1, direct_io=True),
        "cache on disk 8x1": p((100, 0, 0, 0, 100, 0), 8, 1, direct_io=True),
        "4-bit cache 4x2": p((100, 0, 100, 0, 100, 0), 4, 2, compress_cache=True),
    }
    if gpu:
        policies["4-bit weights 8x1"] = p((100, 0, 100, 0, 100, 0), 8, 1, compress_weight=True)
    return policies


def measure(model: str, policy: Policy, prompts: list[list[int]], gen_len: int, offload_dir: str) -> GenerationStats:
    with Engine.load(model, weights="dummy", policy=policy, offload_dir=offload_dir) as eng:
        eng.generate(prompts[:1], max_new_tokens=2)  # warm-up: first-call allocations and thread start
        eng.generate(prompts, max_new_tokens=gen_len)
        return eng.stats


def validate_local(hw: HardwareProfile, model: str = "opt-1.3b", num_prompts: int = 8, prompt_len: int = 32,
                   gen_len: int = 8, offload_dir: str | None = None,
                   remeasure: bool = False) -> tuple[list[dict], dict]:
    """Run each hand policy and the searched one on this machine; compare with the cost model.

    `remeasure` re-profiles this machine (quickly) before every run and prices that run with the
    fresh profile: on a shared machine the speed drifts by 2x within minutes.
    """
    cfg = named_config(model)
    prompts = [[(7 * i + 13 * j) % 50000 + 3 for j in range(prompt_len)] for i in range(num_prompts)]
    searched = search_policy(cfg, hw, prompt_len=prompt_len, gen_len=gen_len, max_block_size=num_prompts)
    policies = {**hand_policies(hw.device == "cuda"), "searched": searched.policy}
    folder = offload_dir or tempfile.gettempdir()
    rows = []
    for name, policy in policies.items():
        if remeasure:
            hw = profile(folder, 256 << 20, quick=True)
        stats = measure(model, policy, prompts, gen_len, folder)
        pred = predict_rows(cfg, hw, policy, num_prompts, prompt_len, gen_len)
        measured = stats.tokens_per_s
        rows.append({"policy": name, "policy (block, gpu/cpu %)": policy.label(),
                     "predicted tok/s": pred.throughput_tok_s, "measured tok/s": measured,
                     "error": pred.throughput_tok_s / measured - 1,
                     "prefill s pred/meas": f"{pred.prefill_s:.3g}/{stats.prefill_s:.3g}",
                     "decode s pred/meas": f"{pred.decode_s:.3g}/{stats.decode_s:.3g}",
                     "generated": stats.generated_tokens})
        print(f"{name:24s} predicted {pred.throughput_tok_s:8.3f} measured {measured:8.3f} tok/s", flush=True)
    hand = [r for r in rows if r["policy"] != "searched"]
    best = max(hand, key=lambda r: r["measured tok/s"])
    summary = {"median_abs_rel_error": statistics.median(abs(r["error"]) for r in rows),
               "searched_over_best_hand": rows[-1]["measured tok/s"] / best["measured tok/s"],
               "best_hand": best["policy"]}
    return rows, summary
