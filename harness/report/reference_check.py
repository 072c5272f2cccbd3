"""`python -m harness.report.reference_check OUTPUT`: do a run's predictions equal an independent evaluation?

Re-answers every request of every HELM run under `OUTPUT/runs/<suite>/` with HF transformers greedy
decoding of the very prompt HELM built (same checkpoint, fp32, no batching or padding) and compares
the completion text token for token. Greedy requests only (temperature 0).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from engine.errors import UserError, cli_main
from engine.flags import ArgumentParser
from engine.weights import resolve


def hf_greedy_text(model, tokenizer, prompt: str, max_tokens: int, stops: list[str]) -> str:
    """HF greedy completion of `prompt`, cut at EOS and at the first stop sequence, as HELM expects."""
    ids = tokenizer(prompt)["input_ids"]
    if max_tokens == 0:
        return ""
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=max_tokens, do_sample=False,
                             pad_token_id=model.config.pad_token_id or 0)
    tokens = out[0, len(ids):].tolist()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    for i, t in enumerate(tokens):
        if t in eos:
            tokens = tokens[:i]
            break
    text = tokenizer.decode(tokens, clean_up_tokenization_spaces=False)
    cuts = [text.find(s) for s in stops if s and s in text]
    return text[:min(cuts)] if cuts else text


def compare_run(run_dir: Path, model, tokenizer) -> tuple[int, int]:
    """(agreeing, compared) over the greedy requests of one HELM run folder."""
    states = json.loads((run_dir / "scenario_state.json").read_text())["request_states"]
    agree = compared = 0
    for state in states:
        request = state["request"]
        if request.get("temperature", 1.0) != 0 or request.get("echo_prompt"):
            continue
        ours = state["result"]["completions"][0]["text"]
        ref = hf_greedy_text(model, tokenizer, request["prompt"], request["max_tokens"],
                             request.get("stop_sequences", []))
        compared += 1
        agree += ours == ref
    return agree, compared


@cli_main
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m harness.report.reference_check", description=__doc__.split("\n")[0])
    parser.add_argument("output", help="a harness.run output folder")
    output = Path(parser.parse_args(argv).output)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    manifest_path = output / "manifest.json"
    if not manifest_path.is_file():
        raise UserError(f"{output} has no manifest.json; pass a folder written by python -m harness.run")
    manifest = json.loads(manifest_path.read_text())
    _, folder = resolve(manifest["model"], manifest["weights"])
    if folder is None:
        raise UserError("dummy weights have no independent reference; check a real checkpoint")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    total_agree = total = 0
    for run_dir in sorted((output / "runs" / manifest["suite"]).iterdir()):
        if (run_dir / "scenario_state.json").is_file():
            agree, compared = compare_run(run_dir, model, tokenizer)
            total_agree, total = total_agree + agree, total + compared
            print(f"{run_dir.name}: {agree}/{compared} predictions identical to HF transformers greedy")
    print(f"total: {total_agree}/{total} identical")
    return 0 if total and total_agree == total else 1


if __name__ == "__main__":
    sys.exit(main())
