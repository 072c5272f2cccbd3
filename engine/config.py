"""Model configurations: one dataclass for every family, a table of named configs, and HF import."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from engine.errors import UserError


@dataclass(frozen=True)
class ModelConfig:
    family: str  # "opt" or "llama": picks the adapter in engine.models
    vocab_size: int
    hidden: int
    n_layers: int
    n_heads: int
    ffn: int
    max_positions: int
    n_kv_heads: int | None = None
    head_dim_override: int | None = None
    # OPT
    word_embed_proj_dim: int | None = None
    pre_layer_norm: bool = True
    final_layer_norm: bool = True
    # LLaMA
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_embeddings: bool = True
    eos_token_id: tuple[int, ...] = (2,)
    bos_token_id: int | None = 2
    pad_token_id: int | None = 1
    name: str = ""

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.head_dim_override or self.hidden // self.n_heads

    @property
    def embed_dim(self) -> int:
        return self.word_embed_proj_dim or self.hidden



def _opt(name: str, hidden: int, layers: int, heads: int, **kw) -> ModelConfig:
    return ModelConfig(family="opt", vocab_size=50272, hidden=hidden, n_layers=layers, n_heads=heads,
                       ffn=4 * hidden, max_positions=2048, name=name, **kw)


NAMED_CONFIGS: dict[str, ModelConfig] = {
    c.name: c
    for c in [
        _opt("opt-125m", 768, 12, 12),
        _opt("opt-350m", 1024, 24, 16, word_embed_proj_dim=512, pre_layer_norm=False,
             final_layer_norm=False),
        _opt("opt-1.3b", 2048, 24, 32),
        _opt("opt-2.7b", 2560, 32, 32),
        _opt("opt-6.7b", 4096, 32, 32),
        _opt("opt-13b", 5120, 40, 40),
        _opt("opt-30b", 7168, 48, 56),
        _opt("opt-66b", 9216, 64, 72),
        _opt("opt-175b", 12288, 96, 96),
        ModelConfig(family="llama", vocab_size=49152, hidden=576, n_layers=30, n_heads=9, n_kv_heads=3,
                    ffn=1536, max_positions=8192, rope_theta=100000.0, norm_eps=1e-5,
                    tie_embeddings=True, eos_token_id=(2,), bos_token_id=1, pad_token_id=2,
                    name="smollm2-135m"),
    ]
}


def named_config(name: str) -> ModelConfig:
    key = name.lower().removeprefix("facebook/")
    if key not in NAMED_CONFIGS:
        raise UserError(f"unknown model {name!r}; use a checkpoint folder or one of: "
                        + ", ".join(NAMED_CONFIGS))
    return NAMED_CONFIGS[key]


def _ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list | tuple) else (int(value),)


# Fields a config.json must have, per family: without them the model's shapes are unknown.
REQUIRED_FIELDS = {
    "opt": ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "ffn_dim",
            "max_position_embeddings"),
    "llama": ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"),
}


def _require(hf: dict, family: str, source: str) -> None:
    """Name the first missing or malformed shape field and the file, rather than fail later with a KeyError."""
    for key in REQUIRED_FIELDS[family]:
        if key not in hf:
            raise UserError(f"{source}: required field {key!r} is missing (an incomplete download?); "
                            "re-download the checkpoint")
        value = hf[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise UserError(f"{source}: field {key!r} must be a positive integer, got {value!r}; "
                            "re-download the checkpoint")


def from_hf_config(hf: dict, name: str = "", source: str | None = None) -> ModelConfig:
    """Translate a HF `config.json` dict; unknown architectures and missing fields are user errors.

    `source` names the file in messages (default: the model's name).
    """
    source = source or name or "config.json"
    if not isinstance(hf, dict):
        raise UserError(f"{source}: expected a JSON object, got {type(hf).__name__}; re-download the checkpoint")
    model_type = hf.get("model_type")
    if model_type == "opt":
        _require(hf, "opt", source)
        hidden = hf["hidden_size"]
        proj = hf.get("word_embed_proj_dim", hidden)
        return ModelConfig(
            family="opt", vocab_size=hf["vocab_size"], hidden=hidden, n_layers=hf["num_hidden_layers"],
            n_heads=hf["num_attention_heads"], ffn=hf["ffn_dim"],
            max_positions=hf["max_position_embeddings"],
            word_embed_proj_dim=proj if proj != hidden else None,
            pre_layer_norm=hf.get("do_layer_norm_before", True),
            final_layer_norm=hf.get("do_layer_norm_before", True)
            and not hf.get("_remove_final_layer_norm", False),
            attention_bias=hf.get("enable_bias", True), tie_embeddings=hf.get("tie_word_embeddings", True),
            eos_token_id=_ids(hf.get("eos_token_id", 2)), bos_token_id=hf.get("bos_token_id"),
            pad_token_id=hf.get("pad_token_id"), name=name,
        )
    if model_type in ("llama", "mistral", "qwen2") or "LlamaForCausalLM" in (hf.get("architectures") or []):
        _require(hf, "llama", source)
        if hf.get("rope_scaling") not in (None, {}) and (hf["rope_scaling"].get("rope_type", "default")
                                                          not in ("default",)):
            raise UserError(f"model {name!r}: rope_scaling {hf['rope_scaling']} is not supported yet")
        rope = hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        return ModelConfig(
            family="llama", vocab_size=hf["vocab_size"], hidden=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"], n_heads=hf["num_attention_heads"],
            n_kv_heads=hf.get("num_key_value_heads"), head_dim_override=hf.get("head_dim"),
            ffn=hf["intermediate_size"], max_positions=hf.get("max_position_embeddings", 2048),
            rope_theta=float(rope), norm_eps=hf.get("rms_norm_eps", 1e-6),
            attention_bias=hf.get("attention_bias", False), mlp_bias=hf.get("mlp_bias", False),
            tie_embeddings=hf.get("tie_word_embeddings", False),
            eos_token_id=_ids(hf.get("eos_token_id")), bos_token_id=hf.get("bos_token_id"),
            pad_token_id=hf.get("pad_token_id"), name=name,
        )
    raise UserError(f"{name or 'checkpoint'}: architecture {model_type!r} is not supported; "
                    "flexhelm runs OPT and LLaMA-family checkpoints")


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        why = err.msg if isinstance(err, json.JSONDecodeError) else "not UTF-8 text"
        raise UserError(f"{path}: not valid JSON ({why}); re-download the checkpoint") from None


def load_folder_config(folder: Path) -> ModelConfig:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise UserError(f"{folder}: no config.json; point --model at a HF checkpoint folder")
    cfg = from_hf_config(_read_json(path), name=Path(folder).name, source=str(path))
    gen = Path(folder) / "generation_config.json"
    if gen.is_file():  # generate() stops on the generation config's EOS ids, as HF does
        extra = _read_json(gen)
        eos = _ids(extra.get("eos_token_id")) if isinstance(extra, dict) else ()
        if eos:
            cfg = dataclasses.replace(cfg, eos_token_id=eos)
    return cfg
