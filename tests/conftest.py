"""Shared fixtures: tiny random HF checkpoints, the embedded SmolLM2 folder, and an HF reference."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
HELM_DATA = SHARED_DATA / "helm-scenarios"


def _tiny_configs():
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


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Tiny random checkpoints saved as real safetensors folders (OPT, OPT-350m-shaped, LLaMA+GQA)."""
    import transformers

    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for i, (name, (cfg, cls)) in enumerate(_tiny_configs().items()):
        torch.manual_seed(i)
        model = getattr(transformers, cls)(cfg).eval()
        model.save_pretrained(root / name)
        out[name] = root / name
    return out


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """SmolLM2-135M, converted once per machine into the shared cache."""
    from engine.checkpoint import embedded_folder

    return embedded_folder()


@pytest.fixture(scope="session")
def hf_model():
    """Load an HF model once per folder for the reference runs."""
    from transformers import AutoModelForCausalLM

    cache = {}

    def get(folder: Path):
        if folder not in cache:
            cache[folder] = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        return cache[folder]

    return get


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
