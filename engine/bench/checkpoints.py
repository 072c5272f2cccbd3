"""The benchmark's dummy checkpoint: a real HF OPT folder (fp16 safetensors) with random weights.

There are no OPT weights offline, and speed does not depend on the values, so the benchmark
writes a seeded random checkpoint once and every system (HF, Accelerate, this engine) loads the
same files. It is written tensor by tensor in shards of a few hundred MB, so creating it never
holds the whole model in memory and loaders can stream it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from engine.config import named_config
from engine.errors import UserError
from engine.weights import cache_root

CACHE_ROOT = cache_root() / "bench"
SHARD_BYTES = 512 * 2**20
INIT_STD = 0.02  # OPTConfig.init_std


def hf_opt_config(name: str):
    """transformers.OPTConfig with the shapes of a named OPT config (e.g. 'opt-1.3b')."""
    from transformers import OPTConfig

    cfg = named_config(name)
    if cfg.family != "opt":
        raise UserError(f"the benchmark builds OPT checkpoints; {name!r} is a {cfg.family} model")
    return OPTConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden, num_hidden_layers=cfg.n_layers,
                     ffn_dim=cfg.ffn, num_attention_heads=cfg.n_heads,
                     max_position_embeddings=cfg.max_positions,
                     word_embed_proj_dim=cfg.embed_dim, do_layer_norm_before=cfg.pre_layer_norm,
                     dtype="float16", pad_token_id=1, bos_token_id=2, eos_token_id=2)


def default_folder(name: str) -> Path:
    return CACHE_ROOT / f"{name}-fp16"


def ensure_opt_checkpoint(name: str, folder: Path | None = None, seed: int = 0) -> Path:
    """Return a folder holding a random fp16 OPT checkpoint of `name`'s shapes, writing it once."""
    folder = Path(folder or default_folder(name))
    if (folder / "model.safetensors.index.json").is_file():
        return folder
    return write_random_checkpoint(hf_opt_config(name), folder, seed)


def write_random_checkpoint(hf_config, folder: Path, seed: int = 0) -> Path:
    """Write `hf_config` as sharded fp16 safetensors with N(0, 0.02) weights, unit norms, zero biases."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        state = AutoModelForCausalLM.from_config(hf_config).state_dict()
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    if hf_config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, shape in tqdm(shapes.items(), desc=f"writing {folder.name}", unit="tensor"):
        shards[-1][key] = _init_tensor(key, shape, gen)
        size += shards[-1][key].nbytes
        if size >= SHARD_BYTES:
            shards.append({})
            size = 0
    shards = [s for s in shards if s]
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(tmp / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
        total += sum(t.nbytes for t in shard.values())
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    hf_config.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def _init_tensor(key: str, shape: tuple[int, ...], gen):
    if key.endswith(".bias"):
        return torch.zeros(shape, dtype=torch.float16)
    if "layer_norm" in key:
        return torch.ones(shape, dtype=torch.float16)
    return (torch.randn(shape, generator=gen) * INIT_STD).to(torch.float16)


def checkpoint_files(folder: Path) -> list[Path]:
    return sorted(Path(folder).glob("*.safetensors"))


def checkpoint_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in checkpoint_files(folder))


def tensor_sizes(folder: Path) -> dict[str, tuple[int, int]]:
    """Every stored tensor's (element count, bytes), read from the safetensors headers only."""
    sizes = {}
    for path in checkpoint_files(folder):
        with open(path, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        for key, meta in header.items():
            if key != "__metadata__":
                n = 1
                for s in meta["shape"]:
                    n *= s
                start, end = meta["data_offsets"]
                sizes[key] = (n, end - start)
    return sizes


def checkpoint_param_count(folder: Path) -> int:
    """Parameters stored in the folder (a tied LM head counted once)."""
    return sum(n for n, _ in tensor_sizes(folder).values())


def module_bytes(folder: Path, prefixes: list[str]) -> int:
    """Stored bytes of the tensors under the given module names (e.g. 'model.decoder.layers.0')."""
    return sum(nbytes for key, (_, nbytes) in tensor_sizes(folder).items()
               if any(key.startswith(p + ".") for p in prefixes))
