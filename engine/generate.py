"""`python -m engine.generate`: generate from the command line and print text or JSON with stats.

With --plan it generates nothing: it prints the engine's memory plan per tier for --prompt-len and
--max-new-tokens under the policy options and budgets, and exits 0 when it fits; otherwise it prints one
line saying what does not fit and exits 1. Nothing is allocated, so a plan for a GPU needs no GPU here:

    python -m engine.generate --model opt-30b --weights dummy --plan --prompt-len 512 --max-new-tokens 32 \
        --percent 20 80 0 100 0 100 --gpu-batch-size 48 --num-gpu-batches 3 --cpu-cache-compute \
        --gpu-mem 16GiB --cpu-mem 200GiB
"""

from __future__ import annotations

import argparse
import json
import sys

from engine.api import Engine
from engine.errors import UserError, cli_main
from engine.flags import ArgumentParser, add_policy_args, load_engine, resolve_policy


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m engine.generate", description=__doc__)
    p.add_argument("--model", required=True, help="named config (opt-125m ... opt-175b, smollm2-135m) or folder")
    p.add_argument("--weights", choices=["dummy"], help="seeded random weights instead of a checkpoint")
    p.add_argument("--prompt", action="append", default=[], help="a text prompt (repeatable)")
    p.add_argument("--prompt-ids", action="append", default=[], help="a prompt as comma-separated token ids")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--echo-prompt", action="store_true", help="also return the prompt tokens' log-probs")
    p.add_argument("--device", help="cpu or cuda[:N] (default: cuda if present)")
    p.add_argument("--json", action="store_true", help="print one JSON object with outputs and stats (or the plan)")
    p.add_argument("--plan", nargs="?", const="", metavar="DEVICE",
                   help="print the memory plan per tier instead of generating; exit 1 when it does not fit. "
                        "DEVICE (cpu, cuda[:N]) need not be present (default: --device, else cuda)")
    p.add_argument("--prompt-len", type=int, help="with --plan: prompt tokens per row (default: the longest "
                   "--prompt-ids)")
    p.add_argument("--num-prompts", type=int, help="with --plan: rows to plan for (default: one full block)")
    p.add_argument("--disk-mem", help="budget of the disk tier, e.g. 1.5TB (default: free space)")
    add_policy_args(p)
    return p


def _ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UserError(f"--prompt-ids takes comma-separated integers, got {text!r}") from None


def _plan(args: argparse.Namespace) -> None:
    """Print the plan (a table, or JSON) when it fits; otherwise raise its one-line shortfall."""
    prompt_len = args.prompt_len or max((len(_ids(t)) for t in args.prompt_ids), default=None)
    if prompt_len is None:
        raise UserError("--plan needs --prompt-len N: the prompt tokens of each row")
    policy = resolve_policy(args, prompt_len=prompt_len, gen_len=args.max_new_tokens, max_block_size=args.num_prompts)
    plan = Engine.plan(args.model, policy, weights=args.weights, device=args.plan or args.device or "cuda",
                       gpu_mem=args.gpu_mem, cpu_mem=args.cpu_mem, disk_mem=args.disk_mem,
                       offload_dir=args.offload_dir, prompt_len=prompt_len, gen_len=args.max_new_tokens,
                       num_prompts=args.num_prompts)
    if not plan.fits:
        raise UserError(plan.shortfall)
    print(json.dumps(plan.to_dict()) if args.json else plan.table())


@cli_main
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.plan is not None:
        _plan(args)
        return
    if args.prompt_len is not None or args.num_prompts is not None:
        raise UserError("--prompt-len and --num-prompts size a --plan; give prompts with --prompt/--prompt-ids")
    if bool(args.prompt) == bool(args.prompt_ids):
        raise UserError("give either --prompt TEXT or --prompt-ids 1,2,3 (one or more times), not both")
    prompts = args.prompt or [_ids(t) for t in args.prompt_ids]
    eng = load_engine(args, prompt_len=max(len(p) for p in prompts), gen_len=args.max_new_tokens,
                      max_block_size=len(prompts))
    outs = eng.generate(prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                        top_p=args.top_p, top_k=args.top_k, stop=args.stop, seed=args.seed,
                        echo_prompt=args.echo_prompt)
    if args.json:
        keys = ("text", "token_ids", "logprobs", "finish_reason") + (("prompt_logprobs",) if args.echo_prompt else ())
        print(json.dumps({"outputs": [{k: getattr(o, k) for k in keys} for o in outs], "stats": eng.stats.to_dict()}))
        return
    for o in outs:
        print(o.text)
        print(f"  [{len(o.token_ids)} tokens, finish: {o.finish_reason}]", file=sys.stderr)
    s = eng.stats
    print(f"{s.generated_tokens} tokens in {s.elapsed_s:.2f}s: {s.tokens_per_s:.2f} tok/s "
          f"(prefill {s.prefill_s:.2f}s, decode {s.decode_s:.2f}s)", file=sys.stderr)


if __name__ == "__main__":
    main()
