"""Shared fixtures: tiny random HF checkpoints, the embedded SmolLM2 folder, and an HF reference."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from engine.bench.reference import tiny_configs

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


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
