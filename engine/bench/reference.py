"""The exactness reference: HF transformers on the same weights, tiny test models, and the policy matrix.

Shared by the test suite and the GPU check (engine.bench.gpu_check), so both hold the engine to
the same reference over the same placements.
"""

from __future__ import annotations

import torch

from engine.policy import Policy

POLICIES = {
    "all-gpu": Policy(),
    "weights-disk": Policy().with_percent(0, 0, 100, 0, 100, 0),
    # direct reads go to a worker, ahead of use; buffered ones (above) are read at use on a CPU
    "weights-disk-direct": Policy(direct_io=True).with_percent(0, 0, 100, 0, 100, 0),
    "weights-30-30-40": Policy().with_percent(30, 30, 100, 0, 100, 0),
    "cache-cpu-compute": Policy(cpu_cache_compute=True).with_percent(100, 0, 0, 100, 100, 0),
    "cache-half-disk": Policy().with_percent(100, 0, 50, 0, 100, 0),
    "act-cpu": Policy().with_percent(100, 0, 100, 0, 0, 100),
    "act-split": Policy().with_percent(100, 0, 100, 0, 30, 30),
    "three-gpu-batches": Policy(gpu_batch_size=1, num_gpu_batches=3).with_percent(50, 0, 30, 30, 30, 30),
    "no-overlap": Policy(overlap=False).with_percent(20, 30, 30, 30, 30, 30),
}


def tiny_configs() -> dict:
    """HF configs of tiny random models: OPT, OPT-350m-shaped (project_in/out, post-LN), LLaMA with GQA."""
    from transformers import LlamaConfig, OPTConfig

    common = dict(vocab_size=320, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=128)
    return {
        "opt": (OPTConfig(ffn_dim=64, **common), "OPTForCausalLM"),
        "opt350": (OPTConfig(ffn_dim=64, word_embed_proj_dim=16, do_layer_norm_before=False, **common),
                   "OPTForCausalLM"),
        "llama": (LlamaConfig(intermediate_size=64, num_key_value_heads=2, tie_word_embeddings=False,
                              rope_theta=10000.0, **common), "LlamaForCausalLM"),
    }


def hf_greedy(model, prompt: list[int], max_new: int, **kwargs) -> tuple[list[int], list[float]]:
    """HF greedy generation of one unpadded prompt: tokens and the raw log-softmax of each choice."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False,
                             output_logits=True, return_dict_in_generate=True,
                             pad_token_id=model.config.pad_token_id or 0, **kwargs)
    tokens = out.sequences[0, len(prompt):].tolist()
    lps = [torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(out.logits, tokens, strict=False)]
    return tokens[:len(lps)], lps


def hf_prompt_logprobs(model, prompt: list[int]) -> list[float]:
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0].float()
    lp = torch.log_softmax(logits, -1)
    return [lp[i - 1, prompt[i]].item() for i in range(1, len(prompt))]
