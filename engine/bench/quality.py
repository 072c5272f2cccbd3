"""`python -m engine.bench.quality`: what compression costs in accuracy, against the uncompressed model.

For each variant it scores a fixed text set with the engine's own prompt log-probs (perplexity) and
compares the greedy next token after each text with the uncompressed model's (top-1 agreement).
Prompt scoring exercises the compressed KV cache too: attention reads back what the cache holds.

Prompt scoring multiplies whole prompts at once, more rows than the fused int4 kernel
(engine.quant.int4_kernel) takes, so on a CPU it measures weights grouped along dim 1 without the kernel
that their decode steps use. `--fused-check N` measures that kernel's own cost instead: N greedy
tokens per question with and without it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from engine.api import Engine
from engine.errors import UserError, cli_main
from engine.flags import ArgumentParser
from engine.policy import Policy

DEFAULT_TEXTS = Path(__file__).resolve().parents[3] / "shared" / "data" / "helm-scenarios" / "gsm" / "gsm_data_test"


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    compress_weight: bool = False
    compress_cache: bool = False
    bits: int = 4
    dim: int = 1
    fit: str = "minmax"
    keys: str = "channel"

    def policy(self, base: Policy) -> Policy:
        """`base` with this variant's compression (its group sizes are kept)."""
        return dataclasses.replace(base, compress_weight=self.compress_weight, compress_cache=self.compress_cache,
                                   comp_weight_bits=self.bits, comp_cache_bits=self.bits, comp_weight_dim=self.dim,
                                   comp_weight_fit=self.fit, comp_cache_keys=self.keys)


def table_variants() -> list[Variant]:
    """The README table: 4/3/2 bits; weights, cache, both; both weight-grouping dimensions, each with
    FlexGen's min-max fit ("minmax", FlexGen's own default at dim 0) and the error-minimizing ones; keys
    grouped per channel (the default) and per token (FlexGen's, "token-keys"), and FlexGen's whole scheme."""
    out = [Variant("none")]
    for bits in (4, 3, 2):
        weights = [(dim, fit) for dim in (0, 1) for fit in ("minmax", "mse", "weighted")]
        out += [Variant(f"w{bits} dim{dim} {fit}", True, False, bits, dim, fit) for dim, fit in weights]
        out += [Variant(f"c{bits}", False, True, bits), Variant(f"c{bits} token-keys", False, True, bits, keys="token")]
        out += [Variant(f"w{bits}c{bits} dim{dim} {fit}", True, True, bits, dim, fit) for dim, fit in weights]
        out.append(Variant(f"w{bits}c{bits} dim0 minmax token-keys", True, True, bits, 0, "minmax", "token"))
    return out


def load_texts(path: Path, count: int) -> list[str]:
    """The first `count` GSM8K questions with their worked answers (JSON lines)."""
    if not path.is_file():
        raise UserError(f"{path} not found; pass --texts FILE (JSON lines with question and answer)")
    texts = []
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            texts.append(f"Question: {row['question']}\nAnswer: {row['answer']}")
            if len(texts) == count:
                break
    return texts


@dataclasses.dataclass
class Score:
    perplexity: float
    next_tokens: list[int]
    weight_bytes: int


def score(model: str, policy: Policy, texts: list[str]) -> Score:
    with Engine.load(model, policy=policy) as eng:
        weight_bytes = eng.stored_weight_bytes
        outs = eng.generate(texts, max_new_tokens=1, echo_prompt=True)
    lps = [lp for o in outs for lp in o.prompt_logprobs[1:]]
    return Score(math.exp(-sum(lps) / len(lps)), [o.token_ids[0] for o in outs], weight_bytes)


