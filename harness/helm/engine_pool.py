"""One engine per EngineSpec per process: HELM may build several clients and executors for one
deployment, and loading a model (possibly hundreds of GB) must happen once per harness run."""

from __future__ import annotations

import json
import threading
from pathlib import Path

from engine import Engine, UserError
from engine.models.registry import num_params
from engine.weights import embedded_folder, load_tokenizer, resolve
from harness.helm.deployment import EngineSpec, ModelFacts

_lock = threading.Lock()
_engines: dict[str, Engine] = {}


def _key(spec: EngineSpec) -> str:
    return json.dumps(spec.to_args(), sort_keys=True)


def engine_for(spec: EngineSpec) -> Engine:
    """The loaded engine for `spec`, loading it on first use."""
    with _lock:
        key = _key(spec)
        if key not in _engines:
            _engines[key] = Engine.load(spec.model, policy=spec.policy_obj, weights=spec.weights, **spec.load)
        return _engines[key]


def output_identity(spec: EngineSpec, engine: Engine) -> dict:
    """The request-cache identity of `spec`, with the device and dtypes `engine` resolved when it loaded
    (so a CPU run and a GPU run sharing an output folder never answer each other's requests)."""
    return spec.output_identity(engine.device.type, str(engine.compute_dtype), str(engine.storage_dtype))


def release(spec: EngineSpec) -> None:
    """Close and forget the engine of `spec` (its offload files go with it)."""
    with _lock:
        engine = _engines.pop(_key(spec), None)
    if engine is not None:
        engine.close()


def tokenizer_folder(spec: EngineSpec) -> str:
    """The folder holding the tokenizer the engine uses for `spec`, found without loading weights."""
    _, folder = resolve(spec.model, spec.weights)
    folder = Path(folder) if folder is not None else embedded_folder()  # dummy weights borrow it
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        raise UserError(f"{folder} has no tokenizer files; HELM needs the model's tokenizer "
                        "(copy tokenizer.json and tokenizer_config.json into the checkpoint folder)")
    return str(folder.resolve())


def tokenizer_for(spec: EngineSpec):
    """The tokenizer the engine of `spec` would load, without loading its weights (a scale-out driver)."""
    cfg, folder = resolve(spec.model, spec.weights)
    return load_tokenizer(folder, cfg)


def model_facts(spec: EngineSpec) -> ModelFacts:
    """What HELM's registration needs: tokenizer folder, context length, special tokens."""
    from transformers import AutoTokenizer

    cfg, _ = resolve(spec.model, spec.weights)
    folder = tokenizer_folder(spec)
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    added_bos = 1 if tok("x")["input_ids"][:1] == [tok.bos_token_id] and tok.bos_token_id is not None else 0
    return ModelFacts(tokenizer_dir=folder, max_sequence_length=cfg.max_positions - added_bos,
                      num_parameters=num_params(cfg), end_of_text_token=tok.eos_token, prefix_token=None)
