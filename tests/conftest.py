"""Shared fixtures: tiny random HF checkpoints, the embedded SmolLM2 folder, and an HF reference."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from engine.bench.reference import tiny_configs

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def save_tiny(name: str, seed: int, folder: Path) -> Path:
    """Save the tiny random HF model `name` (engine.bench.reference.tiny_configs) initialised from `seed`."""
    import transformers

    cfg, cls = tiny_configs()[name]
    torch.manual_seed(seed)
    getattr(transformers, cls)(cfg).eval().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Tiny random checkpoints saved as real safetensors folders (OPT, OPT-350m-shaped, LLaMA+GQA)."""
    root = tmp_path_factory.mktemp("tiny")
    return {name: save_tiny(name, i, root / name) for i, name in enumerate(tiny_configs())}


@pytest.fixture(scope="session")
def tiny_seeded(tmp_path_factory):
    """`tiny_seeded(name, seed)`: the tiny checkpoint `name` with weights from another seed, made once per session,
    for properties that must hold whatever the weights rather than for the one draw `tiny_models` made."""
    root, made = tmp_path_factory.mktemp("seeded"), {}

    def get(name: str, seed: int) -> Path:
        if (name, seed) not in made:
            made[name, seed] = save_tiny(name, seed, root / f"{name}-{seed}")
        return made[name, seed]

    return get


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, smollm2) -> Path:
    """A 2-layer random LLaMA with SmolLM2's vocabulary and tokenizer files, as a real checkpoint."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama") / "tiny-llama"
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    LlamaForCausalLM(cfg).eval().save_pretrained(folder)
    for name in TOKENIZER_FILES:
        if (smollm2 / name).is_file():
            shutil.copy(smollm2 / name, folder / name)
    return folder


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """SmolLM2-135M, converted once per machine into the shared cache."""
    from engine.weights import embedded_folder

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