def compare(model: str, variants: list[Variant], texts: list[str], base: Policy) -> list[dict]:
    """Rows of the table: perplexity, its ratio to uncompressed, top-1 agreement, weight bytes."""
    reference = score(model, base, texts)
    rows = []
    for v in variants:
        s = reference if v.name == "none" else score(model, v.policy(base), texts)
        agree = sum(a == b for a, b in zip(s.next_tokens, reference.next_tokens, strict=True)) / len(texts)
        rows.append({"variant": v.name, "perplexity": s.perplexity, "ppl_ratio": s.perplexity / reference.perplexity,
                     "top1_agreement": agree, "weight_bytes_ratio": s.weight_bytes / reference.weight_bytes})
    return rows


def fused_check(model: str, questions: list[str], base: Policy, new_tokens: int) -> dict:
    """Greedy continuations of 4-bit dim-1 weights with the fused int4 kernel against without it (fp32
    products): how many continuations match, where the first differing token falls in those that do
    not, and the largest log-prob gap between the tokens both chose before it."""
    runs = []
    for fused in (True, False):
        policy = dataclasses.replace(base, compress_weight=True, comp_weight_dim=1, fused_int4=fused)
        with Engine.load(model, policy=policy) as eng:
            if fused and not eng.fused_weights:
                raise UserError(f"the fused int4 kernel takes none of {model}'s weights at groups of "
                                f"{base.comp_weight_group} here; use --group 32, 64, 128 or 256 on a CPU")
            runs.append(eng.generate(questions, max_new_tokens=new_tokens))
    divergences, gap = [], 0.0
    for a, b in zip(*runs, strict=True):
        n = min(len(a.token_ids), len(b.token_ids))
        common = next((i for i in range(n) if a.token_ids[i] != b.token_ids[i]), n)
        if a.token_ids != b.token_ids:
            divergences.append(common)
        gap = max([gap, *(abs(x - y) for x, y in zip(a.logprobs[:common], b.logprobs[:common], strict=True))])
    return {"sequences": len(questions), "identical": len(questions) - len(divergences),
            "first_divergences": divergences, "max_logprob_gap": gap}


@cli_main
def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(prog="python -m engine.bench.quality", description=__doc__)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--texts", type=Path, default=DEFAULT_TEXTS, help="GSM8K-style JSON lines")
    p.add_argument("--count", type=int, default=200, help="how many texts (default 200)")
    p.add_argument("--variants", default="table", help="'table' or comma-separated names, e.g. 'w4c4 dim0'")
    p.add_argument("--group", type=int, default=64, help="group size for weights and cache (default 64)")
    p.add_argument("--gpu-batch-size", type=int, default=8)
    p.add_argument("--fused-check", type=int, metavar="N",
                   help="instead of the table: N greedy tokens per question, fused int4 kernel on vs off")
    args = p.parse_args(argv)
    base = Policy(gpu_batch_size=args.gpu_batch_size, comp_weight_group=args.group, comp_cache_group=args.group)
    if args.fused_check:
        questions = [t.split("\nAnswer:")[0] + "\nAnswer:" for t in load_texts(args.texts, args.count)]
        r = fused_check(args.model, questions, base, args.fused_check)
        print(f"{args.model}, w4 dim1 groups of {args.group}, {args.fused_check} greedy tokens after each of "
              f"{r['sequences']} questions: {r['identical']} identical with and without the fused kernel; "
              f"the others first differ at tokens {r['first_divergences']}; largest log-prob gap before a "
              f"difference {r['max_logprob_gap']:.4f}")
        return
    variants = table_variants()
    if args.variants != "table":
        wanted = [n.strip() for n in args.variants.split(",")]
        variants = [v for v in variants if v.name in wanted or v.name == "none"]
    rows = compare(args.model, variants, load_texts(args.texts, args.count), base)
    print(f"{args.model}, first {args.count} texts of {args.texts.name}, groups of {args.group}\n")
    print("| variant | perplexity | ratio | top-1 agreement | weight bytes ratio |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['perplexity']:.3f} | {r['ppl_ratio']:.3f} | {r['top1_agreement']:.3f} | "
              f"{r['weight_bytes_ratio']:.3f} |")


if __name__ == "__main__":
    main()
