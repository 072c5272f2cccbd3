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

@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Tiny random checkpoints saved as real safetensors folders (OPT, OPT-350m-shaped, LLaMA+GQA)."""
    import transformers

    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for i, (name, (cfg, cls)) in enumerate(tiny_configs().items()):
        torch.manual_seed(i)
        model = getattr(transformers, cls)(cfg).eval()
        model.save_pretrained(root / name)
        out[name] = root / name
    return out


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
